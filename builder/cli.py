"""`wan-build`: the command line. Each command parses, calls one library function, prints.

A user's mistake (a `WanBuildError`) is printed as one line on stderr with exit code 1; set
WAN_BUILD_DEBUG=1 to see its traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Callable, TypeVar

import typer

from runtime.errors import WanBuildError

app = typer.Typer(
    name="wan-build",
    help="Build fixed-shape engines of the Wan 2.x video transformer, and plan what to build.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except WanBuildError as e:
        if os.environ.get("WAN_BUILD_DEBUG"):
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def plan(
    preset: Annotated[str, typer.Option(help="Model preset, e.g. wan2.2-i2v-a14b (see `wan-build presets`).")],
    frames: Annotated[int, typer.Option(help="Video frames (4k+1, e.g. 81).")] = 81,
    height: Annotated[int, typer.Option(help="Video height in pixels.")] = 480,
    width: Annotated[int, typer.Option(help="Video width in pixels.")] = 832,
    batch: Annotated[int, typer.Option(help="Samples per forward (1 per CFG branch in diffusers).")] = 1,
) -> None:
    """Latent shape, tokens, parameters, weight memory and FLOPs of one forward.

    Example: wan-build plan --preset wan2.2-i2v-a14b --frames 81 --height 480 --width 832
    """
    from runtime.config import get_preset

    from .plan import plan as make_plan

    result = _run(lambda: make_plan(get_preset(preset), frames, height, width, batch))
    typer.echo("\n".join(result.lines()))


@app.command()
def presets() -> None:
    """List the model presets.

    Example: wan-build presets
    """
    from runtime.config import PRESETS

    from .plan import parameter_count

    for name, c in PRESETS.items():
        kind = ("two experts, " if c.experts > 1 else "") + (
            "CLIP image tokens, " if c.image_dim else "") + ("per-token t, " if c.per_token_timesteps else "")
        typer.echo(f"{name:18s} dim {c.dim:5d} x {c.num_layers:2d} layers, {c.in_channels} -> {c.out_channels} ch, "
                   f"{kind}{parameter_count(c):,} parameters")


@app.command("init-weights")
def init_weights(
    preset: Annotated[str, typer.Argument(help="Model preset, e.g. tiny-i2v-a14b.")],
    out: Annotated[Path, typer.Option(help="Folder to write (diffusers layout).")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same weights.")] = 0,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
) -> None:
    """Write seeded random weights of a preset in diffusers layout (for demos and CI).

    Two-expert presets get `transformer/` (high noise) and `transformer_2/` (low noise).
    Example: wan-build init-weights tiny-i2v-a14b --out weights/tiny --seed 0
    """
    import torch

    from runtime.config import get_preset

    from .init_weights import init_weights as write

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def go() -> list[Path]:
        if dtype not in dtypes:
            raise WanBuildError(f"--dtype {dtype!r} is not one of {', '.join(dtypes)}")
        return write(get_preset(preset), out, seed, dtypes[dtype])

    for folder in _run(go):
        typer.echo(f"wrote {folder}")


@app.command()
def build(
    profile: Annotated[Path, typer.Argument(help="Profile YAML, e.g. profiles/tiny.yaml.")],
    out: Annotated[Path | None, typer.Option(help="Engine folder (default: engines/<profile name>).")] = None,
    allow_mismatch: Annotated[bool, typer.Option(
        help="Keep engines that fail their parity check (marked in the manifest).")] = False,
) -> None:
    """Build every (expert x shape x precision x backend) engine of a profile.

    Entries already built and still valid are kept. Exit 1 if any entry failed.
    Example: wan-build build profiles/tiny.yaml --out engines/tiny
    """
    from .build import build as run_build
    from .profiles import load_profile

    report = _run(lambda: run_build(load_profile(profile), out, allow_mismatch=allow_mismatch, echo=typer.echo))
    typer.echo("")
    typer.echo("\n".join(report.table()))
    counts: dict[str, int] = {}
    for r in report.results:
        counts[r.status] = counts.get(r.status, 0) + 1
    typer.echo(f"{report.folder}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if report.failed:
        raise typer.Exit(1)


@app.command("list")
def list_(
    folder: Annotated[Path, typer.Argument(help="Engine folder, e.g. engines/tiny.")],
) -> None:
    """List the engines of a folder: expert, shape, backend, precision, size, parity.

    Example: wan-build list engines/tiny
    """
    from .catalog import list_entries, require_folder

    typer.echo("\n".join(_run(lambda: list_entries(require_folder(folder)))))


@app.command()
def verify(
    folder: Annotated[Path, typer.Argument(help="Engine folder, e.g. engines/tiny.")],
) -> None:
    """Re-check every engine file's sha256 and re-run its parity check against eager.

    Exit 1 if any engine fails.
    Example: wan-build verify engines/tiny
    """
    from .catalog import require_folder, verify as run_verify, verify_table

    results = _run(lambda: run_verify(require_folder(folder), echo=lambda s: None))
    typer.echo("\n".join(verify_table(results)))
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


@app.command()
def demo(
    profile: Annotated[Path, typer.Option(help="The tiny profile to build.")] = Path("profiles/tiny.yaml"),
) -> None:
    """The main job on a tiny built-in model, on the CPU: weights, engines, routed calls.

    Example: wan-build demo
    """
    from .demo import run_demo

    _run(lambda: run_demo(profile, echo=typer.echo))


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
