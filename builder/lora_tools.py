"""`wan-build lora inspect` and `wan-build lora merge`: what a LoRA file holds and fits, and a merged
checkpoint in diffusers layout for tools that cannot merge LoRAs themselves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from runtime.config import PRESETS
from runtime.errors import WanBuildError, WeightsError
from runtime.lora import LoraFile, merged_tensors, plan_updates, read_lora, read_loras
from runtime.static import parameter_shapes
from runtime.weights import DIFFUSERS_FILE, check_tensors, load_checkpoint

from .init_weights import write_safetensors


def _meta_params(config) -> dict[str, torch.Tensor]:
    return {n: torch.empty(s, device="meta") for n, s in parameter_shapes(config).items()}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def inspect_lora(path: str | Path) -> dict:
    """Layout, ranks, alphas, targeted layers, and which presets (and so which experts) it fits."""
    lora = read_lora(path)
    kinds: dict[str, int] = {}
    for module in lora.layers:
        kind = module.split(".", 2)[2] if module.startswith("blocks.") else module
        kinds[kind] = kinds.get(kind, 0) + 1
    fits, warnings = [], {}
    logger = logging.getLogger("wan_build.lora")
    for name, config in PRESETS.items():
        handler = _Collect()
        logger.addHandler(handler)
        try:
            plan_updates([(lora, 1.0)], config, _meta_params(config))
        except WeightsError:
            continue
        finally:
            logger.removeHandler(handler)
        fits.append(name)
        if handler.messages:
            warnings[name] = handler.messages
    alphas = sorted({layer.alpha for layer in lora.layers.values() if layer.alpha is not None})
    return {"file": str(lora.path), "layout": lora.layout, "layers": len(lora.layers), "ranks": lora.ranks,
            "alphas": alphas, "bias_deltas": sum(layer.diff_b is not None for layer in lora.layers.values()),
            "weight_deltas": sum(layer.diff is not None for layer in lora.layers.values()),
            "targets": kinds, "fits": fits, "warnings": warnings}


def describe_inspection(info: dict) -> list[str]:
    lines = [f"file      {info['file']}", f"layout    {info['layout']}",
             f"layers    {info['layers']} (rank {'/'.join(map(str, info['ranks'])) or '-'}, alpha "
             f"{'/'.join(f'{a:g}' for a in info['alphas']) or 'none (= rank)'}; {info['bias_deltas']} bias deltas, "
             f"{info['weight_deltas']} full weight deltas)"]
    lines.append("targets   " + ", ".join(f"{k} x{n}" for k, n in sorted(info["targets"].items())))
    if info["fits"]:
        lines.append("fits      " + ", ".join(info["fits"]) + "  (Wan2.2 A14B: one file per expert, high and low "
                     "noise, of the same structure)")
    else:
        lines.append("fits      no preset (a LoRA for a model whose structure no preset has)")
    for name, messages in info["warnings"].items():
        lines += [f"warning   {name}: {m}" for m in messages]
    return lines


def merge_loras_into(weights: str | Path, loras: Sequence[tuple[str | Path, float]], out: str | Path,
                     subfolder: str | None = None, echo=print) -> Path:
    """A diffusers transformer folder at `out` with `loras` merged into `weights` (streamed: one merged
    tensor at a time besides the memory-mapped checkpoint)."""
    out = Path(out)
    checkpoint = load_checkpoint(weights, subfolder=subfolder)
    if any(out.resolve() == f.resolve().parent for f in checkpoint.files):
        raise WanBuildError(f"--out {out} holds the checkpoint being merged; give another folder")
    if out.exists() and not out.is_dir():
        raise WanBuildError(f"--out {out} is a file; give a folder")
    config = checkpoint.config
    shapes = parameter_shapes(config)
    check_tensors(shapes, checkpoint.tensors, str(weights))
    files: list[tuple[LoraFile, float]] = read_loras(loras)
    plan = plan_updates(files, config, checkpoint.tensors)
    echo(f"merging {', '.join(f'{f.describe()} x{s:g}' for f, s in files)} into {len(plan)} tensors of {config.name}")
    out.mkdir(parents=True, exist_ok=True)
    layout = {n: (tuple(shapes[n]), checkpoint.tensors[n].dtype) for n in shapes}

    def make(name: str) -> torch.Tensor:
        if name in plan:
            return merged_tensors(checkpoint.tensors, {name: plan[name]})[name]
        return checkpoint.tensors[name]

    sources = {"merged_loras": json.dumps([[str(f.path), s] for f, s in files]), "format": "pt"}
    write_safetensors(out / DIFFUSERS_FILE, layout, make, metadata=sources)
    (out / "config.json").write_text(json.dumps(config.to_diffusers(), indent=2) + "\n")
    return out
