"""The compatibility matrix: use cases by GPUs, each cell the first way it fits and in what precision."""

from __future__ import annotations

import json
from dataclasses import dataclass

from runtime.config import get_preset, latent_size
from runtime.static import StaticShape

from .costs import FIT_LABELS, Fit, Gpu, best_fit, gpus


@dataclass(frozen=True)
class UseCase:
    name: str
    preset: str
    frames: int
    height: int
    width: int

    def shape(self, batch: int = 1) -> StaticShape:
        config = get_preset(self.preset)
        return StaticShape.for_latent(config, batch, latent_size(config, self.frames, self.height, self.width))


USE_CASES = (
    UseCase("Wan2.2 I2V 480p", "wan2.2-i2v-a14b", 81, 480, 832),
    UseCase("Wan2.2 I2V 720p", "wan2.2-i2v-a14b", 81, 720, 1280),
    UseCase("Wan2.2 T2V 480p", "wan2.2-t2v-a14b", 81, 480, 832),
    UseCase("Wan2.2 T2V 720p", "wan2.2-t2v-a14b", 81, 720, 1280),
    UseCase("Wan2.2 TI2V-5B 704p", "wan2.2-ti2v-5b", 121, 704, 1280),
    UseCase("Wan2.1 I2V 480p", "wan2.1-i2v-14b", 81, 480, 832),
    UseCase("Wan2.1 I2V 720p", "wan2.1-i2v-14b", 81, 720, 1280),
)


def compute(use_cases=USE_CASES, gpu_list: tuple[Gpu, ...] | None = None) -> dict[str, dict[str, Fit]]:
    gpu_list = gpu_list or gpus()
    return {u.name: {g.name: best_fit(get_preset(u.preset), u.shape(), g) for g in gpu_list} for u in use_cases}


LEGEND = ("cell = best precision that fits, batch 1 (one CFG branch per call, as diffusers calls it); "
          "+offload = the idle Wan2.2 expert waits in host memory; +stream = TensorRT weight streaming "
          "from host memory (slow); no = does not fit. Model: builder/planning/costs.py (weights exact, activations "
          "measured on an H200 and on the CPU).")


def render_text(table: dict[str, dict[str, Fit]]) -> list[str]:
    gpu_names = list(next(iter(table.values())))
    first = max(len(n) for n in table) + 2
    widths = [max([len(g)] + [len(row[g].short()) for row in table.values()]) for g in gpu_names]
    lines = [" " * first + "  ".join(g.ljust(w) for g, w in zip(gpu_names, widths))]
    for case, row in table.items():
        lines.append(case.ljust(first) + "  ".join(row[g].short().ljust(w) for g, w in zip(gpu_names, widths)))
    return lines + ["", LEGEND]


def render_markdown(table: dict[str, dict[str, Fit]]) -> list[str]:
    gpu_names = list(next(iter(table.values())))
    lines = ["| use case | " + " | ".join(gpu_names) + " |", "| --- |" + " --- |" * len(gpu_names)]
    for case, row in table.items():
        lines.append(f"| {case} | " + " | ".join(row[g].short() for g in gpu_names) + " |")
    return lines + ["", LEGEND]


def render_json(table: dict[str, dict[str, Fit]]) -> str:
    return json.dumps({case: {g: {"mode": f.mode, "label": FIT_LABELS[f.mode], "precision": f.precision,
                                  "needed_gb": round(f.needed_gb, 2), "gpu_gb": f.gpu_gb}
                              for g, f in row.items()} for case, row in table.items()}, indent=2)
