"""INT8 for TensorRT engines: NVIDIA Model Optimizer calibrates, the ONNX carries INT8 Q/DQ nodes.

1. Calibration: Model Optimizer's INT8 recipe (`mtq.INT8_DEFAULT_CFG`: symmetric int8, per-output-
   channel weight scales, per-tensor activation scales, max calibration) with Wan's recipe of kept
   layers (`builder.quantize.common.wan_recipe`), on fixed-seed inputs or the user's recorded calls.
2. The error of the fake-quantized model against the unquantized one goes into the manifest.
3. The ONNX of the unquantized model gets a QuantizeLinear/DequantizeLinear pair (int8, zero point
   0, scale amax / 127) on each recipe layer's MatMul: per tensor on the activation, per output
   channel on the weight (axis 1 of a MatMul's [in, out] weight, axis 0 of a Gemm's transposed one).
   ONNX's Q/DQ rounds half to even and saturates to [-128, 127], as Model Optimizer's fake
   quantization does, so running the graph in ONNX Runtime checks it against Model Optimizer.
SmoothQuant (`INT8_SMOOTHQUANT_CFG`) is not used: it would add per-channel activation scales in front
of each Q node, and on Wan's random test weights it has nothing to smooth (no outlier channels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from runtime.precision import ONNX_ELEMENT_TYPES
from runtime.static import StaticWanTransformer

from .common import LayerGraph, QuantizeError, calibrate

INT8_MAX = 127.0


@dataclass(frozen=True)
class Int8Calibration:
    input_amax: dict[str, float]  # linear layer -> activation amax (per tensor)
    weight_amax: dict[str, torch.Tensor]  # linear layer -> weight amax per output channel, [out]
    relative_error: float  # fake-quantized model vs unquantized, held-out inputs
    batches: int
    output: torch.Tensor = field(repr=False, compare=False)

    def to_json(self) -> dict:
        return {"layers": len(self.input_amax), "batches": self.batches,
                "relative_error_vs_unquantized": self.relative_error,
                "recipe": "Model Optimizer INT8_DEFAULT_CFG (per-channel weights, per-tensor activations, max "
                          "calibration); patch embedding, condition embedder, proj_out and the first and last "
                          "blocks kept"}


def calibrate_int8(model: StaticWanTransformer, batches: Iterable[tuple[torch.Tensor, ...]],
                   held_out: tuple[torch.Tensor, ...]) -> Int8Calibration:
    """Calibrate `model` in place with Model Optimizer's INT8 recipe; returns the amax and the error."""
    amax, quantized, error, count = calibrate(model, "INT8_DEFAULT_CFG", batches, held_out)
    inputs, weights = {}, {}
    for name, (a, w) in amax.items():
        layer = model.get_submodule(name)
        inputs[name] = float(a.max())
        weights[name] = w.detach().float().reshape(-1).cpu()
        if weights[name].numel() != layer.weight.shape[0]:
            raise QuantizeError(f"{name}: Model Optimizer gave {weights[name].numel()} weight scales for "
                                f"{layer.weight.shape[0]} output channels")
    return Int8Calibration(inputs, weights, error, count, quantized)


def insert_int8_qdq(onnx_path: Path, calibration: Int8Calibration, dtype: torch.dtype,
                    module_name: Callable[[str], str] = lambda s: s.removeprefix("model.")) -> int:
    """Put INT8 Q/DQ pairs on both inputs of each calibrated layer's MatMul; returns the pairs added.
    The weights file is untouched (the graph is loaded without external data and saved in place)."""
    from onnx import helper

    from .fp8 import scalar_initializer

    graph = LayerGraph(onnx_path, calibration.input_amax, ops=("MatMul", "Gemm"), module_name=module_name)
    int8 = ONNX_ELEMENT_TYPES[torch.int8]
    graph.graph.initializer.append(helper.make_tensor("int8_zero_point", int8, [], [0]))
    added = 0
    for node, name in graph.matmuls():
        # the activation: one scale
        tag = f"{name}.input"
        scale = f"{tag}.int8_scale"
        graph.graph.initializer.append(scalar_initializer(scale, max(calibration.input_amax[name], 1e-12) / INT8_MAX,
                                                          dtype))
        graph.emit(helper.make_node("QuantizeLinear", [node.input[0], scale, "int8_zero_point"], [f"{tag}.q"],
                                    name=f"{tag}.QuantizeLinear"))
        graph.emit(helper.make_node("DequantizeLinear", [f"{tag}.q", scale, "int8_zero_point"], [f"{tag}.dq"],
                                    name=f"{tag}.DequantizeLinear"))
        node.input[0] = f"{tag}.dq"
        # the weight: one scale per output channel
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        axis = 0 if transposed else 1
        amax = calibration.weight_amax[name]
        tag = f"{name}.weight"
        scales = (amax.clamp(min=1e-12) / INT8_MAX).to(dtype)
        raw = scales.view(torch.int16 if dtype.itemsize == 2 else torch.int32).numpy().tobytes()
        graph.graph.initializer.append(helper.make_tensor(f"{tag}.int8_scale", ONNX_ELEMENT_TYPES[dtype],
                                                          [scales.numel()], raw, raw=True))
        zeros = helper.make_tensor(f"{tag}.int8_zero_point", int8, [scales.numel()], bytes(scales.numel()), raw=True)
        graph.graph.initializer.append(zeros)
        for op, src, dst in (("QuantizeLinear", node.input[1], f"{tag}.q"), ("DequantizeLinear", f"{tag}.q", f"{tag}.dq")):
            graph.emit(helper.make_node(op, [src, f"{tag}.int8_scale", f"{tag}.int8_zero_point"], [dst],
                                        name=f"{tag}.{op}", axis=axis))
        node.input[1] = f"{tag}.dq"
        added += 1
    graph.save()
    return added
