"""Shared fixtures: tiny checkpoints written once per session, and diffusers as the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builder.init_weights import init_weights
from runtime.config import get_preset

STRUCTURAL_PRESETS = ("tiny-t2v", "tiny-i2v", "tiny-flf2v", "tiny-i2v-a14b", "tiny-ti2v")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """preset name -> a diffusers-layout transformer folder with seeded random weights."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name in STRUCTURAL_PRESETS:
        folders = init_weights(get_preset(name), root / name, seed=7)
        out[name] = folders[0]
    return out


def reference_model(folder: Path, dtype: torch.dtype = torch.float32):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).eval()


def make_inputs(config, batch: int, latent: tuple[int, int, int], seed: int = 0, per_token: bool = False,
                text_tokens: int = 512):
    """Random inputs shaped as a diffusers pipeline passes them."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = latent
    x = torch.randn(batch, config.in_channels, f, h, w, generator=g)
    ctx = torch.randn(batch, text_tokens, config.text_dim, generator=g)
    ctx[:, text_tokens * 3 // 4:] = 0  # prompt padding rows are zeros, as pipelines pass them
    tokens = f * (h // 2) * (w // 2)
    if per_token:
        t = (torch.rand(batch, 1, generator=g) * 1000).expand(batch, tokens).clone()
        t[:, : (h // 2) * (w // 2)] = 0  # TI2V: first latent frame's tokens at t = 0
    else:
        t = torch.rand(batch, generator=g) * 1000
    image = None
    if config.image_dim is not None:
        # FLF2V pipelines pass first- and last-frame CLIP tokens as [2B, 257, d].
        rows = batch * (2 if config.image_pos_embed else 1)
        image = torch.randn(rows, 257, config.image_dim, generator=g)
    return x, t, ctx, image
