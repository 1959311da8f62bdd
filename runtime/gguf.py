"""GGUF checkpoints: the quantized Wan files the community ships (Q8_0 ... Q2_K), read without
dequantizing them.

A GGUF file holds each tensor in one ggml type. Float tensors (F32, F16, BF16) become ordinary
tensors. A quantized tensor that is the weight of a linear layer stays quantized: its raw blocks
(`<layer>.weight`, uint8, one row of blocks per output channel) and its type
(`<layer>.weight_gguf_type`, an int32 scalar) go to the model, whose `GgufLinear` dequantizes it at
each use, so a model in memory is about the file's size plus one dequantized layer. Any other
quantized tensor (a norm, a modulation table, the patch embedding) is dequantized once at load.

Dequantization: the legacy block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and the K-quants (Q2_K to
Q6_K) are computed here in torch, on the weights' device, from the ggml block layouts; every other
type the `gguf` package knows (IQ types, ternary ones) through that package's own numpy dequantizer
on the CPU. The block scales are float16 in the file; their products
with the quantized values are computed in float16, as diffusers' GGUF loader computes them (its
`GGUFLinear`), so both give one model; the float32 products of the `gguf` package differ from them by
float16 rounding (about 1e-4 relative per weight).

Key layouts: the original Wan names of community files (`blocks.0.self_attn.q.weight`, with or
without a `model.diffusion_model.` prefix) or diffusers names. Tensors with more than 4 dimensions
(the patch embedding) are stored flattened with their shape in `comfy.gguf.orig_shape.<name>`, the
convention of ComfyUI-GGUF, and restored here.

`gguf` is an optional extra (`pip install wan-build[gguf]`), imported only when a GGUF file is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import WeightsError

from .weights import GGUF_TYPE as TYPE_SUFFIX  # `<layer>.weight_gguf_type`: the ggml type of a quantized weight
SHAPE_KEY = "comfy.gguf.orig_shape."
ARCHITECTURES = ("wan",)
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # computed in torch here


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise WeightsError("reading GGUF files needs the gguf package: pip install gguf "
                           "(or the wan-build[gguf] extra)") from None
    return gguf


def block_sizes(qtype: int) -> tuple[int, int]:
    """(values per block, bytes per block) of ggml type `qtype`."""
    gguf = gguf_module()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]


def type_name(qtype: int) -> str:
    return gguf_module().GGMLQuantizationType(qtype).name


def raw_shape(shape: tuple[int, ...], qtype: int) -> tuple[int, ...]:
    """The byte shape of a quantized tensor of `shape`: rows of blocks."""
    per_block, nbytes = block_sizes(qtype)
    return (*shape[:-1], shape[-1] // per_block * nbytes)


def logical_shape(raw: tuple[int, ...], qtype: int) -> tuple[int, ...]:
    per_block, nbytes = block_sizes(qtype)
    return (*raw[:-1], raw[-1] // nbytes * per_block)


# -- dequantization ---------------------------------------------------------------------------------
def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start:start + 2].contiguous().view(torch.float16)  # [n, 1]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] values: the low nibbles of every byte, then the high ones."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32]: bit j of it as the fifth bit of value j."""
    bits = torch.arange(32, device=qh.device)
    word = qh.to(torch.int64)
    word = word[:, 0] | word[:, 1] << 8 | word[:, 2] << 16 | word[:, 3] << 24
    return ((word.unsqueeze(1) >> bits) & 1).to(torch.uint8) << 4


def _legacy(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """Blocks [n, bytes] of a legacy type -> values [n, 32] (float16 arithmetic, see the module doc)."""
    if name == "Q8_0":
        return _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8)
    if name == "Q4_0":
        return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8)
    if name == "Q4_1":
        return _f16(blocks, 0) * _nibbles(blocks[:, 4:]) + _f16(blocks, 2)
    if name == "Q5_0":
        q = (_nibbles(blocks[:, 6:]) | _high_bits(blocks[:, 2:6])).to(torch.int8) - 16
        return _f16(blocks, 0) * q
    if name == "Q5_1":
        q = _nibbles(blocks[:, 8:]) | _high_bits(blocks[:, 4:8])
        return _f16(blocks, 0) * q + _f16(blocks, 2)
    raise ValueError(name)


def _k_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    lo, mid, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = torch.cat((lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)), dim=1)
    mins = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=1)
    return scales, mins


def _two_bits(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K: [n, 64] bytes -> [n, 16, 16]: halves of 32 bytes, four 2-bit planes each, 16 per row."""
    shifts = torch.tensor([0, 2, 4, 6], device=qs.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 16, 16)


def _k_quant(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """Blocks [n, bytes] of a K-quant -> values [n, 256], in the ggml reference's order of
    operations with the float16 scales multiplied in float16 (see the module doc)."""
    n = blocks.shape[0]
    if name == "Q2_K":
        scales, d, dmin = blocks[:, :16], _f16(blocks, 80), _f16(blocks, 82)
        q = _two_bits(blocks[:, 16:80])
        y = (d * (scales & 0x0F)).unsqueeze(-1) * q - (dmin * (scales >> 4)).unsqueeze(-1)
    elif name == "Q3_K":
        hmask, sc, d = blocks[:, :32], blocks[:, 96:108], _f16(blocks, 108)
        a0, a1, t = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
        scales = torch.cat(((a0 & 0x0F) | ((t & 3) << 4), (a1 & 0x0F) | (((t >> 2) & 3) << 4),
                            (a0 >> 4) | (((t >> 4) & 3) << 4), (a1 >> 4) | (((t >> 6) & 3) << 4)), dim=1)
        bits = torch.arange(8, device=blocks.device, dtype=torch.uint8).reshape(1, 2, 4, 1)  # bit 4h + j
        high = ((hmask.reshape(n, 1, 1, 32) >> bits) & 1).reshape(n, 16, 16).to(torch.int8)
        q = _two_bits(blocks[:, 32:96]).to(torch.int8) - 4 * (1 - high)
        y = (d * (scales.to(torch.int8) - 32)).unsqueeze(-1) * q
    elif name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        scales, mins = _k_scales(blocks[:, 4:16])
        qs = blocks[:, 16:144] if name == "Q4_K" else blocks[:, 48:176]
        q = torch.stack((qs.reshape(n, 4, 32) & 0x0F, qs.reshape(n, 4, 32) >> 4), dim=2).reshape(n, 8, 32)
        if name == "Q5_K":
            bits = torch.arange(8, device=blocks.device, dtype=torch.uint8).reshape(1, 8, 1)
            q = q | (((blocks[:, 16:48].reshape(n, 1, 32) >> bits) & 1) << 4)
        y = (d * scales).unsqueeze(-1) * q - (dmin * mins).unsqueeze(-1)
    elif name == "Q6_K":
        ql, qh = blocks[:, :128].reshape(n, 2, 2, 32), blocks[:, 128:192].reshape(n, 2, 1, 32)
        sc, d = blocks[:, 192:208].contiguous().view(torch.int8).reshape(n, 2, 4, 2), _f16(blocks, 208)
        low = torch.stack((ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4), dim=2)
        shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
        q = ((low | (((qh >> shifts) & 3) << 4)).to(torch.int8) - 32).reshape(n, 2, 4, 2, 16)
        y = (d.reshape(n, 1, 1, 1, 1) * sc.unsqueeze(-1)) * q
    else:
        raise ValueError(name)
    return y.reshape(n, 256)


K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # computed in torch here, like LEGACY


def dequantize(raw: torch.Tensor, qtype: int, dtype: torch.dtype) -> torch.Tensor:
    """A quantized tensor's raw bytes [..., row bytes] (uint8) -> its values [..., row] in `dtype`."""
    gguf = gguf_module()
    kind = gguf.GGMLQuantizationType(int(qtype))
    shape = logical_shape(tuple(raw.shape), int(qtype))
    if kind.name in FLOAT_TYPES:
        return raw.contiguous().view(FLOAT_TYPES[kind.name]).reshape(shape).to(dtype)
    per_block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    if kind.name in LEGACY or kind.name in K_QUANTS:
        blocks = raw.reshape(-1, nbytes)
        values = _legacy(blocks, kind.name) if kind.name in LEGACY else _k_quant(blocks, kind.name)
        return values.reshape(shape).to(dtype)
    data = raw.detach().to("cpu").contiguous().numpy()
    try:
        values = gguf.quants.dequantize(data, kind)
    except NotImplementedError:
        raise WeightsError(f"ggml type {kind.name} cannot be dequantized by the gguf package installed") from None
    return torch.from_numpy(values).reshape(shape).to(device=raw.device, dtype=dtype)


class GgufLinear(nn.Module):
    """A linear layer whose weight stays in its GGUF blocks; dequantized at every call to the input's
    dtype (the bias is a plain tensor)."""

    def __init__(self, in_features: int, out_features: int, qtype: int, bias_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = raw_shape((out_features, in_features), qtype)
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.uint8), requires_grad=False)
        self.weight_gguf_type = nn.Parameter(torch.tensor(qtype, dtype=torch.int32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, int(self.weight_gguf_type), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias.to(x.dtype))


def is_quantized(tensors: Mapping[str, torch.Tensor], name: str) -> bool:
    return name + TYPE_SUFFIX in tensors


def has_quantized(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(name.endswith(TYPE_SUFFIX) for name in tensors)


def logical_view(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with each quantized weight replaced by an empty (meta) tensor of its logical shape,
    for code that reads shapes only (config inference)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(TYPE_SUFFIX):
            continue
        out[name] = (torch.empty(logical_shape(tuple(t.shape), int(tensors[name + TYPE_SUFFIX])), device="meta")
                     if is_quantized(tensors, name) else t)
    return out


def swap_gguf_layers(module: nn.Module, parameters: Mapping[str, torch.Tensor]) -> None:
    """Where `parameters` hold a GGUF-quantized weight, give `module` a GgufLinear of its type."""
    for name, value in parameters.items():
        if name.endswith(".weight" + TYPE_SUFFIX):
            layer = name[: -len(".weight" + TYPE_SUFFIX)]
            parent_name, _, leaf = layer.rpartition(".")
            parent = module.get_submodule(parent_name)
            linear = getattr(parent, leaf)
            bias = parameters.get(layer + ".bias")
            setattr(parent, leaf, GgufLinear(linear.in_features, linear.out_features, int(value),
                                             bias.dtype if bias is not None else torch.float32))


def expected_shapes(shapes: Mapping[str, torch.Size], tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """The parameter shapes of a model whose quantized weights (per `tensors`) stay in their blocks:
    byte rows for those weights, plus their type scalars."""
    out: dict[str, tuple] = {k: tuple(v) for k, v in shapes.items()}
    for name in shapes:
        if is_quantized(tensors, name):
            out[name] = raw_shape(tuple(shapes[name]), int(tensors[name + TYPE_SUFFIX]))
            out[name + TYPE_SUFFIX] = ()
    return out


def dequantize_all(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every quantized weight dequantized (to `dtype`, float32 by default), the type scalars dropped."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(TYPE_SUFFIX):
            continue
        out[name] = dequantize(t, int(tensors[name + TYPE_SUFFIX]), dtype or torch.float32) \
            if is_quantized(tensors, name) else t
    return out


# -- reading ------------------------------------------------------------------------------------------
def read_gguf(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors under the file's own names, the types by name) of a GGUF file: float tensors and
    dequantized small ones as tensors (views of a private memory map where possible), quantized
    2-D weights as their raw blocks plus `<name>_gguf_type` (see the module doc)."""
    gguf = gguf_module()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path, "c")
    except Exception as e:  # the gguf package raises ValueError, IndexError, struct errors on damaged files
        raise WeightsError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:160]}); "
                           "it may be truncated or damaged") from None
    arch = reader.fields.get("general.architecture")
    if arch is not None:
        name = str(arch.contents())
        if name not in ARCHITECTURES:
            raise WeightsError(f"{path}: a GGUF file of architecture {name!r}, not a Wan transformer "
                               f"(general.architecture must be {' or '.join(ARCHITECTURES)})")
    known = {t.name for t in gguf.GGMLQuantizationType}
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        kind = t.tensor_type
        if kind.name not in known:
            raise WeightsError(f"{path}: tensor {t.name!r} has ggml type {kind} which this reader does not know")
        data = torch.from_numpy(t.data)
        stored = tuple(int(s) for s in reversed(t.shape))  # ggml lists the fastest dimension first
        field = reader.fields.get(SHAPE_KEY + t.name)
        shape = tuple(int(s) for s in field.contents()) if field is not None else stored
        types[t.name] = kind.name
        if kind.name in ("F32", "F16"):
            tensors[t.name] = data.reshape(shape)
            continue
        if kind.name == "BF16":
            tensors[t.name] = data.contiguous().view(torch.bfloat16).reshape(shape)
            continue
        qtype = int(kind)
        if len(shape) == 2 and t.name.endswith(".weight"):  # a linear weight, kept in its blocks
            tensors[t.name] = data.reshape(raw_shape(shape, qtype))
            tensors[t.name + TYPE_SUFFIX] = torch.tensor(qtype, dtype=torch.int32)
        else:
            try:
                values = dequantize(data.reshape(raw_shape(stored, qtype)), qtype, torch.float32)
            except (RuntimeError, ValueError) as e:
                raise WeightsError(f"{path}: tensor {t.name!r} ({kind.name}, shape {list(stored)}) cannot be read: "
                                   f"{str(e)[:120]}") from None
            tensors[t.name] = values.reshape(shape)
    return tensors, types
