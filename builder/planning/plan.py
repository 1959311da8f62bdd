"""What a model costs at a shape: parameters, weight memory, FLOPs (wan-architecture sections 8-9).

FLOPs count a multiply-add as 2 and ignore norms, softmax, RoPE and other elementwise work (under
about 1%), exactly as the model card does, so the figures can be checked against it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from runtime.config import WanConfig, latent_size
from runtime.fp8 import kept_blocks
from runtime.precision import Precision
from runtime.static import StaticShape, parameter_shapes


def parameter_count(config: WanConfig) -> int:
    return sum(s.numel() for s in parameter_shapes(config).values())


# Bytes per weight of the formats that are no engine precision: INT4 weight-only (half a byte, a bf16
# scale and zero per 128) and GGUF block types (ggml's block bytes over its values per block).
WEIGHT_ONLY_BYTES = {"int4": 0.5 + 4 / 128, "Q8_0": 34 / 32, "Q5_1": 24 / 32, "Q5_0": 22 / 32, "Q4_1": 20 / 32,
                     "Q4_0": 18 / 32, "Q6_K": 210 / 256, "Q5_K": 176 / 256, "Q4_K": 144 / 256, "Q3_K": 110 / 256,
                     "Q2_K": 84 / 256}
GGUF_TYPES = tuple(k for k in WEIGHT_ONLY_BYTES if k != "int4")


@functools.lru_cache(maxsize=256)

def weight_bytes(config: WanConfig, precision: str) -> float:
    """Weights of one expert at `precision` (an engine precision, "int4", or a GGUF type). Quantized
    precisions and int4 apply to the linear weights of the middle blocks only: embeddings, head, norms
    and the first and last blocks stay 16-bit, as in Model Optimizer's Wan recipe
    (`runtime.fp8.kept_blocks`). A GGUF type applies to what `wan-build gguf` quantizes (every
    block's linear layers and the text embedding, rows of whole blocks), the rest held in bf16."""
    from ..gguf_tools import quantized_here

    keep = kept_blocks(config.num_layers)
    gguf = precision in GGUF_TYPES
    per_quantized = WEIGHT_ONLY_BYTES[precision] if precision in WEIGHT_ONLY_BYTES \
        else Precision(precision).facts.linear_weight_bytes
    total = 0.0
    for name, shape in parameter_shapes(config).items():
        parts = name.split(".")
        if gguf:
            quantized = quantized_here(name, tuple(shape), 256 if precision.endswith("_K") else 32)
        else:
            quantized = (parts[0] == "blocks" and keep <= int(parts[1]) < config.num_layers - keep
                         and name.endswith(".weight") and len(shape) == 2)
        per = per_quantized if quantized or precision == "fp32" else 2.0
        total += shape.numel() * per
    return total


@dataclass(frozen=True)
class Flops:
    linear: float
    self_attention: float
    cross_attention: float  # core plus the context K/V projections
    embed_head: float

    @property
    def total(self) -> float:
        return self.linear + self.self_attention + self.cross_attention + self.embed_head


def forward_flops(config: WanConfig, shape: StaticShape) -> Flops:
    """FLOPs of one forward at `shape` (all `shape.batch` samples)."""
    d, f, n = config.dim, config.ffn_dim, config.num_layers
    L, lt, li = shape.tokens(config), shape.text_tokens, shape.image_tokens
    b = shape.batch
    linear = n * L * (12 * d * d + 4 * d * f)
    self_attn = n * 4 * L * L * d
    cross = n * (4 * lt * d * d + 4 * li * d * d + 4 * L * (lt + li) * d)
    t = L if shape.per_token_timesteps else 1
    embed = (2 * L * config.in_channels * config.patch_volume * d
             + 2 * L * d * config.out_channels * config.patch_volume
             + 2 * lt * (config.text_dim * d + d * d)
             + 2 * t * (config.freq_dim * d + 7 * d * d))
    if config.image_dim is not None:
        embed += 2 * li * (config.image_dim ** 2 + config.image_dim * d)
    return Flops(b * linear, b * self_attn, b * cross, b * embed)


@dataclass(frozen=True)
class Plan:
    config: WanConfig
    video: tuple[int, int, int]
    shape: StaticShape
    parameters: int
    weights: dict[str, float]
    flops: Flops

    def lines(self) -> list[str]:
        c, s = self.config, self.shape
        frames, height, width = self.video
        grid = s.latent.grid(c)
        experts = f" ({c.experts} experts, high noise for t >= {c.boundary:g} x 1000)" if c.experts > 1 else ""
        per = "per expert " if c.experts > 1 else ""
        out = [
            f"model          {c.name}{experts}",
            f"video          {frames} frames x {height} x {width} (height x width), batch {s.batch}",
            f"latent         in [{s.batch}, {c.in_channels}, {s.latent_frames}, {s.latent_height}, {s.latent_width}]"
            f" -> out [{s.batch}, {c.out_channels}, {s.latent_frames}, {s.latent_height}, {s.latent_width}]",
            f"tokens         {s.tokens(c):,} video ({grid[0]} x {grid[1]} x {grid[2]} patches) + "
            f"{s.text_tokens} text" + (f" + {s.image_tokens} image" if s.image_tokens else ""),
            f"parameters     {self.parameters:,} {per}".rstrip()
            + (f" ({self.parameters * c.experts:,} in all)" if c.experts > 1 else ""),
            "weights        " + " | ".join(f"{p} {b / 1e9:.1f} GB" for p, b in self.weights.items())
            + (f" {per}".rstrip()),
        ]
        fl = self.flops
        share = lambda x: f"{100 * x / fl.total:.1f}%"  # noqa: E731
        out.append(f"FLOPs/forward  {fl.total:.4g} (linear {fl.linear:.4g} {share(fl.linear)}, self-attention "
                   f"{fl.self_attention:.4g} {share(fl.self_attention)}, cross-attention {fl.cross_attention:.3g}, "
                   f"embed/head {fl.embed_head:.2g})")
        return out


def plan(config: WanConfig, frames: int, height: int, width: int, batch: int = 1, text_tokens: int = 512) -> Plan:
    latent = latent_size(config, frames, height, width)
    shape = StaticShape.for_latent(config, batch, latent, text_tokens)
    return Plan(config, (frames, height, width), shape, parameter_count(config),
                {p: weight_bytes(config, p) for p in ("fp32", "bf16", "fp16", "fp8", "int8", "nvfp4", "int4", "Q8_0",
                                                     "Q5_K", "Q4_K")}, forward_flops(config, shape))
