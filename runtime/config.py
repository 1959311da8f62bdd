"""Wan transformer configs, named presets, and video geometry.

One frozen dataclass describes every Wan 2.x DiT. The numbers of the real models
come from the model card in `docs/` (wan-architecture sections 1, 7 and 8); the tiny
presets have the same structure at toy sizes, for tests and the demo.

Geometry turns a video size (frames, height, width in pixels) into latent dims and
tokens, and rejects sizes the model cannot take with an error that names the rule
and the nearest valid sizes.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError, GeometryError

TEXT_TOKENS = 512  # UMT5 context length; Wan's I2V cross-attention splits image/text at len - 512
CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224 px: CLS + 16 x 16 patches
# Upper bounds on what a build or a plan may ask for: far above every Wan use (720p-81f is 75,600
# video tokens; batch 2 holds a CFG pair), low enough that a typo cannot allocate terabytes.
MAX_BATCH = 64
MAX_TEXT_TOKENS = 4096
MAX_VIDEO_TOKENS = 1 << 20  # per sample: 4x a 1080p, 121-frame video


@dataclass(frozen=True)
class WanConfig:
    """Structure of one Wan transformer (one expert of a two-expert model)."""

    name: str
    num_heads: int
    head_dim: int
    ffn_dim: int
    num_layers: int
    in_channels: int
    out_channels: int
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_max_seq_len: int = 1024
    # Wan2.1 I2V / FLF2V: CLIP image tokens of this width get their own K/V in cross-attention.
    image_dim: int | None = None
    image_tokens: int = 0  # 257 (I2V) or 514 (FLF2V, first + last frame)
    image_pos_embed: bool = False  # FLF2V adds a learned position embedding to the 514 tokens
    # TI2V-5B: the pipeline passes one timestep per token ([B, L]).
    per_token_timesteps: bool = False
    # VAE that produced the latents: (temporal stride, spatial stride, latent channels).
    vae_temporal_stride: int = 4
    vae_spatial_stride: int = 8
    # Wan2.2 A14B: two experts of this config, the high-noise one for t >= boundary * 1000.
    experts: int = 1
    boundary: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.head_dim % 2 or self.head_dim < 6:
            problems.append(f"head_dim must be even and >= 6 for 3-D RoPE (got {self.head_dim})")
        if self.freq_dim % 2:
            problems.append(f"freq_dim must be even (got {self.freq_dim})")
        if (self.image_dim is None) != (self.image_tokens == 0):
            problems.append("image_dim and image_tokens must be set together (Wan2.1 I2V/FLF2V) or not at all")
        if self.image_pos_embed and self.image_dim is None:
            problems.append("image_pos_embed needs image_dim")
        if self.experts not in (1, 2):
            problems.append(f"experts must be 1 or 2 (got {self.experts})")
        if (self.experts == 2) != (self.boundary is not None):
            problems.append("a two-expert model needs a boundary in (0, 1), a one-expert model none")
        if self.boundary is not None and not 0.0 < self.boundary < 1.0:
            problems.append(f"boundary must lie in (0, 1) (got {self.boundary})")
        if problems:
            raise ConfigError(f"invalid Wan config {self.name!r}: " + "; ".join(problems))

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Real head dims given to the (time, height, width) axes: 44/42/42 at head_dim 128."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    def replace(self, **changes: Any) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    # -- conversions -------------------------------------------------------------------------
    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` diffusers writes for `WanTransformer3DModel` with this structure."""
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "image_dim": self.image_dim,
            "added_kv_proj_dim": self.dim if self.image_dim is not None else None,
            "rope_max_seq_len": self.rope_max_seq_len,
            "pos_embed_seq_len": self.image_tokens if self.image_pos_embed else None,
        }

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], name: str = "diffusers") -> "WanConfig":
        """Read a diffusers `WanTransformer3DModel` config.json (as a dict)."""
        class_name = config.get("_class_name", "WanTransformer3DModel")
        if class_name != "WanTransformer3DModel":
            raise ConfigError(
                f"{name}: config.json describes {class_name!r}, not a WanTransformer3DModel; "
                "point at the transformer folder of a Wan pipeline"
            )
        if config.get("cross_attn_norm", True) is not True:
            raise ConfigError(f"{name}: cross_attn_norm=False is not a Wan 2.x model; every Wan checkpoint uses True")
        f = _Fields(config, name)
        image_dim = f.size("image_dim", None)
        added_kv = f.size("added_kv_proj_dim", None)
        heads = f.size("num_attention_heads", 40)
        head_dim = f.size("attention_head_dim", 128)
        if image_dim is not None and added_kv not in (None, heads * head_dim):
            raise ConfigError(f"{name}: added_kv_proj_dim={added_kv} must equal the model dim {heads * head_dim}")
        pos_len = f.size("pos_embed_seq_len", None)
        in_channels = f.size("in_channels", 16)
        out_channels = f.size("out_channels", None) or in_channels
        return cls(
            name=name,
            num_heads=heads,
            head_dim=head_dim,
            ffn_dim=f.size("ffn_dim", 13824),
            num_layers=f.size("num_layers", 40),
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=f.size("text_dim", 4096),
            freq_dim=f.size("freq_dim", 256),
            eps=f.number("eps", 1e-6),
            patch_size=f.patch("patch_size"),
            rope_max_seq_len=f.size("rope_max_seq_len", 1024),
            image_dim=image_dim,
            image_tokens=0 if image_dim is None else int(pos_len or CLIP_TOKENS),
            image_pos_embed=pos_len is not None,
            **vae_fields(out_channels),
        )

    @classmethod
    def from_original(
        cls, config: Mapping[str, Any], image_dim: int | None, name: str = "original"
    ) -> "WanConfig":
        """Read an original Wan `config.json` (`WanModel`).

        `model_type` "i2v" means CLIP image tokens in Wan2.1 but not in Wan2.2, so the caller
        reads `image_dim` off the checkpoint's `img_emb` weights (None when it has none).
        """
        model_type = config.get("model_type", "t2v")
        if not isinstance(model_type, str) or model_type not in ("t2v", "i2v", "flf2v", "ti2v"):
            raise ConfigError(
                f"{name}: model_type {model_type!r} is not supported; supported: t2v, i2v, flf2v, ti2v"
            )
        window = config.get("window_size", (-1, -1))
        if not isinstance(window, (list, tuple)) or tuple(window) != (-1, -1):
            raise ConfigError(f"{name}: window_size {config['window_size']} is not Wan's global attention (-1, -1)")
        f = _Fields(config, name)
        dim = f.size("dim")
        heads = f.size("num_heads")
        if dim % heads:
            raise ConfigError(f"{name}: dim {dim} is not divisible by num_heads {heads}")
        out_channels = f.size("out_dim", 16)
        flf2v = model_type == "flf2v"
        return cls(
            name=name,
            num_heads=heads,
            head_dim=dim // heads,
            ffn_dim=f.size("ffn_dim"),
            num_layers=f.size("num_layers"),
            in_channels=f.size("in_dim", 16),
            out_channels=out_channels,
            text_dim=f.size("text_dim", 4096),
            freq_dim=f.size("freq_dim", 256),
            eps=f.number("eps", 1e-6),
            patch_size=f.patch("patch_size"),
            image_dim=image_dim,
            image_tokens=0 if image_dim is None else (2 * CLIP_TOKENS if flf2v else CLIP_TOKENS),
            image_pos_embed=flf2v and image_dim is not None,
            **vae_fields(out_channels),
        )

    def same_structure(self, other: "WanConfig") -> bool:
        """True when both configs build the same tensors (names and deploy facts aside)."""
        skip = {"name", "experts", "boundary"}
        return all(
            getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self) if f.name not in skip
        )


class _Fields:
    """Typed reads of a config.json, each error naming the file, the key and what it must be."""

    _MISSING = object()

    def __init__(self, config: Mapping[str, Any], name: str):
        self.config, self.name = config, name

    def _get(self, key: str, default: Any) -> Any:
        value = self.config.get(key, default)
        if value is self._MISSING:
            raise ConfigError(f"{self.name}: {key} is missing; a Wan config has it")
        return value

    def size(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 20:
            raise ConfigError(f"{self.name}: {key} must be a positive whole number, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self._get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
            raise ConfigError(f"{self.name}: {key} must be a small positive number (e.g. 1e-06), got {value!r}")
        return float(value)

    def patch(self, key: str) -> tuple[int, int, int]:
        value = self._get(key, [1, 2, 2])
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ConfigError(f"{self.name}: {key} must be three positive whole numbers (e.g. [1, 2, 2]), got {value!r}")
        return tuple(value)


def vae_fields(out_channels: int) -> dict[str, Any]:
    # The Wan2.2 VAE (48 latent channels) is used only by TI2V-5B, whose pipeline passes
    # per-token timesteps; every other model works on Wan2.1 VAE latents.
    if out_channels == 48:
        return {"vae_spatial_stride": 16, "per_token_timesteps": True}
    return {}


# -- presets --------------------------------------------------------------------------------------
def _wan14b(name: str, **kw: Any) -> WanConfig:
    return WanConfig(name=name, num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40,
                     in_channels=kw.pop("in_channels", 16), out_channels=16, **kw)


def _tiny(name: str, **kw: Any) -> WanConfig:
    return WanConfig(name=name, num_heads=2, head_dim=24, ffn_dim=96, num_layers=2,
                     in_channels=kw.pop("in_channels", 16), out_channels=kw.pop("out_channels", 16),
                     text_dim=32, freq_dim=32, **kw)


PRESETS: dict[str, WanConfig] = {
    c.name: c
    for c in [
        # Real models (wan-architecture section 1).
        WanConfig(name="wan2.1-t2v-1.3b", num_heads=12, head_dim=128, ffn_dim=8960, num_layers=30,
                  in_channels=16, out_channels=16),
        _wan14b("wan2.1-t2v-14b"),
        _wan14b("wan2.1-i2v-14b", in_channels=36, image_dim=1280, image_tokens=CLIP_TOKENS),
        _wan14b("wan2.1-flf2v-14b", in_channels=36, image_dim=1280, image_tokens=2 * CLIP_TOKENS,
                image_pos_embed=True),
        _wan14b("wan2.2-t2v-a14b", experts=2, boundary=0.875),
        _wan14b("wan2.2-i2v-a14b", in_channels=36, experts=2, boundary=0.9),
        WanConfig(name="wan2.2-ti2v-5b", num_heads=24, head_dim=128, ffn_dim=14336, num_layers=30,
                  in_channels=48, out_channels=48, per_token_timesteps=True, vae_spatial_stride=16),
        # Tiny models of each structural kind, for tests and the demo.
        _tiny("tiny-t2v"),
        _tiny("tiny-i2v", in_channels=36, image_dim=24, image_tokens=CLIP_TOKENS),
        _tiny("tiny-flf2v", in_channels=36, image_dim=24, image_tokens=2 * CLIP_TOKENS, image_pos_embed=True),
        _tiny("tiny-i2v-a14b", in_channels=36, experts=2, boundary=0.9),
        _tiny("tiny-ti2v", in_channels=48, out_channels=48, per_token_timesteps=True, vae_spatial_stride=16),
        # The CPU benchmark's mid-size model (BENCHMARKING: 4 heads x 128, ffn 1536, 4 layers, 36 ch).
        WanConfig(name="mid-i2v", num_heads=4, head_dim=128, ffn_dim=1536, num_layers=4,
                  in_channels=36, out_channels=16, text_dim=512),
    ]
}

def get_preset(name: str) -> WanConfig:
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"unknown preset {name!r}; {hint}known presets: {', '.join(PRESETS)}"
        ) from None


def find_preset(config: WanConfig) -> WanConfig | None:
    """The preset with the same structure as `config`, if any (real models first)."""
    for preset in PRESETS.values():
        if preset.same_structure(config):
            return preset
    return None


# -- geometry -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatentSize:
    """Latent dims of one video: what the transformer's `hidden_states` carries after the VAE."""

    frames: int
    height: int
    width: int

    def grid(self, config: WanConfig) -> tuple[int, int, int]:
        pt, ph, pw = config.patch_size
        return self.frames // pt, self.height // ph, self.width // pw

    def tokens(self, config: WanConfig) -> int:
        f, h, w = self.grid(config)
        return f * h * w


def _nearest(value: int, step: int, offset: int = 0) -> str:
    """The valid sizes either side of `value` on the lattice offset + k * step (k >= 1 when offset is 0)."""
    lo = offset + max((value - offset) // step, 0 if offset else 1) * step
    return f"{lo}" if value <= lo else f"{lo} or {lo + step}"


def latent_size(config: WanConfig, video_frames: int, height: int, width: int) -> LatentSize:
    """Video frames and pixels -> latent dims, with the model's divisibility rules."""
    t, s = config.vae_temporal_stride, config.vae_spatial_stride
    multiple = s * config.patch_size[1]
    problems = []
    if video_frames < 1 or (video_frames - 1) % t:
        valid = _nearest(max(video_frames, 1), t, offset=1)
        problems.append(
            f"frames={video_frames} is not {t}k+1 (the VAE keeps the first frame and packs every {t} "
            f"after it into one latent frame); nearest valid: {valid}"
        )
    for label, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            valid = _nearest(value, multiple)
            problems.append(
                f"{label}={value} is not a multiple of {multiple} (VAE stride {s} x patch "
                f"{config.patch_size[1]} for {config.name}); nearest valid: {valid}"
            )
    if problems:
        raise GeometryError("; ".join(problems))
    size = LatentSize((video_frames - 1) // t + 1, height // s, width // s)
    check_latent_size(config, size)
    return size


def check_latent_size(config: WanConfig, size: LatentSize) -> None:
    """Latent dims the patch grid and the RoPE table can take."""
    problems = []
    for label, value, patch in zip(("frames", "height", "width"), (size.frames, size.height, size.width),
                                   config.patch_size):
        if value < 1 or value % patch:
            problems.append(f"latent {label} {value} must be a positive multiple of the patch size {patch}")
        elif value // patch > config.rope_max_seq_len:
            problems.append(
                f"latent {label} {value} gives {value // patch} positions, over the RoPE table's "
                f"{config.rope_max_seq_len}"
            )
    if problems:
        raise GeometryError(f"{config.name}: " + "; ".join(problems))
