"""`make demo`: the main job on a tiny built-in model, on the CPU, in a few seconds.

Writes seeded random weights of a tiny Wan2.2 I2V-A14B-shaped model (two experts), loads them
through the real loading code, runs the dynamic front on a call shaped like a diffusers pipeline's,
and prints the route taken, the output shape and the error against diffusers' own
`WanTransformer3DModel` on the same files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from runtime import WanTransformer, get_preset, latent_size

from .init_weights import EXPERT_FOLDERS, init_weights

PRESET = "tiny-i2v-a14b"


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_demo(work: Path, echo: Callable[[str], None] = print) -> None:
    torch.manual_seed(0)
    config = get_preset(PRESET)
    weights = Path(work) / "weights"
    init_weights(config, weights, seed=0)
    echo(f"wrote {PRESET} weights (diffusers layout) to {weights}")

    latent = latent_size(config, video_frames=9, height=64, width=96)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, config.in_channels, latent.frames, latent.height, latent.width, generator=gen)
    ctx = torch.randn(1, 512, config.text_dim, generator=gen)
    try:
        from diffusers import WanTransformer3DModel
    except ImportError:
        WanTransformer3DModel = None
        echo("diffusers is not installed: the error against it is skipped")

    echo(f"{'expert':13s} {'timestep':>8s} {'route':7s} {'output shape':22s} {'ms':>7s} {'rel. error vs diffusers':>24s}")
    for folder, t in zip(EXPERT_FOLDERS, (950.0, 400.0)):
        model = WanTransformer.from_pretrained(weights, subfolder=folder)
        timestep = torch.tensor([t])
        with torch.no_grad():
            model(x, timestep, ctx)  # first call builds the static model for this shape
            start = time.perf_counter()
            out = model(x, timestep, ctx, return_dict=False)[0]
            ms = 1000 * (time.perf_counter() - start)
            err = "n/a"
            if WanTransformer3DModel is not None:
                ref = WanTransformer3DModel.from_pretrained(weights, subfolder=folder).eval()
                err = f"{_relative_error(out, ref(x, timestep, ctx, return_dict=False)[0]):.2e}"
        route = model.last_route
        echo(f"{folder:13s} {t:8.0f} {route.backend:7s} {str(list(out.shape)):22s} {ms:7.1f} {err:>24s}")
        echo(f"  route: {route.reason} ({route.shape.describe()})")
