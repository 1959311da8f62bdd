"""NVFP4: 4-bit E2M1 values in blocks of 16 along the reduction axis, one FP8 (E4M3) scale per block,
one FP32 scale per tensor. What TensorRT runs on Blackwell's FP4 tensor cores, written as Q/DQ nodes.

Numbers (the same recipe as NVIDIA Model Optimizer's NVFP4 and TensorRT's dynamic FP4 quantization):

    global = amax / (6 * 448)                     per tensor; amax from calibration (activations)
                                                  or from the weight itself
    block  = fp8_e4m3(block_amax / 6 / global)    per 16 values, clamped to [2**-9, 448]; 0 -> 1
    value  = e2m1(x / (block * global))           round to nearest, ties to even, clamped to +-6

The ONNX form, per quantized linear layer (MatMul(x, W^T), W stored [out, in]):

    activation: x -> trt::TRT_FP4DynamicQuantize(x, global_x) -> (x_fp4, scale_fp8)
                scale = DequantizeLinear(scale_fp8, global_x)
                x'    = DequantizeLinear(x_fp4, scale, axis=-1, block_size=16)
    weight:     W' = DequantizeLinear(W_fp4 [out, in], DequantizeLinear(W_scale_fp8, global_w),
                                      axis=-1, block_size=16);  Transpose(W') -> MatMul

`TRT_FP4DynamicQuantize` is TensorRT's own ONNX operator (domain `trt`, imported as its
DynamicQuantize layer: fp32/fp16/bf16 input of rank 2 or 3, which every quantized Wan linear input
is, blocks of 16 on the last axis, FP4 output, FP8 scales, an fp32 build-time-constant scale;
TensorRT operator documentation, "DynamicQuantize"); the two-level
DequantizeLinear is standard ONNX (opset 23: FLOAT4E2M1 with blocked scales). This is the layout
Model Optimizer's NVFP4 exporter writes. The FP4 weights go to a second external-data file next to
the graph, `model.nvfp4.data`, shared between the shapes of one expert like the 16-bit weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from runtime.fp8 import E4M3_MAX, fp8_layer_names
from runtime.manifest import FP4_DATA
from runtime.precision import ONNX_ELEMENT_TYPES, ONNX_FLOAT, ONNX_FLOAT4E2M1, ONNX_FLOAT8E4M3FN
from runtime.static import StaticWanTransformer

from .common import LayerGraph, QuantizeError, modelopt, node_scope, wan_recipe

BLOCK = 16
E2M1_MAX = 6.0
TRT_DOMAIN = "trt"
DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Midpoints between neighbours; a value exactly on one rounds to the even code (the lower one for
# 0.25, 1.25, 2.5, 5; the upper one for 0.75, 1.75, 3.5).
_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_TIES_UP = torch.tensor([0.75, 1.75, 3.5])

class Nvfp4Error(QuantizeError):
    """A layer cannot be written in NVFP4; the message names it and says why."""


def global_scale(amax: float | torch.Tensor) -> torch.Tensor:
    """The per-tensor FP32 scale: amax / (6 * 448); 1 where amax is 0 (an all-zero tensor)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit codes (sign << 3 | magnitude index) of already scaled values, round to nearest even."""
    magnitude = x.abs().float().clamp(max=E2M1_MAX)
    index = torch.bucketize(magnitude, _MIDPOINTS.to(x.device))  # how many midpoints lie below
    index += torch.isin(magnitude, _TIES_UP.to(x.device))
    return ((x < 0).to(torch.uint8) << 3) | index.to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    values = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -values, values)


def _blocks(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise Nvfp4Error(f"{what}: the last dimension ({x.shape[-1]}) is not a multiple of the NVFP4 block "
                         f"size {BLOCK}; keep this layer in 16-bit")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def quantize(x: torch.Tensor, scale: torch.Tensor, what: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, block scales): uint8 codes shaped like `x`, FP8 E4M3 scales shaped [..., K / 16]."""
    blocks = _blocks(x, what)
    block = blocks.abs().amax(-1) / (E2M1_MAX * scale)
    block = torch.where(block == 0, torch.ones_like(block), block)
    block = block.clamp(min=2.0 ** -9, max=E4M3_MAX).to(torch.float8_e4m3fn)
    codes = e2m1_codes(blocks / (block.float() * scale).unsqueeze(-1))
    return codes.reshape(x.shape), block


def dequantize(codes: torch.Tensor, block: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    values = _blocks(e2m1_decode(codes), "codes")
    return (values * (block.float() * scale).unsqueeze(-1)).reshape(codes.shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x through NVFP4 and back, in x's dtype: what the engine's Q/DQ pair computes."""
    return dequantize(*quantize(x, scale), scale).to(x.dtype)


def pack(codes: torch.Tensor) -> bytes:
    """Two codes per byte, the first in the low nibble, in row-major order (ONNX's FLOAT4E2M1)."""
    flat = codes.flatten()
    if flat.numel() % 2:
        raise Nvfp4Error("an odd number of FP4 values cannot be packed two per byte")
    return (flat[0::2] | (flat[1::2] << 4)).contiguous().numpy().tobytes()


class _FakeQuantLinear(nn.Module):
    """A linear layer computing what the NVFP4 engine does: dynamic FP4 input, FP4 weight."""

    def __init__(self, linear: nn.Linear, input_amax: float):
        super().__init__()
        self.linear = linear
        self.input_scale = global_scale(input_amax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weight is fake-quantized per call, so emulating a 14B model holds no second copy of it
        weight = self.linear.weight.detach()
        weight = fake_quantize(weight, global_scale(weight.abs().amax()).to(weight.device))
        return nn.functional.linear(fake_quantize(x, self.input_scale.to(x.device)), weight, self.linear.bias)


class emulate:
    """`with emulate(model, input_amax): model(...)` runs the layers in `input_amax` the NVFP4 way;
    the model is restored on exit."""

    def __init__(self, model: nn.Module, input_amax: Mapping[str, float]):
        self.model, self.input_amax = model, input_amax
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def __enter__(self) -> nn.Module:
        try:
            for name, amax in self.input_amax.items():
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                linear = getattr(parent, child)
                setattr(parent, child, _FakeQuantLinear(linear, amax))
                self._swapped.append((parent, child, linear))
        except BaseException:
            self.__exit__()
            raise
        return self.model

    def __exit__(self, *exc) -> None:
        for parent, child, linear in reversed(self._swapped):
            setattr(parent, child, linear)
        self._swapped.clear()


def observe_input_amax(model: nn.Module, names: list[str], batches) -> dict[str, float]:
    """Max calibration: the largest |input| each named layer sees over `batches`."""
    amax = dict.fromkeys(names, 0.0)
    hooks = []
    for name in names:
        def hook(module, args, name=name):
            amax[name] = max(amax[name], float(args[0].detach().abs().amax()))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for h in hooks:
            h.remove()
    return amax


def insert_nvfp4_qdq(onnx_path: Path, input_amax: Mapping[str, float], weights: Mapping[str, torch.Tensor],
                     dtype: torch.dtype, scope_of: Callable | None = None,
                     module_name: Callable[[str], str] = lambda s: s.removeprefix("model.")) -> int:
    """Rewrite each listed layer's MatMul of `onnx_path` to NVFP4 (module docstring); returns the
    layers rewritten. `weights[name]` is the layer's [out, in] weight; the 16-bit copy the graph held
    is dropped from the graph (its bytes stay in the shared 16-bit data file, which other entries use).
    On any error the graph is untouched and no FP4 data file is left."""
    data_path = onnx_path.with_name(FP4_DATA)
    data_path.unlink(missing_ok=True)  # a new file: never write through a hard link into the shared store
    try:
        return _insert(onnx_path, data_path, input_amax, weights, dtype, scope_of or node_scope, module_name)
    except BaseException:
        data_path.unlink(missing_ok=True)
        raise


def _insert(onnx_path: Path, data_path: Path, input_amax: Mapping[str, float], weights: Mapping[str, torch.Tensor],
            dtype: torch.dtype, scope_of: Callable, module_name: Callable[[str], str]) -> int:
    import onnx
    from onnx import helper, numpy_helper

    import numpy as np

    layers = LayerGraph(onnx_path, input_amax, scope_of=scope_of, module_name=module_name)
    model, graph = layers.model, layers.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    onnx_dtype = ONNX_ELEMENT_TYPES[dtype]
    dropped = set()

    with open(data_path, "wb") as data:
        def external(name: str, data_type: int, dims: list[int], raw: bytes):
            tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
            offset = data.tell()
            data.write(raw)
            data.write(b"\0" * (-data.tell() % 64))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", FP4_DATA), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
            graph.initializer.append(tensor)

        def scalar(name: str, value: float) -> str:
            graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
            return name

        def double_dq(tag: str, values: str, scales: str, scale: str) -> str:
            """FP32 scales; the values' DequantizeLinear writes the graph's dtype itself (opset 23's
            output_dtype), so it feeds the MatMul with no Cast between them: a Cast there can keep
            TensorRT from fusing the dequantization into the FP4 GEMM. The emulation rounds the same
            way (dequantize in fp32, then round to the graph's dtype)."""
            layers.emit(helper.make_node("DequantizeLinear", [scales, scale], [f"{tag}.block_scale"],
                                         name=f"{tag}.DequantizeScale"))
            extra = {} if onnx_dtype == ONNX_FLOAT else {"output_dtype": onnx_dtype}
            layers.emit(helper.make_node("DequantizeLinear", [values, f"{tag}.block_scale"], [f"{tag}.dq"],
                                         name=f"{tag}.DequantizeLinear", axis=-1, block_size=BLOCK, **extra))
            return f"{tag}.dq"

        for node, name in layers.matmuls():
            weight = weights[name].detach().float().cpu()
            held = initializers.get(node.input[1])
            if held is None or list(held.dims) != [weight.shape[1], weight.shape[0]]:
                raise Nvfp4Error(f"{onnx_path}: the MatMul of {name} does not take its weight as a stored "
                                 f"[in, out] matrix; cannot write it in NVFP4")
            # activation: dynamic FP4 at run time, the calibrated per-tensor scale
            tag = f"{name}.input"
            x_scale = scalar(f"{tag}.global_scale", float(global_scale(input_amax[name])))
            layers.emit(helper.make_node(DYNAMIC_QUANTIZE, [node.input[0], x_scale],
                                         [f"{tag}.fp4", f"{tag}.fp8_scale"], name=f"{tag}.{DYNAMIC_QUANTIZE}",
                                         domain=TRT_DOMAIN, axis=-1, block_size=BLOCK, scale_type=ONNX_FLOAT8E4M3FN))
            # the custom op's output types, so ONNX type inference can check the rest of the graph
            graph.value_info.extend([helper.make_tensor_value_info(f"{tag}.fp4", ONNX_FLOAT4E2M1, None),
                                     helper.make_tensor_value_info(f"{tag}.fp8_scale", ONNX_FLOAT8E4M3FN, None)])
            x = double_dq(tag, f"{tag}.fp4", f"{tag}.fp8_scale", x_scale)
            # weight: FP4 values and FP8 block scales stored, [out, in], then transposed
            tag = f"{name}.weight"
            w_scale = global_scale(weight.abs().amax())
            codes, block = quantize(weight, w_scale, name)
            external(f"{tag}.fp4", ONNX_FLOAT4E2M1, list(weight.shape), pack(codes))
            external(f"{tag}.fp8_scale", ONNX_FLOAT8E4M3FN, list(block.shape),
                     block.view(torch.uint8).contiguous().numpy().tobytes())
            w = double_dq(tag, f"{tag}.fp4", f"{tag}.fp8_scale", scalar(f"{tag}.global_scale", float(w_scale)))
            layers.emit(helper.make_node("Transpose", [w], [f"{tag}.t"], perm=[1, 0], name=f"{tag}.Transpose"))
            consumers[node.input[1]] -= 1
            if consumers[node.input[1]] == 0:
                dropped.add(node.input[1])
            node.input[0], node.input[1] = x, f"{tag}.t"
    if layers.layers - layers.done:
        missing = sorted(layers.layers - layers.done)
        raise Nvfp4Error(f"{onnx_path}: no MatMul found for {', '.join(missing[:4])}; the export's name "
                         "scopes do not match the model's layer names")
    kept = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == TRT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
    layers.save()
    return len(layers.done)


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
    if model.rope_cos.device.type != "cuda":
        raise QuantizeError("NVFP4 calibration needs CUDA: Model Optimizer's NVFP4 quantizers run on a GPU "
                            "(on the CPU they stop with \"amax must be a CUDA tensor\"); build NVFP4 entries "
                            "on a GPU machine (Blackwell to run them)")
    mtq = modelopt()
    config = model.config
    names = fp8_layer_names(model, config.num_layers)
    cfg = wan_recipe(mtq.NVFP4_DEFAULT_CFG, config.num_layers)
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
