"""What FP8 and NVFP4 share: Model Optimizer and Wan's recipe, and the walk over an exported graph's
linear layers that both Q/DQ writers make.

Recipe (Model Optimizer's for Wan): the patch embedding, the condition embedder, the output
projection and the first and last blocks stay in high precision (`runtime.fp8.kept_blocks`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Collection, Iterator

from runtime.errors import WanBuildError
from runtime.fp8 import kept_blocks


class QuantizeError(WanBuildError):
    """Quantization cannot run here or failed; the message says why and what to do."""


def modelopt():
    """`modelopt.torch.quantization`, or a QuantizeError saying how to install it."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise QuantizeError(f"FP8 and NVFP4 calibration need NVIDIA Model Optimizer: pip install nvidia-modelopt "
                            f"({e})") from None
    return mtq


def calibrate(model, recipe: str, batches, held_out):
    """Model Optimizer's config `recipe` (e.g. "FP8_DEFAULT_CFG") with Wan's kept layers, applied to
    `model` in place and calibrated on `batches`. Returns (the recipe layers' (input amax, weight amax)
    tensors by name, the fake-quantized output on `held_out`, its relative error against the
    unquantized output, the batch count)."""
    import torch

    from runtime.fp8 import fp8_layer_names

    mtq = modelopt()
    names = sorted(fp8_layer_names(model, model.config.num_layers))
    batches = list(batches)
    with torch.no_grad():
        reference = model(*held_out)
    mtq.quantize(model, wan_recipe(getattr(mtq, recipe), model.config.num_layers),
                 forward_loop=lambda m: [m(*b) for b in batches])
    with torch.no_grad():
        quantized = model(*held_out)
    amax = {}
    for name in names:
        layer = model.get_submodule(name)
        a, w = layer.input_quantizer.amax, layer.weight_quantizer.amax
        if a is None or w is None:
            raise QuantizeError(f"Model Optimizer left {name} uncalibrated; the calibration inputs never reached it")
        amax[name] = (a, w)
    error = ((quantized.float() - reference.float()).norm() / reference.float().norm()).item()
    return amax, quantized, error, len(batches)


def wan_recipe(base: dict, num_layers: int) -> dict:
    """Model Optimizer config `base` with Wan's recipe: patch embedding, condition embedder, output
    projection and the first and last blocks left unquantized."""
    keep = kept_blocks(num_layers)
    cfg = copy.deepcopy(base)
    kept = ["*patch_embedding*", "*condition_embedder*", "*proj_out*"]
    kept += [f"blocks.{i}.*" for i in range(num_layers) if i < keep or i >= num_layers - keep]
    cfg["quant_cfg"] += [{"quantizer_name": pattern, "enable": False} for pattern in kept]
    return cfg


def node_scope(node) -> str | None:
    """The module path of the call a node came from (the exporter records the scope stack, ending
    with the op's own name)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            modules = [s for s in json.loads(prop.value.replace("'", '"')) if s.startswith("model.")]
            return modules[-1] if modules else None
    return None


class LayerGraph:
    """An exported graph, loaded without its weights, walked by the model layer each MatMul came from.

        graph = LayerGraph(path, layers)
        for node, name in graph.matmuls():   # the first MatMul of each listed layer, in graph order
            graph.emit(...)                  # new nodes go right before `node`
        graph.save()                         # QuantizeError if a listed layer had no MatMul
    """

    def __init__(self, path: Path, layers: Collection[str], ops: tuple[str, ...] = ("MatMul",),
                 scope_of: Callable = node_scope,
                 module_name: Callable[[str], str] = lambda s: s.removeprefix("model.")):
        import onnx

        self.path = Path(path)
        self.model = onnx.load(str(path), load_external_data=False)
        self.graph = self.model.graph
        self.layers, self.ops = set(layers), ops
        self.scope_of, self.module_name = scope_of, module_name
        self.done: set[str] = set()
        self._nodes: list = []

    def emit(self, node) -> None:
        self._nodes.append(node)

    def matmuls(self) -> Iterator[tuple[object, str]]:
        for node in list(self.graph.node):
            name = self.module_name(self.scope_of(node) or "")
            if node.op_type in self.ops and name in self.layers and name not in self.done:
                yield node, name
                self.done.add(name)
            self._nodes.append(node)

    def save(self) -> None:
        import onnx

        missing = sorted(self.layers - self.done)
        if missing:
            raise QuantizeError(f"{self.path}: no MatMul found for {', '.join(missing[:4])}; the export's name "
                                "scopes do not match the model's layer names")
        del self.graph.node[:]
        self.graph.node.extend(self._nodes)
        onnx.save(self.model, str(self.path))
