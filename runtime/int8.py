"""INT8 linear layers (W8A8) for GPUs without FP8 (A100, A10, RTX 30xx) and for CPUs.

Weights are int8 with one fp32 scale per output channel (symmetric, max-abs / 127); activations are
quantized on the fly with one scale per token; the product accumulates in int32 (`torch._int_mm`,
int8 tensor cores on CUDA, VNNI/AMX on x86 CPUs) and is rescaled in fp32, with the bias added, to the
input's dtype. The same layers as the FP8 recipe (`runtime.fp8`: every linear layer inside the
middle blocks; the first and last three blocks, embeddings and head stay in the base dtype).

`torch._int_mm` needs, on CUDA, more than 16 rows and sizes that are multiples of 8: a Wan call has
thousands of tokens and dims that are multiples of 128; smaller inputs fall back to an int32 matmul
of the same integers (the same result, slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import WanBuildError
from .fp8 import KEEP_BLOCKS, fp8_layer_names, replace_linears

INT8_MAX = 127.0


class Int8Unsupported(WanBuildError):
    """INT8 asked for where this torch has no int8 matmul."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and one fp32 scale per row ([..., 1]); x ~= q * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / INT8_MAX
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] x int8 [k, n] -> int32 [m, n]."""
    m, k = a.shape
    n = b.shape[1]
    if a.is_cuda and (m <= 16 or k % 8 or n % 8):
        return a.to(torch.int32) @ b.to(torch.int32)
    return torch._int_mm(a, b)


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8: `weight` [out, in] int8, `weight_scale` fp32 [out], `bias` in the
    base dtype."""

    def __init__(self, in_features: int, out_features: int, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias.dtype).to(linear.weight.device)
        q, scale = quantize_rows(linear.weight.detach())
        layer.weight.data, layer.weight_scale.data = q, scale.reshape(-1)
        layer.bias.data = linear.bias.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        acc = int_mm(xq, self.weight.t())
        out = acc.float() * x_scale * self.weight_scale + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 W8A8"


def int8_reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The same computation dequantized in fp32 (what the int32 matmul must match exactly, up to the
    fp32 rounding of the rescale)."""
    xq, x_scale = quantize_rows(x.reshape(-1, layer.in_features))
    w = layer.weight.float() * layer.weight_scale.reshape(-1, 1)
    out = F.linear(xq.float() * x_scale, w, layer.bias.float())
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def check_int8_device(device: torch.device | str) -> None:
    if not hasattr(torch, "_int_mm"):
        raise Int8Unsupported(f"INT8 linear layers need torch._int_mm, which torch {torch.__version__} lacks")
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 5):
        raise Int8Unsupported("INT8 linear layers need a GPU of compute capability 7.5 or newer (Turing)")


def quantize_int8(model: nn.Module, num_layers: int, keep_blocks: int = KEEP_BLOCKS) -> list[str]:
    """Replace the recipe's linear layers of a Wan model by Int8Linear, in place; returns their names."""
    check_int8_device(next(model.parameters()).device)
    return replace_linears(model, fp8_layer_names(model, num_layers, keep_blocks), Int8Linear.from_linear)


def swap_int8_layers(module: nn.Module, parameters) -> None:
    """Where `parameters` hold an int8 weight with its scale, give `module` an Int8Linear."""
    for name, value in parameters.items():
        if name.endswith(".weight") and value.dtype == torch.int8 and name[: -len("weight")] + "weight_scale" in parameters:
            parent_name, _, leaf = name[: -len(".weight")].rpartition(".")
            parent = module.get_submodule(parent_name)
            linear = getattr(parent, leaf)
            bias = parameters[name[: -len("weight")] + "bias"]
            setattr(parent, leaf, Int8Linear(linear.in_features, linear.out_features, bias.dtype))
