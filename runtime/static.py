"""The static Wan transformer: one fixed shape, a branch-free forward.

`StaticWanTransformer(config, shape)` computes exactly what diffusers'
`WanTransformer3DModel` computes (same parameter names, same precision policy), but
everything that depends on the shape is decided at construction: RoPE tables, the
patch grid, the timestep layout (one per sample or one per token), and whether image
tokens exist. `forward` takes only required tensors and has no `if`, no optional
argument, no data-dependent shape, no in-place slice write and no float64, so
`torch.export`, ONNX and TensorRT see one plain graph.

Section numbers match between `__init__` and `forward`:
  1. patch embedding   2. condition embedding   3. blocks   4. head and unpatchify
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MAX_BATCH, MAX_TEXT_TOKENS, MAX_VIDEO_TOKENS, TEXT_TOKENS, LatentSize, WanConfig, check_latent_size
from .errors import GeometryError
from .weights import GGUF_TYPE

SHAPE_TABLES = ("rope_cos", "rope_sin", "time_freqs")  # buffers derived from the shape, not weights


def weights_layout(tensors) -> str:
    """sha256 of every weight's name, shape and dtype (not its values): what an engine that takes
    its weights from the caller needs to match. Other weights with this layout (a fine-tune, merged
    LoRAs) run on it; another precision policy, FP8 scaling or model size does not."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        if name not in SHAPE_TABLES:
            t = tensors[name]
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class StaticShape:
    """Every dimension of one static forward; an engine is built for exactly one of these."""

    batch: int
    latent_frames: int
    latent_height: int
    latent_width: int
    text_tokens: int = TEXT_TOKENS
    image_tokens: int = 0
    per_token_timesteps: bool = False

    @classmethod
    def for_latent(cls, config: WanConfig, batch: int, latent: LatentSize,
                   text_tokens: int = TEXT_TOKENS) -> "StaticShape":
        """The shape a diffusers pipeline of this model calls with, at this latent size."""
        return cls(batch, latent.frames, latent.height, latent.width, text_tokens,
                   config.image_tokens, config.per_token_timesteps)

    @property
    def latent(self) -> LatentSize:
        return LatentSize(self.latent_frames, self.latent_height, self.latent_width)

    def tokens(self, config: WanConfig) -> int:
        return self.latent.tokens(config)

    def describe(self) -> str:
        t = "per-token t" if self.per_token_timesteps else "per-sample t"
        img = f", {self.image_tokens} image tokens" if self.image_tokens else ""
        return (f"batch {self.batch}, latent {self.latent_frames}x{self.latent_height}x{self.latent_width}, "
                f"{self.text_tokens} text tokens{img}, {t}")


def check_static_shape(config: WanConfig, shape: StaticShape) -> None:
    """Raise GeometryError if `config` cannot run at `shape`."""
    check_latent_size(config, shape.latent)
    problems = []
    if shape.batch < 1:
        problems.append(f"batch {shape.batch} must be >= 1")
    if shape.text_tokens < 1:
        problems.append(f"text_tokens {shape.text_tokens} must be >= 1")
    if config.image_dim is None and shape.image_tokens:
        problems.append(f"{config.name} takes no image tokens (got {shape.image_tokens})")
    if config.image_dim is not None:
        if shape.text_tokens != TEXT_TOKENS:
            problems.append(f"{config.name} splits image and text at len - {TEXT_TOKENS}, so it needs exactly "
                            f"{TEXT_TOKENS} text tokens (got {shape.text_tokens}); pad the prompt with zero rows")
        want = config.image_tokens if config.image_pos_embed else None
        if shape.image_tokens < 1 or (want is not None and shape.image_tokens != want):
            problems.append(f"{config.name} needs {want or 'some'} image tokens (got {shape.image_tokens})")
    if problems:
        raise GeometryError("; ".join(problems))


def check_build_limits(config: WanConfig, shape: StaticShape) -> None:
    """Raise GeometryError if `shape` asks for more than any Wan use (the limits in `runtime.config`)."""
    problems = []
    if shape.batch > MAX_BATCH:
        problems.append(f"batch {shape.batch} is over {MAX_BATCH}")
    if shape.text_tokens > MAX_TEXT_TOKENS:
        problems.append(f"text_tokens {shape.text_tokens} is over {MAX_TEXT_TOKENS}")
    if shape.tokens(config) > MAX_VIDEO_TOKENS:
        problems.append(f"{shape.tokens(config):,} video tokens per sample is over {MAX_VIDEO_TOKENS:,} (about 4x "
                        "a 1080p, 121-frame video)")
    if problems:
        raise GeometryError("; ".join(problems) + "; no Wan pipeline asks for that much")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


# -- shape-derived tables (construction time only) ------------------------------------------------
def rope_tables(config: WanConfig, shape: StaticShape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every token's RoPE angles, [1, L, 1, head_dim / 2] in float32.

    Each axis (time, height, width) has its own frequencies, normalised by its own width
    (44/42/42 at head_dim 128); pairs are interleaved (2i, 2i+1). Built in float64 on the
    CPU, like the reference, then stored as float32.
    """
    grid = shape.latent.grid(config)
    per_axis = []
    for axis, (width, positions) in enumerate(zip(config.rope_split, grid)):
        omega = 1.0 / (10000.0 ** (torch.arange(0, width, 2, dtype=torch.float64, device="cpu") / width))
        angles = torch.outer(torch.arange(positions, dtype=torch.float64, device="cpu"), omega)  # [n_axis, width / 2]
        view = [1, 1, 1, width // 2]
        view[axis] = positions
        per_axis.append(angles.view(view).expand(*grid, width // 2))
    angles = torch.cat(per_axis, dim=-1).reshape(1, -1, 1, config.head_dim // 2)  # [1, L, 1, hd / 2]
    return angles.cos().float(), angles.sin().float()


def timestep_frequencies(config: WanConfig) -> torch.Tensor:
    half = config.freq_dim // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device="cpu") / half)


# -- forward-path helpers (no branches) -----------------------------------------------------------
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Interleaved pairs rotated and re-interleaved by stack + flatten: no strided writes, no ScatterND.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, H, hd / 2] each
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, L, H, hd] in, [B, L, H * hd] out; default scale 1 / sqrt(hd), no mask.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2).type_as(q)


def _fp32_rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    # Computed in fp32 whatever x is: torch's rms_norm upcasts inside, but a strongly typed TensorRT
    # network takes a norm's precision from its input, so the upcast must be in the graph.
    return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps).to(x.dtype)


def _fp32_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                        norm.eps).to(x.dtype)


# -- modules --------------------------------------------------------------------------------------
class _GeluProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    def __init__(self, dim_in: int, inner: int, dim_out: int, approximate: str):
        super().__init__()
        # Index 1 holds diffusers' dropout, so parameter names match its `ffn.net.2`.
        self.net = nn.ModuleList([_GeluProj(dim_in, inner, approximate), nn.Identity(), nn.Linear(inner, dim_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class _Attention(nn.Module):
    """Projections of one Wan attention: q, k, v, out, and RMSNorm of q and k over the full dim,
    across heads, before the split into heads."""

    def __init__(self, config: WanConfig):
        super().__init__()
        d = config.dim
        self.heads = config.num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.to_out = nn.ModuleList([nn.Linear(d, d)])
        self.norm_q = nn.RMSNorm(d, eps=config.eps)
        self.norm_k = nn.RMSNorm(d, eps=config.eps)


class SelfAttention(_Attention):
    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        q = _fp32_rms_norm(self.to_q(x), self.norm_q).unflatten(2, (self.heads, -1))  # [B, L, H, hd]
        k = _fp32_rms_norm(self.to_k(x), self.norm_k).unflatten(2, (self.heads, -1))
        v = self.to_v(x).unflatten(2, (self.heads, -1))
        return self.to_out[0](_attention(_rope(q, rope_cos, rope_sin), _rope(k, rope_cos, rope_sin), v))


class CrossAttention(_Attention):
    """Attention from video tokens to the text context: no RoPE, no mask, no modulation."""

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        q = _fp32_rms_norm(self.to_q(x), self.norm_q).unflatten(2, (self.heads, -1))
        k = _fp32_rms_norm(self.to_k(text), self.norm_k).unflatten(2, (self.heads, -1))
        v = self.to_v(text).unflatten(2, (self.heads, -1))
        return self.to_out[0](_attention(q, k, v))


class ImageCrossAttention(CrossAttention):
    """Wan2.1 I2V/FLF2V: the same query also attends to the image tokens with their own K/V;
    the two results are summed before the one shared output projection."""

    def __init__(self, config: WanConfig):
        super().__init__(config)
        d = config.dim
        self.add_k_proj, self.add_v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.norm_added_k = nn.RMSNorm(d, eps=config.eps)

    def forward(self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q = _fp32_rms_norm(self.to_q(x), self.norm_q).unflatten(2, (self.heads, -1))
        k = _fp32_rms_norm(self.to_k(text), self.norm_k).unflatten(2, (self.heads, -1))
        v = self.to_v(text).unflatten(2, (self.heads, -1))
        k_img = _fp32_rms_norm(self.add_k_proj(image), self.norm_added_k).unflatten(2, (self.heads, -1))
        v_img = self.add_v_proj(image).unflatten(2, (self.heads, -1))
        return self.to_out[0](_attention(q, k, v) + _attention(q, k_img, v_img))


class TransformerBlock(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        d = config.dim
        self.eps = config.eps
        # 1. Self-attention (modulated, gated)
        self.attn1 = SelfAttention(config)
        # 2. Cross-attention (affine LayerNorm, no modulation, no gate)
        self.norm2 = nn.LayerNorm(d, eps=config.eps, elementwise_affine=True)
        self.attn2 = ImageCrossAttention(config) if config.image_dim is not None else CrossAttention(config)
        # 3. Feed-forward (modulated, gated)
        self.ffn = FeedForward(d, config.ffn_dim, d, approximate="tanh")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: torch.Tensor, contexts: tuple[torch.Tensor, ...], temb_proj: torch.Tensor,
                rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        # temb_proj: [B, T, 6, d] with T = 1 (per-sample t) or L (per-token t); broadcasts over tokens.
        modulation = self.scale_shift_table.unsqueeze(0) + temb_proj.float()
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = modulation.unbind(2)  # [B, T, d]
        d = (x.shape[-1],)

        # 1. Self-attention
        h = (F.layer_norm(x.float(), d, eps=self.eps) * (1 + scale_msa) + shift_msa).type_as(x)
        x = (x.float() + self.attn1(h, rope_cos, rope_sin) * gate_msa).type_as(x)
        # 2. Cross-attention
        x = x + self.attn2(_fp32_layer_norm(x, self.norm2), *contexts)
        # 3. Feed-forward
        h = (F.layer_norm(x.float(), d, eps=self.eps) * (1 + scale_ffn) + shift_ffn).type_as(x)
        return (x.float() + self.ffn(h).float() * gate_ffn).type_as(x)


class TimestepEmbedding(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TextEmbedding(nn.Module):
    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ImageEmbedding(nn.Module):
    """CLIP tokens -> model dim: LayerNorm, MLP (exact GELU), LayerNorm; both norms eps 1e-5."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim, eps=1e-5)
        self.ff = FeedForward(image_dim, image_dim, dim, approximate="none")
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return _fp32_layer_norm(self.ff(_fp32_layer_norm(image, self.norm1)), self.norm2)


class PositionedImageEmbedding(ImageEmbedding):
    """FLF2V: a learned position embedding is added to the first- and last-frame tokens first."""

    def __init__(self, image_dim: int, dim: int, tokens: int):
        super().__init__(image_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, image_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return super().forward(image + self.pos_embed)


class ConditionEmbedder(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        d = config.dim
        self.time_embedder = TimestepEmbedding(config.freq_dim, d)
        self.time_proj = nn.Linear(d, 6 * d)
        self.text_embedder = TextEmbedding(config.text_dim, d)
        if config.image_pos_embed:
            self.image_embedder = PositionedImageEmbedding(config.image_dim, d, config.image_tokens)
        elif config.image_dim is not None:
            self.image_embedder = ImageEmbedding(config.image_dim, d)


def add_parameters(module: nn.Module, config: WanConfig) -> None:
    """Give `module` every parameter of a Wan DiT, under diffusers' names (shape-independent)."""
    d = config.dim
    # 1. Patch embedding (a Conv3d with kernel = stride, applied as a matmul over patches)
    module.patch_embedding = nn.Conv3d(config.in_channels, d, kernel_size=config.patch_size,
                                       stride=config.patch_size)
    # 2. Condition embedding
    module.condition_embedder = ConditionEmbedder(config)
    # 3. Blocks
    module.blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.num_layers)])
    # 4. Head: LayerNorm (no affine) modulated by temb, projection to patches
    module.proj_out = nn.Linear(d, config.out_channels * config.patch_volume)
    module.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)


def swap_fp8_layers(module: nn.Module, parameters: dict[str, torch.Tensor]) -> None:
    """Where `parameters` hold an FP8 weight, give `module` an Fp8Linear of the same scaling."""
    from .fp8 import Fp8Linear

    for name, value in parameters.items():
        if name.endswith(".weight") and value.dtype == torch.float8_e4m3fn:
            parent_name, _, leaf = name[: -len(".weight")].rpartition(".")
            parent = module.get_submodule(parent_name)
            linear = getattr(parent, leaf)
            scaling = "tensor" if parameters[name[: -len("weight")] + "weight_scale"].ndim == 0 else "rowwise"
            setattr(parent, leaf, Fp8Linear(linear.in_features, linear.out_features, scaling,
                                            parameters[name[: -len("weight")] + "bias"].dtype))


_INITIALIZERS = frozenset(getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_"))
_IN_PLACE_FILLS = frozenset((torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_))
_SCALINGS = frozenset((torch.Tensor.__truediv__, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.div,
                       torch.Tensor.mul))
_RANDOM = frozenset((torch.randn, torch.rand))


class _ShapesOnly(torch.overrides.TorchFunctionMode):
    """Inside `skeleton()`: the initializers and the scalings of initial values, which only change
    values, are skipped (a meta tensor has none); random tensors are made empty."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALIZERS or func in _IN_PLACE_FILLS:
            return args[0] if args else kwargs["tensor"]
        if func in _SCALINGS and len(args) == 2 and isinstance(args[1], (int, float)):
            return args[0]
        if func in _RANDOM:
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def skeleton():
    """Build modules on the meta device for their tensors to be replaced (`load_state_dict(...,
    assign=True)`): the meta device, minus the initial values. Running torch's initializers on meta
    tensors costs nothing per call but imports torch's Python meta kernels the first time in a
    process (about 1.5 s, on every cold start); here they are not run. Thread-local, like any
    torch function mode."""
    with torch.device("meta"), _ShapesOnly():
        yield


@functools.lru_cache(maxsize=32)
def parameter_shapes(config: WanConfig) -> dict[str, torch.Size]:
    """Name -> shape of every parameter the model holds (built on the meta device, no memory).
    Cached per config: treat the result as read-only."""
    with skeleton():
        module = nn.Module()
        add_parameters(module, config)
    return {name: p.shape for name, p in module.named_parameters()}


def call_block(block: "TransformerBlock", x: torch.Tensor, contexts: tuple[torch.Tensor, ...],
               temb_proj: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
    """One transformer block, as a function of the block: what the `inductor` backend compiles once
    per shape and runs for every block (the block's tensors are inputs, not constants)."""
    return block(x, contexts, temb_proj, rope_cos, rope_sin)


class StaticWanTransformer(nn.Module):
    """Wan DiT at one fixed shape. `forward(hidden_states, timestep, encoder_hidden_states)`,
    plus `encoder_hidden_states_image` for Wan2.1 I2V/FLF2V configs (constructing this class
    with such a config returns a `StaticWanImageTransformer`)."""

    input_names: tuple[str, ...] = ("hidden_states", "timestep", "encoder_hidden_states")
    output_names: tuple[str, ...] = ("sample",)
    block_call = staticmethod(call_block)

    def __new__(cls, config: WanConfig | None = None, shape: StaticShape | None = None):
        # (copy.deepcopy and pickle call __new__ with no arguments, then restore the instance's state)
        if cls is StaticWanTransformer and config is not None and config.image_dim is not None:
            cls = StaticWanImageTransformer
        return super().__new__(cls)

    def __init__(self, config: WanConfig, shape: StaticShape):
        super().__init__()
        check_static_shape(config, shape)
        self.config, self.shape = config, shape
        pt, ph, pw = config.patch_size
        b, f, h, w = shape.batch, shape.latent_frames, shape.latent_height, shape.latent_width
        self._patches = (b, config.in_channels, f // pt, pt, h // ph, ph, w // pw, pw)
        self._tokens = shape.tokens(config)
        self._timestep_len = self._tokens if shape.per_token_timesteps else 1
        self._unpatch = (b, f // pt, h // ph, w // pw, pt, ph, pw, config.out_channels)
        self._out_shape = (b, config.out_channels, f, h, w)
        # Parameters (sections 1-4), then the shape-derived tables.

        add_parameters(self, config)
        self.init_tables()

    def init_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)build the shape-derived float32 tables, on `device` (default: the parameters')."""
        if device is None:
            device = self.patch_embedding.weight.device
        if torch.device(device).type == "meta":  # shapes only: the values come with real parameters
            cos = sin = torch.empty(1, self.shape.tokens(self.config), 1, self.config.head_dim // 2, device="meta")
            freqs = torch.empty(self.config.freq_dim // 2, device="meta")
        else:
            cos, sin = rope_tables(self.config, self.shape)
            freqs = timestep_frequencies(self.config)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self.register_buffer("time_freqs", freqs.to(device), persistent=False)

    @classmethod
    def from_parameters(cls, config: WanConfig, shape: StaticShape,
                        parameters: dict[str, torch.Tensor]) -> "StaticWanTransformer":
        """Build around existing tensors (shared, not copied): several shapes, one set of weights."""
        with skeleton():
            model = cls(config, shape)
            swap_fp8_layers(model, parameters)
            if any(v.dtype == torch.int8 for v in parameters.values()):  # runtime.int8 layers
                from .int8 import swap_int8_layers

                swap_int8_layers(model, parameters)
            if any(name.endswith(".weight_scale_and_zeros") for name in parameters):  # runtime.int4 layers
                from .int4 import swap_int4_layers

                swap_int4_layers(model, parameters)
            if any(name.endswith(GGUF_TYPE) for name in parameters):  # GGUF weights kept in their blocks
                from .gguf import swap_gguf_layers

                swap_gguf_layers(model, parameters)
        model.load_state_dict(parameters, strict=True, assign=True)
        model.init_tables()
        return model

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` must not round the RoPE and timestep tables: rebuild them in float32.
        super()._apply(fn, recurse)
        self.init_tables(self.rope_cos.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def constants(self) -> dict[str, torch.Tensor]:
        """Parameters and shape tables by name (detached, shared): what engines that keep their
        weights outside the artifact are handed."""
        return {k: v.detach() for k, v in (*self.named_parameters(), *self.named_buffers())}

    def weights(self) -> dict[str, torch.Tensor]:
        """The constants without the shape tables: what does not depend on the shape."""
        return {k: v for k, v in self.constants().items() if k not in SHAPE_TABLES}

    def input_specs(self, dtype: torch.dtype | None = None) -> list[TensorSpec]:
        """Names, shapes and dtypes of the inputs, in forward's order (the timestep is float32)."""
        dtype = dtype or self.dtype
        c, s = self.config, self.shape
        b, f, h, w = s.batch, s.latent_frames, s.latent_height, s.latent_width
        t_shape = (b, self._tokens) if s.per_token_timesteps else (b,)
        specs = [TensorSpec("hidden_states", (b, c.in_channels, f, h, w), dtype),
                 TensorSpec("timestep", t_shape, torch.float32),
                 TensorSpec("encoder_hidden_states", (b, s.text_tokens, c.text_dim), dtype)]
        if c.image_dim is not None:
            specs.append(TensorSpec("encoder_hidden_states_image", (b, s.image_tokens, c.image_dim), dtype))
        return specs

    def output_spec(self, dtype: torch.dtype | None = None) -> TensorSpec:
        return TensorSpec("sample", self._out_shape, dtype or self.dtype)

    def example_inputs(self, seed: int = 0, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
        """Fixed-seed random inputs (never zeros); timesteps uniform in [0, 1000)."""
        gen = torch.Generator().manual_seed(seed)
        device = device or self.rope_cos.device
        out = []
        for spec in self.input_specs(dtype):
            if spec.name == "timestep":
                t = torch.rand(spec.shape, generator=gen) * 1000.0
            else:
                t = torch.randn(spec.shape, generator=gen)
            out.append(t.to(device=device, dtype=spec.dtype))
        return tuple(out)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        x, contexts, temb, temb_proj = self.prologue(hidden_states, timestep, encoder_hidden_states)
        for block in self.blocks:  # through `block_call`, which an engine may replace with its compiled block
            x = self.block_call(block, x, contexts, temb_proj, self.rope_cos, self.rope_sin)
        return self.epilogue(x, temb)

    def contexts(self, encoder_hidden_states: torch.Tensor, *image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.condition_embedder.text_embedder(encoder_hidden_states),)

    def prologue(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 *image: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """Everything before the blocks: (tokens [B, L, d], contexts, temb [B, T, d], temb_proj [B, T, 6, d])."""
        ce = self.condition_embedder
        contexts = self.contexts(encoder_hidden_states, *image)
        dtype = encoder_hidden_states.dtype
        # 1. Patch embedding: [B, C, F, H, W] -> [B, L, C * pt * ph * pw] -> [B, L, d]
        x = hidden_states.reshape(self._patches).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(
            self._patches[0], self._tokens, -1)
        x = F.linear(x, self.patch_embedding.weight.flatten(1), self.patch_embedding.bias)

        # 2. Condition embedding: timestep [B] or [B, L] -> sinusoid [B, T, freq] -> temb [B, T, d]
        angles = timestep.reshape(self._patches[0], self._timestep_len, 1).float() * self.time_freqs
        sinusoid = torch.cat((angles.cos(), angles.sin()), dim=-1)
        temb = ce.time_embedder(sinusoid.to(ce.time_embedder.linear_1.weight.dtype)).to(dtype)
        temb_proj = ce.time_proj(F.silu(temb)).unflatten(-1, (6, -1))  # [B, T, 6, d]
        return x, contexts, temb, temb_proj

    def run_blocks(self, x: torch.Tensor, contexts: tuple[torch.Tensor, ...], temb_proj: torch.Tensor,
                   start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks `start` .. `stop` - 1 on the tokens `x` (what step caching runs a part of)."""
        for block in self.blocks[start:stop]:
            x = self.block_call(block, x, contexts, temb_proj, self.rope_cos, self.rope_sin)
        return x

    def epilogue(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The head: modulated LayerNorm, projection, unpatchify [B, L, pt*ph*pw*C] -> [B, C, F, H, W]."""
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)  # [B, T, d]
        x = (F.layer_norm(x.float(), (x.shape[-1],), eps=self.config.eps) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        return x.reshape(self._unpatch).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(self._out_shape)


class StaticWanImageTransformer(StaticWanTransformer):
    """Wan2.1 I2V/FLF2V: CLIP image tokens [B, N, image_dim] are a fourth required input."""

    input_names = StaticWanTransformer.input_names + ("encoder_hidden_states_image",)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor) -> torch.Tensor:
        x, contexts, temb, temb_proj = self.prologue(hidden_states, timestep, encoder_hidden_states,
                                                     encoder_hidden_states_image)
        for block in self.blocks:
            x = self.block_call(block, x, contexts, temb_proj, self.rope_cos, self.rope_sin)
        return self.epilogue(x, temb)

    def contexts(self, encoder_hidden_states: torch.Tensor, *image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ce = self.condition_embedder
        return (ce.text_embedder(encoder_hidden_states), ce.image_embedder(image[0]))
