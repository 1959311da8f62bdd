"""Inspecting an engine folder: `wan-build list` and `wan-build verify`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from runtime.backends import load_engine, missing_library
from runtime.config import WanConfig
from runtime.fp8 import quantize_fp8
from runtime.manifest import Entry, EngineError, check_files, read_manifest, weights_fingerprint
from runtime.precision import Precision
from runtime.static import StaticWanTransformer, parameter_shapes
from runtime.weights import load_checkpoint, materialize

from .export import PARITY_SEED, PARITY_TOLERANCE, compare


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _shape_label(entry: Entry) -> str:
    s = entry.raw["shape"]
    video = f"{s['video_frames']}x{s['height']}x{s['width']}" if s.get("video_frames") else "?"
    return f"{video} b{s['batch']} ({s['tokens']} tok)"


def list_entries(folder: Path) -> list[str]:
    manifest = read_manifest(folder)
    entries = [Entry.from_json(e) for e in manifest.get("entries", {}).values()]
    if not entries:
        return [f"{folder}: no engines built yet"]
    rows = [("id", "expert", "shape (video, batch)", "backend", "precision", "size", "parity rel", "built")]
    for e in sorted(entries, key=lambda e: (e.expert, _shape_label(e), e.backend, e.precision)):
        size = sum(f["bytes"] for f in e.files.values()) / 1e6
        flag = " MISMATCH" if e.raw.get("allow_mismatch") else ""
        rows.append((e.id, e.expert, _shape_label(e), e.backend, e.precision, f"{size:.1f} MB",
                     f"{e.parity['relative']:.1e}{flag}", e.raw.get("built_at", "?")))
    return table(rows)


@dataclass
class Verified:
    entry: Entry
    status: str  # ok, failed, skipped
    detail: str


def verify(folder: Path, echo: Callable[[str], None] = print) -> list[Verified]:
    """Re-hash every file in full and re-run every entry's parity check against eager."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    experts = manifest.get("experts", {})
    results: list[Verified] = []
    checkpoints = {}
    materialized: dict[tuple, dict[str, torch.Tensor]] = {}
    for raw in manifest.get("entries", {}).values():
        entry = Entry.from_json(raw)
        problem = check_files(entry, folder, full=True)
        if problem:
            results.append(Verified(entry, "failed", problem))
            continue
        expert = experts.get(entry.expert, {})
        missing = missing_library(entry.backend)
        device = torch.device(entry.device.get("type", "cpu"))
        if missing or (device.type == "cuda" and not torch.cuda.is_available()):
            results.append(Verified(entry, "skipped", f"checksums ok; parity not re-run ({missing or 'needs CUDA'})"))
            continue
        if entry.expert not in checkpoints:
            try:
                ckpt = load_checkpoint(expert["weights"])
            except Exception as e:  # weights moved or unreadable: say so, keep verifying the rest
                checkpoints[entry.expert] = e
            else:
                checkpoints[entry.expert] = (ckpt, weights_fingerprint(ckpt.tensors, ckpt.files))
        loaded = checkpoints[entry.expert]
        if isinstance(loaded, Exception):
            results.append(Verified(entry, "failed", f"cannot read the weights {expert.get('weights')}: {loaded}"))
            continue
        ckpt, fingerprint = loaded
        if fingerprint != entry.weights_fingerprint:
            results.append(Verified(entry, "failed", f"the weights at {expert['weights']} changed since the build"))
            continue
        config = WanConfig.from_diffusers(expert["config"])
        key = (entry.expert, Precision(entry.precision).dtype, device)
        if key not in materialized:  # one copy per expert, dtype and device, as the build keeps
            materialized.clear()
            materialized[key] = materialize(ckpt.tensors, parameter_shapes(config), key[1], device)
        results.append(_rerun_parity(entry, folder, config, materialized[key], device))
        echo(f"{entry.describe()}: {results[-1].status} ({results[-1].detail})")
    return results


def _rerun_parity(entry: Entry, folder: Path, config: WanConfig, tensors: dict[str, torch.Tensor],
                  device: torch.device) -> Verified:
    precision = Precision(entry.precision)
    dtype = precision.dtype
    model = StaticWanTransformer.from_parameters(config, entry.shape, tensors).eval()
    tolerance = PARITY_TOLERANCE[entry.precision]
    if entry.backend == "aoti" and precision == Precision.FP8:
        quantize_fp8(model, config.num_layers)  # deterministic: the engine's own FP8 layers and reference
    elif precision.quantized:
        # TensorRT fp8/nvfp4: the build compared the engine with its calibrated fake quantization;
        # here it is compared with the unquantized model, so the bound adds the recorded quantization
        # error (||e - u|| <= ||e - q|| + ||q - u||, all on the same fixed-seed inputs).
        q = entry.raw["quantization_error"]["relative"]
        tolerance = tolerance * (1 + q) + q
    constants = model.constants()
    inputs = model.example_inputs(seed=PARITY_SEED, dtype=dtype, device=device)
    try:
        engine = load_engine(entry, folder, device, constants)
        with torch.no_grad():
            out, ref = engine(*inputs), model(*inputs)
    except Exception as e:  # report the library's error as a failed check
        return Verified(entry, "failed", f"cannot run: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    parity = compare(out, ref, tolerance)
    return Verified(entry, "ok" if parity.passed else "failed", parity.describe())


def verify_table(results: list[Verified]) -> list[str]:
    if not results:
        return ["no engines to verify"]
    rows = [("id", "expert", "backend", "precision", "status", "detail")]
    rows += [(r.entry.id, r.entry.expert, r.entry.backend, r.entry.precision, r.status, r.detail) for r in results]
    return table(rows)


def require_folder(folder: Path) -> Path:
    if not Path(folder).is_dir():
        raise EngineError(f"{folder}: no such engine folder")
    return Path(folder)
