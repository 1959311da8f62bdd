"""FP8 linear layers for the PyTorch backends (eager and AOTInductor), through torch's own
scaled matmul (`torch._scaled_mm`, cuBLASLt FP8 on Ada/Hopper/Blackwell).

Weights are E4M3 with one scale per output channel ("rowwise") or one per tensor ("tensor");
activations are quantized on the fly with one scale per token (rowwise) or per tensor. The
matmul accumulates in fp32 and writes bf16 with the bias fused.

What stays in high precision follows NVIDIA Model Optimizer's Wan recipe: the patch embedding,
the condition embedder (time, text, image), the output projection, and the first and last three
blocks. Inside the other blocks every linear layer is FP8 (self- and cross-attention projections,
the FFN); norms, modulation, attention itself and residuals are untouched.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .errors import WanBuildError

log = logging.getLogger("wan_build.runtime")

E4M3_MAX = 448.0
SCALINGS = ("rowwise", "tensor")
KEEP_BLOCKS = 3  # first and last blocks kept in high precision (Model Optimizer's Wan recipe)


def kept_blocks(num_layers: int, keep_blocks: int = KEEP_BLOCKS) -> int:
    """Blocks kept at each end: the recipe's three, fewer for small models so one block is FP8."""
    return max(0, min(keep_blocks, (num_layers - 1) // 2))


class Fp8Unsupported(WanBuildError):
    """FP8 asked for where the hardware has no FP8 matmul."""


def check_fp8_device(device: torch.device | str) -> None:
    """Refuse FP8 on the CPU and on GPUs without FP8 tensor cores (the minimum is in runtime.precision)."""
    from .precision import Precision

    device = torch.device(device)
    capability = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    problem = Precision.FP8.hardware_problem(device, capability)
    if problem:
        raise Fp8Unsupported(f"FP8 linear layers: {problem}. Use bf16 here.")


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


# Run eagerly, the quantization above is five passes over the activation, three of them in fp32:
# on an H200 at 480p it made the FP8 linear layers slower than bf16 (0.88x, docs/benchmarks.md).
# Compiled (Inductor), it is one kernel per row block for rowwise scaling (read 16-bit, write
# 8-bit) and two for per-tensor scaling. On CUDA the eager path uses the compiled version; inside
# torch.compile / export the plain code is traced, and the surrounding compile fuses it itself.
# The row count is compiled as dynamic (it changes with the resolution; the feature size, which
# the kernel's reduction is specialised for, does not), so a few compiles cover every shape. If
# compiling fails (no Triton, no compiler, a recompile limit), the plain code runs instead.
FUSE_ON_CUDA = True
_compiled: dict = {}
_failed: set = set()


def fused(fn):
    """`fn` compiled once per process (then once per new feature size)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _compiled[fn]


def fused_call(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if fn in _failed:
        return fn(x)
    torch._dynamo.maybe_mark_dynamic(x, 0)
    try:
        return fused(fn)(x)
    except Exception as e:  # noqa: BLE001 - a compile problem must not stop inference
        _failed.add(fn)
        log.warning("FP8 activation quantization runs uncompiled (slower): compiling it failed with %s: %s",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return fn(x)


def _dispatch(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda and FUSE_ON_CUDA and not torch.compiler.is_compiling():
        return fused_call(fn, x)
    return fn(x)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 values and one fp32 scale per row ([..., 1]); x ~= q * scale."""
    return _dispatch(_rows, x)


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 values and one fp32 scale for the whole tensor."""
    return _dispatch(_tensor, x)


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in E4M3: `weight` [out, in] fp8 and `weight_scale` fp32, [1, out] (rowwise,
    paired with per-token activation scales) or [] (tensor, paired with a per-tensor activation scale)."""

    def __init__(self, in_features: int, out_features: int, scaling: str = "rowwise",
                 out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}")
        self.in_features, self.out_features, self.scaling, self.out_dtype = in_features, out_features, scaling, out_dtype
        self._quantize_input = quantize_rows if scaling == "rowwise" else quantize_tensor  # decided once
        self._quantize_plain = _rows if scaling == "rowwise" else _tensor
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                   requires_grad=False)
        scale_shape = (1, out_features) if scaling == "rowwise" else ()
        self.weight_scale = nn.Parameter(torch.ones(scale_shape, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=out_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaling: str = "rowwise",
                    out_dtype: torch.dtype = torch.bfloat16) -> "Fp8Linear":
        layer = cls(linear.in_features, linear.out_features, scaling, out_dtype).to(linear.weight.device)
        q, scale = layer._quantize_plain(linear.weight.detach())  # one scale per output channel, or one
        layer.weight.data = q
        layer.weight_scale.data = scale.reshape(layer.weight_scale.shape)
        layer.bias.data = linear.bias.detach().to(out_dtype)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = self._quantize_input(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=self.out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scaling={self.scaling}"


def fp8_layer_names(model: nn.Module, num_layers: int, keep_blocks: int = KEEP_BLOCKS) -> list[str]:
    """Names of the linear layers the recipe quantizes: every nn.Linear inside blocks
    keep .. num_layers - keep - 1, keep = `kept_blocks(num_layers, keep_blocks)`."""
    keep_blocks = kept_blocks(num_layers, keep_blocks)
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, (nn.Linear, Fp8Linear)) and parts[0] == "blocks":
            if keep_blocks <= int(parts[1]) < num_layers - keep_blocks:
                names.append(name)
    return names


def quantize_fp8(model: nn.Module, num_layers: int, scaling: str = "rowwise", keep_blocks: int = KEEP_BLOCKS,
                 check_device: bool = True) -> list[str]:
    """Replace the recipe's linear layers of a Wan model (front, static model or block stack) by
    Fp8Linear, in place. Returns the names replaced. `check_device=False` skips the hardware check
    (torch can emulate the FP8 matmul on the CPU; used by tests, far too slow for real use)."""
    if check_device:
        check_fp8_device(next(model.parameters()).device)
    return replace_linears(model, fp8_layer_names(model, num_layers, keep_blocks),
                           lambda linear: Fp8Linear.from_linear(linear, scaling))


def replace_linears(model: nn.Module, names: list[str], make) -> list[str]:
    """Replace each nn.Linear named in `names` by `make(linear)`, in place (the FP8, INT8 and INT4
    recipes share their layers); returns `names`."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, leaf)
        if isinstance(linear, nn.Linear):
            setattr(parent, leaf, make(linear))
    return names


def fp8_reference(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """The same computation dequantized in fp32 (what `_scaled_mm` must match up to fp32 rounding)."""
    xq, x_scale = layer._quantize_plain(x.reshape(-1, layer.in_features))
    w = layer.weight.float() * layer.weight_scale.reshape(-1, 1)
    out = F.linear(xq.float() * x_scale, w, layer.bias.float())
    return out.to(layer.out_dtype).reshape(*x.shape[:-1], layer.out_features)
