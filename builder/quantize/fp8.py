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

NVFP4 lives in `builder.quantize.nvfp4`; what both share (Model Optimizer, the recipe, the walk over
the graph's linear layers) in `builder.quantize.common`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from runtime.fp8 import E4M3_MAX
from runtime.precision import ONNX_ELEMENT_TYPES, ONNX_FLOAT8E4M3FN
from runtime.static import StaticWanTransformer

from .common import LayerGraph, calibrate


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


def calibrate_fp8(model: StaticWanTransformer, batches: Iterable[tuple[torch.Tensor, ...]],
                  held_out: tuple[torch.Tensor, ...]) -> Calibration:
    """Calibrate `model` in place with Model Optimizer; returns the per-layer amax and the error."""
    amax, quantized, error, count = calibrate(model, "FP8_DEFAULT_CFG", batches, held_out)
    return Calibration({n: (float(a.max()), float(w.max())) for n, (a, w) in amax.items()}, error, count, quantized)


def scalar_initializer(name: str, value: float, dtype: torch.dtype):
    """A 0-d ONNX initializer holding `value` in `dtype` (bf16 and fp16 included, which numpy lacks)."""
    from onnx import helper

    raw = torch.tensor(value, dtype=dtype).view(torch.uint8 if dtype.itemsize == 1 else
                                                {2: torch.int16, 4: torch.int32}[dtype.itemsize])
    return helper.make_tensor(name, ONNX_ELEMENT_TYPES[dtype], [], raw.numpy().tobytes(), raw=True)


def insert_fp8_qdq(onnx_path: Path, calibration: Calibration, dtype: torch.dtype,
                   module_name: Callable[[str], str] = lambda s: s.removeprefix("model.")) -> int:
    """Put a FP8 Q/DQ pair before both inputs of each calibrated layer's MatMul; returns the pairs added.
    The weights file is untouched (the graph is loaded without external data and saved in place)."""
    from onnx import helper

    graph = LayerGraph(onnx_path, calibration.amax, ops=("MatMul", "Gemm"), module_name=module_name)
    zero = helper.make_tensor("fp8_zero_point", ONNX_FLOAT8E4M3FN, [], [0])
    graph.graph.initializer.append(zero)
    added = 0
    for node, name in graph.matmuls():
        for slot, amax in zip((0, 1), calibration.amax[name]):
            tag = f"{name}.{'input' if slot == 0 else 'weight'}"
            # The scale is stored in the graph's dtype, as Model Optimizer's exporters write it: a Cast
            # in front of Q/DQ can keep TensorRT from fusing the dequantization into the FP8 GEMM.
            scale = f"{tag}.fp8_scale"
            graph.graph.initializer.append(scalar_initializer(scale, max(amax, 1e-12) / E4M3_MAX, dtype))
            q, dq = f"{tag}.q", f"{tag}.dq"
            graph.emit(helper.make_node("QuantizeLinear", [node.input[slot], scale, zero.name], [q],
                                        name=f"{tag}.QuantizeLinear"))
            graph.emit(helper.make_node("DequantizeLinear", [q, scale, zero.name], [dq],
                                        name=f"{tag}.DequantizeLinear"))
            node.input[slot] = dq
            added += 1
    graph.save()
    return added
