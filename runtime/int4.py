"""INT4 weight-only linear layers: the memory fallback for 24 GB cards.

Weights are 4-bit in groups of 128 input values, asymmetric: per group a bf16 scale and zero with
w ~= (q - 8) * scale + zero, q in 0..15 (the convention of torch's packed int4 matmul); activations
stay bf16. The matmul is torch's own: `_weight_int4pack_mm_for_cpu` on the CPU, `_weight_int4pack_mm`
on CUDA (Ampere or newer), each on the weights packed for it once per device at first use.
The same layers as the FP8 recipe (`runtime.fp8`).

Stored (what the model's parameters hold, device-independent): `weight`, uint8 [out, in / 2], two
values per byte (the even input index in the high nibble), and `weight_scale_and_zeros`, bf16
[in / 128, out, 2]. About 0.53 bytes per weight; the packed copy for the kernel adds 0.5.

The CUDA path is written from torch's operator schema and has not run on a GPU here; if its kernel
refuses, the layer computes the same product from the dequantized weights (slower) and says so once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .errors import WanBuildError
from .fp8 import KEEP_BLOCKS, fp8_layer_names, replace_linears

log = logging.getLogger("wan_build.runtime")
GROUP = 128


class Int4Unsupported(WanBuildError):
    """INT4 asked for where torch has no packed int4 matmul for the device or the layer's shape."""


def quantize_groups(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 [out, in] in 0..15, scales_and_zeros bf16 [in / group, out, 2]) of weight `w`."""
    out_features, in_features = w.shape
    g = w.detach().float().reshape(out_features, in_features // group, group)
    high, low = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((g - low) / scale).clamp(0, 15).to(torch.uint8).reshape(out_features, in_features)
    zero = low + 8 * scale
    return q, torch.stack((scale.reshape(out_features, -1), zero.reshape(out_features, -1)), -1).transpose(0, 1) \
        .contiguous().to(torch.bfloat16)


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(packed.shape[0], -1)


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if in_features % GROUP:
            raise Int4Unsupported(f"INT4 layers group {GROUP} input values; {in_features} is not a multiple")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False)
        self.weight_scale_and_zeros = nn.Parameter(torch.empty(in_features // GROUP, out_features, 2,
                                                               dtype=torch.bfloat16), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False)
        self._packed: dict = {}  # (device, weight version) -> the kernel's packed weights
        self._kernel_failed = False

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias.dtype).to(linear.weight.device)
        q, sz = quantize_groups(linear.weight)
        layer.weight.data, layer.weight_scale_and_zeros.data = pack_pairs(q), sz
        layer.bias.data = linear.bias.detach().clone()
        return layer

    def dequantized(self) -> torch.Tensor:
        """The weights the kernel multiplies by, in fp32 ([out, in])."""
        q = unpack_pairs(self.weight).float().reshape(self.out_features, -1, GROUP)
        scale, zero = self.weight_scale_and_zeros.float().transpose(0, 1).unbind(-1)  # [out, in / group]
        return ((q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(self.out_features, self.in_features)

    def _kernel_weights(self) -> torch.Tensor:
        key = (self.weight.device, self.weight.data_ptr())
        if key not in self._packed:
            self._packed.clear()
            if self.weight.is_cuda:
                self._packed[key] = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), 8)
            else:
                q = unpack_pairs(self.weight).to(torch.int32).contiguous()
                self._packed[key] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        return self._packed[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = None
        if not self._kernel_failed:
            try:
                mm = torch.ops.aten._weight_int4pack_mm if flat.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
                out = mm(flat.contiguous(), self._kernel_weights(), GROUP, self.weight_scale_and_zeros.to(torch.bfloat16))
            except RuntimeError as e:
                self._kernel_failed = True
                log.warning("INT4 layer %dx%d: torch's packed int4 matmul refused (%s); computing from the "
                            "dequantized weights instead (slower)", self.out_features, self.in_features,
                            str(e).splitlines()[0][:160])
        if out is None:
            out = F.linear(flat.float(), self.dequantized()).to(torch.bfloat16)
        return (out.float() + self.bias.float()).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weight-only, group {GROUP}"


def check_int4_device(device: torch.device | str) -> None:
    device = torch.device(device)
    name = "_weight_int4pack_mm" if device.type == "cuda" else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch.ops.aten, name):
        raise Int4Unsupported(f"INT4 layers need torch's {name}, which torch {torch.__version__} lacks")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        raise Int4Unsupported("INT4 layers need a GPU of compute capability 8.0 or newer (Ampere)")


def quantize_int4(model: nn.Module, num_layers: int, keep_blocks: int = KEEP_BLOCKS) -> list[str]:
    """Replace the recipe's linear layers by Int4Linear, in place; returns their names."""
    check_int4_device(next(model.parameters()).device)
    return replace_linears(model, fp8_layer_names(model, num_layers, keep_blocks), Int4Linear.from_linear)


def swap_int4_layers(module: nn.Module, parameters) -> None:
    """Where `parameters` hold an INT4 weight (with its scales and zeros), give `module` an Int4Linear."""
    for name in parameters:
        if name.endswith(".weight_scale_and_zeros"):
            layer = name[: -len(".weight_scale_and_zeros")]
            parent_name, _, leaf = layer.rpartition(".")
            parent = module.get_submodule(parent_name)
            linear = getattr(parent, leaf)
            setattr(parent, leaf, Int4Linear(linear.in_features, linear.out_features, parameters[layer + ".bias"].dtype))
