"""INT8 for TensorRT engines: NVIDIA Model Optimizer calibrates, the ONNX carries INT8 Q/DQ nodes.

1. Calibration: Model Optimizer's INT8 recipes with Wan's recipe of kept layers
   (`builder.quantize.common.wan_recipe`), on fixed-seed inputs or the user's recorded calls:
   `INT8_DEFAULT_CFG` (symmetric int8, per-output-channel weight scales, per-tensor activation
   scales, max calibration) or `INT8_SMOOTHQUANT_CFG` (the same after SmoothQuant: each layer's input
   channels divided by s_j = max|X_j|^a / max|W_j|^(1-a) and its weight columns multiplied by s_j, so
   outlier activation channels stop dictating the per-tensor scale). `smoothquant="auto"` calibrates
   both (the second on a copy of the model) and keeps the one with the lower error on held-out inputs:
   SmoothQuant helps where activations have outlier channels and can hurt where they have none.
2. The error of the fake-quantized model against the unquantized one goes into the manifest, with
   the other recipe's where both ran.
3. The ONNX of the unquantized model gets, on each recipe layer's MatMul, a QuantizeLinear/
   DequantizeLinear pair (int8, zero point 0, scale amax / 127) per tensor on the activation, and per
   output channel on the weight (axis 1 of a MatMul's [in, out] weight, axis 0 of a Gemm's transposed
   one). With SmoothQuant the activation is first multiplied by Model Optimizer's per-channel
   `pre_quant_scale`, and the smoothed weight (a different tensor from the shared 16-bit one) is
   stored already quantized: int8 values in a second external-data file (`INT8_DATA`) behind a
   DequantizeLinear, as TensorRT takes pre-quantized weights. ONNX's Q/DQ rounds half to even and
   saturates to [-128, 127], as Model Optimizer's fake quantization does, so running the graph in
   ONNX Runtime checks it against Model Optimizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from runtime.manifest import INT8_DATA
from runtime.precision import ONNX_ELEMENT_TYPES
from runtime.static import StaticWanTransformer

from ..profiles import SMOOTHQUANT
from .common import LayerGraph, QuantizeError, calibrate

RECIPES = {False: "INT8_DEFAULT_CFG", True: "INT8_SMOOTHQUANT_CFG"}

INT8_MAX = 127.0


@dataclass(frozen=True)
class Int8Calibration:
    input_amax: dict[str, float]  # linear layer -> activation amax (per tensor)
    weight_amax: dict[str, torch.Tensor]  # linear layer -> weight amax per output channel, [out]
    relative_error: float  # fake-quantized model vs unquantized, held-out inputs
    batches: int
    output: torch.Tensor = field(repr=False, compare=False)
    # SmoothQuant: per layer the activation's per-input-channel multiplier and the smoothed [out, in]
    # weight (Model Optimizer's); empty without it
    pre_quant_scale: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    smoothed_weight: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    errors: dict[str, float] = field(default_factory=dict)  # recipe -> relative error, every recipe tried

    @property
    def smoothquant(self) -> bool:
        return bool(self.pre_quant_scale)

    def to_json(self) -> dict:
        recipe = RECIPES[self.smoothquant]
        return {"layers": len(self.input_amax), "batches": self.batches,
                "relative_error_vs_unquantized": self.relative_error, "smoothquant": self.smoothquant,
                "errors_by_recipe": dict(self.errors),
                "recipe": f"Model Optimizer {recipe} (per-channel weights, per-tensor activations, max "
                          "calibration); patch embedding, condition embedder, proj_out and the first and last "
                          "blocks kept"}


def calibrate_int8(model: StaticWanTransformer, batches: Iterable[tuple[torch.Tensor, ...]],
                   held_out: tuple[torch.Tensor, ...], smoothquant: str = "off") -> Int8Calibration:
    """Calibrate `model` in place with Model Optimizer's INT8 recipe; returns the amax and the error.
    `smoothquant`: "off" (INT8_DEFAULT_CFG), "on" (INT8_SMOOTHQUANT_CFG) or "auto" (both, the lower
    held-out error kept; the trial runs on a copy, so it needs a second copy of the model's memory)."""
    if smoothquant not in SMOOTHQUANT:
        raise QuantizeError(f"smoothquant must be one of {', '.join(SMOOTHQUANT)} (got {smoothquant!r})")
    batches = list(batches)
    if smoothquant != "auto":
        return _calibrate(model, batches, held_out, smoothquant == "on")
    import copy

    trial = _calibrate(copy.deepcopy(model), batches, held_out, True)
    plain = _calibrate(model, batches, held_out, False)
    errors = {RECIPES[False]: plain.relative_error, RECIPES[True]: trial.relative_error}
    best = trial if trial.relative_error < plain.relative_error else plain
    return dataclasses.replace(best, errors=errors)


def _calibrate(model: StaticWanTransformer, batches: list, held_out: tuple[torch.Tensor, ...],
               smooth: bool) -> Int8Calibration:
    amax, quantized, error, count = calibrate(model, RECIPES[smooth], batches, held_out)
    inputs, weights, pre_quant, smoothed = {}, {}, {}, {}
    for name, (a, w) in amax.items():
        layer = model.get_submodule(name)
        inputs[name] = float(a.max())
        weights[name] = w.detach().float().reshape(-1).cpu()
        if weights[name].numel() != layer.weight.shape[0]:
            raise QuantizeError(f"{name}: Model Optimizer gave {weights[name].numel()} weight scales for "
                                f"{layer.weight.shape[0]} output channels")
        if smooth:
            scale = getattr(layer.input_quantizer, "pre_quant_scale", None)
            if scale is None or scale.numel() != layer.weight.shape[1]:
                raise QuantizeError(f"{name}: Model Optimizer's SmoothQuant left no per-channel pre-quantization "
                                    f"scale for its {layer.weight.shape[1]} input channels")
            pre_quant[name] = scale.detach().reshape(-1).cpu()
            smoothed[name] = layer.weight.detach().cpu()  # Model Optimizer smoothed it in place
    return Int8Calibration(inputs, weights, error, count, quantized, pre_quant, smoothed,
                           {RECIPES[smooth]: error})


def insert_int8_qdq(onnx_path: Path, calibration: Int8Calibration, dtype: torch.dtype,
                    module_name: Callable[[str], str] = lambda s: s.removeprefix("model.")) -> int:
    """Put INT8 Q/DQ on both inputs of each calibrated layer's MatMul (module docstring); returns the
    layers rewritten. The shared weights file is untouched (the graph is loaded without external data
    and saved in place); SmoothQuant's quantized weights go to a new `INT8_DATA` file beside it. On
    any error no INT8 data file is left."""
    data_path = Path(onnx_path).with_name(INT8_DATA)
    data_path.unlink(missing_ok=True)  # a new file: never write through a hard link into the shared store
    try:
        return _insert(Path(onnx_path), data_path, calibration, dtype, module_name)
    except BaseException:
        data_path.unlink(missing_ok=True)
        raise


def _insert(onnx_path: Path, data_path: Path, calibration: Int8Calibration, dtype: torch.dtype,
            module_name: Callable[[str], str]) -> int:
    import onnx
    from onnx import helper

    from .fp8 import scalar_initializer

    graph = LayerGraph(onnx_path, calibration.input_amax, ops=("MatMul", "Gemm"), module_name=module_name)
    initializers = {init.name: init for init in graph.graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    int8, onnx_dtype = ONNX_ELEMENT_TYPES[torch.int8], ONNX_ELEMENT_TYPES[dtype]
    graph.graph.initializer.append(helper.make_tensor("int8_zero_point", int8, [], [0]))
    dropped: set[str] = set()

    def raw(t: torch.Tensor) -> bytes:
        t = t.contiguous()
        return t.view(torch.int16 if t.dtype.itemsize == 2 else torch.int32).numpy().tobytes() \
            if t.is_floating_point() else t.numpy().tobytes()

    data = open(data_path, "wb") if calibration.smoothquant else None
    try:
        for node, name in graph.matmuls():
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
            axis = 0 if transposed else 1
            # the activation: SmoothQuant's per-channel multiplier, then one scale
            tag = f"{name}.input"
            x = node.input[0]
            if calibration.smoothquant:
                factor = calibration.pre_quant_scale[name].to(dtype)
                graph.graph.initializer.append(helper.make_tensor(f"{tag}.smoothquant", onnx_dtype, [factor.numel()],
                                                                  raw(factor), raw=True))
                graph.emit(helper.make_node("Mul", [x, f"{tag}.smoothquant"], [f"{tag}.smoothed"],
                                            name=f"{tag}.SmoothQuant"))
                x = f"{tag}.smoothed"
            scale = f"{tag}.int8_scale"
            graph.graph.initializer.append(scalar_initializer(scale, max(calibration.input_amax[name], 1e-12) / INT8_MAX,
                                                              dtype))
            graph.emit(helper.make_node("QuantizeLinear", [x, scale, "int8_zero_point"], [f"{tag}.q"],
                                        name=f"{tag}.QuantizeLinear"))
            graph.emit(helper.make_node("DequantizeLinear", [f"{tag}.q", scale, "int8_zero_point"], [f"{tag}.dq"],
                                        name=f"{tag}.DequantizeLinear"))
            node.input[0] = f"{tag}.dq"
            # the weight: one scale per output channel
            tag = f"{name}.weight"
            amax = calibration.weight_amax[name].clamp(min=1e-12)
            scales = (amax / INT8_MAX).to(dtype)
            graph.graph.initializer.append(helper.make_tensor(f"{tag}.int8_scale", onnx_dtype, [scales.numel()],
                                                              raw(scales), raw=True))
            zeros = helper.make_tensor(f"{tag}.int8_zero_point", int8, [scales.numel()], bytes(scales.numel()),
                                       raw=True)
            graph.graph.initializer.append(zeros)
            if not calibration.smoothquant:
                for op, src, dst in (("QuantizeLinear", node.input[1], f"{tag}.q"),
                                     ("DequantizeLinear", f"{tag}.q", f"{tag}.dq")):
                    graph.emit(helper.make_node(op, [src, f"{tag}.int8_scale", f"{tag}.int8_zero_point"], [dst],
                                                name=f"{tag}.{op}", axis=axis))
            else:
                # the smoothed weight, quantized here (half to even, saturated), stored as int8
                weight = calibration.smoothed_weight[name]  # [out, in]
                held = initializers.get(node.input[1])
                want = list(weight.shape) if transposed else [weight.shape[1], weight.shape[0]]
                if held is None or list(held.dims) != want:
                    raise QuantizeError(f"{onnx_path}: the MatMul of {name} does not take its weight as a stored "
                                        f"{want} matrix; cannot write its SmoothQuant weight")
                # in fp32, as Model Optimizer's fake quantization computes (with the scale as the graph stores it)
                codes = torch.round(weight.float() / scales.float().reshape(-1, 1)).clamp(-128, 127).to(torch.int8)
                codes = codes if transposed else codes.t()
                tensor = onnx.TensorProto(name=f"{tag}.int8", data_type=int8, dims=list(codes.shape))
                offset = data.tell()
                data.write(raw(codes))
                data.write(b"\0" * (-data.tell() % 64))
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", INT8_DATA), ("offset", str(offset)), ("length", str(codes.numel()))):
                    tensor.external_data.add(key=key, value=value)
                graph.graph.initializer.append(tensor)
                graph.emit(helper.make_node("DequantizeLinear", [f"{tag}.int8", f"{tag}.int8_scale",
                                                                 f"{tag}.int8_zero_point"], [f"{tag}.dq"],
                                            name=f"{tag}.DequantizeLinear", axis=axis))
                consumers[node.input[1]] -= 1
                if consumers[node.input[1]] == 0:
                    dropped.add(node.input[1])
            node.input[1] = f"{tag}.dq"
    finally:
        if data is not None:
            data.close()
    kept = [init for init in graph.graph.initializer if init.name not in dropped]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    graph.save()
    return len(graph.done)
