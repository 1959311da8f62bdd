"""wan-build runtime: what a deployment imports (torch + safetensors; engine libraries lazily)."""

from .config import PRESETS, LatentSize, WanConfig, get_preset, latent_size
from .dynamic import Route, WanTransformer, WanTransformerOutput
from .errors import WanBuildError
from .experts import WanExpertRouter, load_engines
from .static import StaticShape, StaticWanTransformer

__all__ = [
    "PRESETS", "LatentSize", "Route", "StaticShape", "StaticWanTransformer", "WanBuildError", "WanConfig",
    "WanExpertRouter", "WanTransformer", "WanTransformerOutput", "get_preset", "latent_size", "load_engines",
]
