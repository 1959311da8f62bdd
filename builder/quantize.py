"""FP8 for TensorRT engines: NVIDIA Model Optimizer calibrates, the ONNX carries Q/DQ nodes.

1. Calibration: Model Optimizer's FP8 recipe (`mtq.FP8_DEFAULT_CFG`: E4M3, per-tensor scales,
   max calibration) on the static model at the entry's shape, with fixed-seed inputs or latents the
   user supplies. What stays in high precision is Model Optimizer's Wan recipe: the patch embedding,
   the condition embedder, the output projection and the first and last three blocks
   (`runtime.fp8.fp8_layer_names`).
2. The error of the calibrated (fake-quantized) model against the unquantized one is measured on
   held-out fixed-seed inputs; it goes into the manifest.
3. The ONNX of the unquantized model gets a QuantizeLinear/DequantizeLinear pair (FLOAT8E4M3FN zero
   point, the calibrated scale) on both inputs of each recipe linear layer's MatMul, right before it,
   so TensorRT sees explicit quantization in a strongly typed network. (Model Optimizer's own ONNX
   exporters did not work for this graph with torch 2.13: the dynamo exporter has no translation for
   its quantize op, the TorchScript one cannot export RMSNorm; the Q/DQ insertion here is small and
   checked by running the fp32 graph in ONNX Runtime against Model Optimizer's fake quantization.)

NVFP4 (`calibrate_nvfp4`, then `builder.nvfp4.insert_nvfp4_qdq`): Model Optimizer's NVFP4 recipe
calibrates the activations' per-tensor scales, which needs CUDA (its NVFP4 quantizers refuse CPU
tensors); the weights' block scales come from the weights. The reference the engine is checked
against is this project's emulation of the engine's arithmetic, itself compared with Model
Optimizer's fake quantization and recorded.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from runtime.errors import WanBuildError
from runtime.fp8 import E4M3_MAX, fp8_layer_names, kept_blocks
from runtime.static import StaticWanTransformer

_FLOAT8E4M3FN = 17
_ONNX_DTYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}


class QuantizeError(WanBuildError):
    """Quantization cannot run here or failed; the message says why and what to do."""


@dataclass(frozen=True)
class Calibration:
    amax: dict[str, tuple[float, float]]  # linear layer -> (activation amax, weight amax)
    relative_error: float  # fake-quantized model vs unquantized, held-out inputs
    batches: int
    output: torch.Tensor = field(repr=False, compare=False)  # the fake-quantized model on the held-out inputs

    def to_json(self) -> dict:
        return {"layers": len(self.amax), "batches": self.batches, "relative_error_vs_unquantized":
                self.relative_error, "recipe": "Model Optimizer FP8_DEFAULT_CFG (E4M3 per-tensor, max calibration); "
                "patch embedding, condition embedder, proj_out and the first and last blocks kept"}


def _modelopt():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise QuantizeError(f"FP8 and NVFP4 calibration need NVIDIA Model Optimizer: pip install nvidia-modelopt "
                            f"({e})") from None
    return mtq


def _wan_recipe(base: dict, num_layers: int) -> dict:
    """Model Optimizer config `base` with Wan's recipe: patch embedding, condition embedder, output
    projection and the first and last blocks left unquantized."""
    keep = kept_blocks(num_layers)
    cfg = copy.deepcopy(base)
    kept = ["*patch_embedding*", "*condition_embedder*", "*proj_out*"]
    kept += [f"blocks.{i}.*" for i in range(num_layers) if i < keep or i >= num_layers - keep]
    cfg["quant_cfg"] += [{"quantizer_name": pattern, "enable": False} for pattern in kept]
    return cfg


def calibrate_fp8(model: StaticWanTransformer, batches: Iterable[tuple[torch.Tensor, ...]],
                  held_out: tuple[torch.Tensor, ...]) -> Calibration:
    """Calibrate `model` in place with Model Optimizer; returns the per-layer amax and the error."""
    mtq = _modelopt()
    config = model.config
    names = set(fp8_layer_names(model, config.num_layers))
    cfg = _wan_recipe(mtq.FP8_DEFAULT_CFG, config.num_layers)
    batches = list(batches)
    with torch.no_grad():
        reference = model(*held_out)
    mtq.quantize(model, cfg, forward_loop=lambda m: [m(*b) for b in batches])
    with torch.no_grad():
        quantized = model(*held_out)
    amax = {}
    for name in sorted(names):
        layer = model.get_submodule(name)
        a, w = layer.input_quantizer.amax, layer.weight_quantizer.amax
        if a is None or w is None:
            raise QuantizeError(f"Model Optimizer left {name} uncalibrated; the calibration inputs never reached it")
        amax[name] = (float(a.max()), float(w.max()))
    error = ((quantized.float() - reference.float()).norm() / reference.float().norm()).item()
    return Calibration(amax, error, len(batches), quantized)


def node_scope(node) -> str | None:
    """The module path of the call a node came from (the exporter records the scope stack, ending
    with the op's own name)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            modules = [s for s in json.loads(prop.value.replace("'", '"')) if s.startswith("model.")]
            return modules[-1] if modules else None
    return None


def insert_fp8_qdq(onnx_path: Path, calibration: Calibration, dtype: torch.dtype,
                   module_name: Callable[[str], str] = lambda s: s.removeprefix("model.")) -> int:
    """Put a FP8 Q/DQ pair before both inputs of each calibrated layer's MatMul; returns the pairs added.
    The weights file is untouched (the graph is loaded without external data and saved in place)."""
    import onnx
    from onnx import helper, numpy_helper

    import numpy as np

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    onnx_dtype = _ONNX_DTYPES[dtype]
    zero = helper.make_tensor("fp8_zero_point", _FLOAT8E4M3FN, [], [0])
    graph.initializer.append(zero)
    new_nodes, added, seen = [], 0, set()
    for node in graph.node:
        name = module_name(node_scope(node) or "")
        if node.op_type in ("MatMul", "Gemm") and name in calibration.amax:
            seen.add(name)
            for slot, amax in zip((0, 1), calibration.amax[name]):
                tag = f"{name}.{'input' if slot == 0 else 'weight'}"
                scale32 = f"{tag}.fp8_scale"
                graph.initializer.append(numpy_helper.from_array(np.array(max(amax, 1e-12) / E4M3_MAX,
                                                                          dtype=np.float32), scale32))
                scale = scale32
                if onnx_dtype != 1:
                    scale = f"{scale32}.cast"
                    new_nodes.append(helper.make_node("Cast", [scale32], [scale], to=onnx_dtype, name=f"{tag}.cast"))
                q, dq = f"{tag}.q", f"{tag}.dq"
                new_nodes.append(helper.make_node("QuantizeLinear", [node.input[slot], scale, zero.name], [q],
                                                  name=f"{tag}.QuantizeLinear"))
                new_nodes.append(helper.make_node("DequantizeLinear", [q, scale, zero.name], [dq],
                                                  name=f"{tag}.DequantizeLinear"))
                node.input[slot] = dq
                added += 1
        new_nodes.append(node)
    missing = sorted(set(calibration.amax) - seen)
    if missing:
        raise QuantizeError(f"{onnx_path}: no MatMul found for {', '.join(missing[:4])}; the export's name "
                            "scopes do not match the model's layer names")
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.save(model, str(onnx_path))
    return added


@dataclass(frozen=True)
class Nvfp4Calibration:
    input_amax: dict[str, float]  # linear layer -> activation amax (its per-tensor scale)
    relative_error: float  # the engine's arithmetic (emulated) vs unquantized, held-out inputs
    modelopt_difference: float  # the emulation vs Model Optimizer's own NVFP4 fake quantization
    batches: int
    output: torch.Tensor = field(repr=False, compare=False)  # the emulation on the held-out inputs

    def to_json(self) -> dict:
        return {"layers": len(self.input_amax), "batches": self.batches,
                "relative_error_vs_unquantized": self.relative_error,
                "emulation_vs_model_optimizer": self.modelopt_difference,
                "recipe": "Model Optimizer NVFP4_DEFAULT_CFG (E2M1, 16-value blocks, FP8 block scales, "
                "max calibration); patch embedding, condition embedder, proj_out and the first and last "
                "blocks kept"}


def calibrate_nvfp4(model: StaticWanTransformer, batches: Iterable[tuple[torch.Tensor, ...]],
                    held_out: tuple[torch.Tensor, ...]) -> Nvfp4Calibration:
    """Calibrate the activation scales with Model Optimizer's NVFP4 recipe (CUDA only); measure the
    error of exactly what the engine computes (`builder.nvfp4.emulate`) against the unquantized
    model. `model` is left unquantized: Model Optimizer works on a second module over the same
    tensors."""
    from .nvfp4 import emulate

    if model.rope_cos.device.type != "cuda":
        raise QuantizeError("NVFP4 calibration needs CUDA: Model Optimizer's NVFP4 quantizers run on a GPU "
                            "(on the CPU they stop with \"amax must be a CUDA tensor\"); build NVFP4 entries "
                            "on a GPU machine (Blackwell to run them)")
    mtq = _modelopt()
    config = model.config
    names = fp8_layer_names(model, config.num_layers)
    cfg = _wan_recipe(mtq.NVFP4_DEFAULT_CFG, config.num_layers)
    batches = list(batches)
    shadow = StaticWanTransformer.from_parameters(config, model.shape, dict(model.named_parameters())).eval()
    shadow.to(model.rope_cos.device)
    with torch.no_grad():
        reference = model(*held_out)
        mtq.quantize(shadow, cfg, forward_loop=lambda m: [m(*b) for b in batches])
        theirs = shadow(*held_out)
    amax = {}
    for name in names:
        quantizer = shadow.get_submodule(name).input_quantizer
        if quantizer.amax is None:
            raise QuantizeError(f"Model Optimizer left {name} uncalibrated; the calibration inputs never reached it")
        amax[name] = float(quantizer.amax.max())
    with torch.no_grad(), emulate(model, amax):
        ours = model(*held_out)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    return Nvfp4Calibration(amax, rel(ours, reference), rel(ours, theirs), len(batches), ours)
