"""`make demo`: the main job end to end on a tiny model, on the CPU, in about a minute.

1. Write seeded random weights of the tiny Wan2.2 I2V-A14B-shaped model (two experts).
2. Build the tiny profile's engines (ONNX Runtime and AOTInductor, both experts) into engines/tiny.
3. Load both experts with the engines, call them on the built shape (each backend, and eager)
   and on a shape no engine was built for, and print backend, latency and error against eager.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from runtime import WanTransformer, load_engines
from runtime.errors import WanBuildError

from .build import build
from .build.parity import compare
from .init_weights import EXPERT_FOLDERS, init_weights
from .profiles import load_profile
from .tables import table


def _ms(fn: Callable[[], torch.Tensor], repeats: int = 5) -> tuple[float, torch.Tensor]:
    out = fn()  # first call loads the engine or builds the eager model
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), out


def write_demo_weights(profile_path: Path, echo: Callable[[str], None]) -> None:
    profile = load_profile(profile_path, check_weights=False)
    paths = [e.weights for e in profile.experts]
    root = paths[0].parent
    if [p.name for p in paths] != list(EXPERT_FOLDERS) or paths[1].parent != root:
        raise WanBuildError(f"{profile_path}: the demo writes weights to <dir>/transformer and <dir>/transformer_2; "
                            f"this profile names {', '.join(map(str, paths))}")
    if all((p / "config.json").is_file() for p in paths):
        echo(f"weights: {root} (already written)")
        return
    init_weights(profile.config, root, seed=0)
    echo(f"weights: wrote seeded random {profile.config.name} weights to {root}")


def run_demo(profile_path: Path, echo: Callable[[str], None] = print) -> None:
    torch.manual_seed(0)
    write_demo_weights(profile_path, echo)
    profile = load_profile(profile_path)
    folder = Path("engines") / profile.name
    report = build(profile, folder, echo=echo)
    if report.failed:
        raise WanBuildError(f"the demo build failed: {report.failed[0].message}")

    built = profile.shapes[0]
    latent = profile.static_shape(built).latent
    gen = torch.Generator().manual_seed(5)
    ctx = torch.randn(1, 512, profile.config.text_dim, generator=gen)
    rows = [("expert", "call", "route", "ms", "rel. error vs eager")]
    for expert in profile.experts:
        t = torch.tensor([950.0 if expert.name == "high_noise" else 400.0])
        for label, (f, h, w) in (("built shape", (latent.frames, latent.height, latent.width)),
                                 ("unbuilt shape", (latent.frames, latent.height, latent.width + 4))):
            x = torch.randn(1, profile.config.in_channels, f, h, w, generator=gen)
            eager = WanTransformer.from_pretrained(expert.weights)
            with torch.inference_mode():
                eager_ms, ref = _ms(lambda: eager(x, t, ctx, return_dict=False)[0])
                rows.append((expert.name, f"{label} {f}x{h}x{w}", "eager (no engines)", f"{eager_ms:.1f}", "0"))
                for backends in (["onnxruntime"], ["aoti"]):
                    model = WanTransformer.from_pretrained(expert.weights, engines=folder, backends=backends)
                    ms, out = _ms(lambda: model(x, t, ctx, return_dict=False)[0])
                    rows.append((expert.name, f"{label} {f}x{h}x{w}", model.last_route.backend, f"{ms:.1f}",
                                 f"{compare(out, ref, 1.0).relative:.1e}"))
                    if label == "unbuilt shape":
                        rows[-1] = rows[-1][:2] + (f"eager: {model.last_route.reason.split(';')[0]}",) + rows[-1][3:]
                        break
    echo("")
    for line in table(rows):
        echo(line)

    router = load_engines(folder)
    x = torch.randn(1, profile.config.in_channels, latent.frames, latent.height, latent.width, generator=gen)
    with torch.inference_mode():
        for t in (980.0, 200.0):
            router(x, torch.tensor([t]), ctx)
            echo(f"router: t={t:.0f} -> {router.last_expert}, {router.last_route}")
