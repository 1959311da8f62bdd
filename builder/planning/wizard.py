"""`wan-build wizard`: ask what a person deploys, show the plan, write a valid profile.

Every question has a flag; with all flags given (or --yes for the defaults) nothing is asked, so
scripts can use it. The profile it writes is loaded back by the same strict loader before it is
kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runtime.config import get_preset
from runtime.errors import WanBuildError

from .costs import FIT_LABELS, QUALITY_ORDER, Gpu, best_fit, custom_gpu, find_gpu, floor_seconds, mode_memory, options
from .matrix import USE_CASES, UseCase
from ..profiles import load_profile

Ask = Callable[[str, str], str]  # (question, default) -> answer


@dataclass
class Answers:
    use_case: str | None = None  # a USE_CASES name, or its number
    gpu: str | None = None  # a GPU name, or a memory size in GB
    resolutions: str | None = None  # "480p,720p"
    orientations: str | None = None  # landscape, portrait or both
    batch: int | None = None
    precision: str | None = None
    backends: str | None = None
    weights: str | None = None  # checkpoint folder (a diffusers pipeline folder for two-expert models)
    name: str | None = None
    out: Path | None = None


RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280), "704p": (704, 1280)}


def _choice(value: str, options: list[str], what: str) -> str:
    value = value.strip()
    if value.isdigit() and 1 <= int(value) <= len(options):
        return options[int(value) - 1]
    for o in options:
        if o.lower() == value.lower():
            return o
    raise WanBuildError(f"{what} {value!r} is not one of: " + "; ".join(f"{i + 1}) {o}" for i, o in enumerate(options)))


def _gpu(value: str) -> Gpu:
    """A known GPU by name or alias ("4090" is the RTX 4090); otherwise a number is its memory in GB."""
    value = value.strip()
    try:
        return find_gpu(value)
    except WanBuildError:
        if re.fullmatch(r"\d+(\.\d+)?\s*(gb)?", value.lower()):
            return custom_gpu(float(re.sub(r"[^\d.]", "", value)))
        raise


def run_wizard(answers: Answers, ask: Ask, echo: Callable[[str], None]) -> Path:
    cases = [u.name for u in USE_CASES]
    if answers.use_case is None:
        echo("Use cases: " + "  ".join(f"{i + 1}) {c}" for i, c in enumerate(cases)))
    case_name = _choice(answers.use_case or ask("Use case", "1"), cases, "use case")
    case: UseCase = next(u for u in USE_CASES if u.name == case_name)
    config = get_preset(case.preset)

    card = _gpu(answers.gpu or ask("GPU (name like h100, or memory in GB)", "h100"))
    native = "704p" if config.vae_spatial_stride == 16 else f"{case.height}p"
    allowed = ["704p"] if native == "704p" else ["480p", "720p"] if config.dim >= 5120 else ["480p"]
    picked = [r.strip() for r in (answers.resolutions or ask(f"Resolutions ({', '.join(allowed)})", native)).split(",")]
    for r in picked:
        if r not in allowed:
            raise WanBuildError(f"resolution {r!r} is not offered for {config.name}; choose from {', '.join(allowed)}")
    orient = _choice(answers.orientations or ask("Orientations (landscape, portrait, both)", "both"),
                     ["landscape", "portrait", "both"], "orientation")
    batch_text = str(answers.batch) if answers.batch is not None else ask(
        "Batch: 1 = diffusers pipelines (cond and uncond are separate calls), 2 = you batch the CFG pair", "1")
    if batch_text.strip() not in ("1", "2"):
        raise WanBuildError(f"batch {batch_text!r} must be 1 or 2")
    batch = int(batch_text)

    shapes = []
    for r in picked:
        h, w = RESOLUTIONS[r]
        if orient in ("landscape", "both"):
            shapes.append((case.frames, h, w))
        if orient in ("portrait", "both"):
            shapes.append((case.frames, w, h))

    # The plan: the best fit of the largest shape decides the suggested precision.
    from .plan import plan as make_plan

    plans = [make_plan(config, *s, batch) for s in shapes]
    largest = max(plans, key=lambda p: p.shape.tokens(config))
    fit = best_fit(config, largest.shape, card)
    echo(f"Plan for {case.name} on {card.name} ({card.memory_gb:g} GB):")
    for p in plans:
        f = best_fit(config, p.shape, card)
        floor = (f" floor {floor_seconds(config, p.shape, card, f.precision or 'bf16'):.1f} s/step"
                 if card.bf16_tflops and f.precision else "")
        echo(f"  {p.video[0]}x{p.video[1]}x{p.video[2]} batch {batch}: {f.describe()}{floor}")
    if fit.mode == "no":
        raise WanBuildError(f"{case.name} at {largest.video[1]}x{largest.video[2]} does not fit on {card.name} in "
                            f"any mode (needs at least {fit.needed_gb:.1f} GB); choose 480p, batch 1 or a larger GPU")
    supported = [p for p in QUALITY_ORDER if card.supports(p)]
    precision = answers.precision or ask(f"Precision ({', '.join(supported)})", fit.precision)
    if precision not in supported:
        raise WanBuildError(f"precision {precision!r} is not available on {card.name}; choose from {', '.join(supported)}")
    mode = next((m for m, p, _, ok in options(config, largest.shape, card) if p == precision and ok), fit.mode)
    mem = mode_memory(config, largest.shape, precision, mode)
    echo(f"  memory at {precision} ({FIT_LABELS[mode]}):")
    for line in mem.lines():
        echo("  " + line)

    backends = (answers.backends or ask("Backends (tensorrt, aoti, onnxruntime; comma-separated)", "tensorrt,aoti"))
    backend_list = [b.strip() for b in backends.split(",") if b.strip()]
    default_weights = f"../checkpoints/{case.preset}"
    weights = answers.weights or ask("Checkpoint folder (a diffusers pipeline folder for Wan2.2 A14B)", default_weights)
    name = answers.name or ask("Profile name", re.sub(r"[^a-z0-9.-]+", "-", f"{case.preset}-{'-'.join(picked)}"))
    out = answers.out or Path(ask("Write the profile to", f"profiles/{name}.yaml"))

    budget = None
    if mode == "streaming":  # what the GPU holds beyond everything but the weights, less 1 GB of slack
        others = sum(t.bytes for t in mem.terms if "weights" not in t.name) / 1e9
        budget = round(max(0.0, card.memory_gb - others - 1.0), 1)
    text = profile_yaml(name, case, config, weights, precision, backend_list, shapes, batch, fit, card, mode, budget)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    try:
        load_profile(tmp, check_weights=False)  # the same strict loader every build uses
    except WanBuildError:
        tmp.unlink()
        raise
    tmp.replace(out)
    echo(f"wrote {out}; build it with: wan-build build {out}")
    return out


def profile_yaml(name: str, case: UseCase, config, weights: str, precision: str, backends: list[str],
                 shapes: list[tuple[int, int, int]], batch: int, fit, card: Gpu, mode: str,
                 budget_gb: float | None = None) -> str:
    """The profile's YAML; `mode` is how the chosen precision fits (it sets weight_streaming, and the
    streaming budget the memory model leaves for weights)."""
    lines = [f"# {case.name} on {card.name}: {fit.describe()} (wan-build wizard)", f"name: {name}", "model:"]
    if config.experts > 1:
        lines += ["  experts:", f"    high_noise: {weights}/transformer", f"    low_noise: {weights}/transformer_2",
                  f"    boundary: {config.boundary}"]
    else:
        lines += [f"  weights: {weights}/transformer"]
    lines += [f"  preset: {config.name}", f"precision: {precision}", f"backends: [{', '.join(backends)}]", "shapes:"]
    lines += [f"  - {{batch: {batch}, frames: {f}, height: {h}, width: {w}}}" for f, h, w in shapes]
    if "tensorrt" in backends:
        lines += ["tensorrt:", "  strip_weights: true", f"  weight_streaming: {'true' if mode == 'streaming' else 'false'}"]
        if budget_gb is not None:
            lines += [f"  weight_streaming_budget_gb: {budget_gb}  # {card.memory_gb:g} GB less activations, "
                      "context and 1 GB of slack (memory model)"]
    return "\n".join(lines) + "\n"
