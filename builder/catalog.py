"""Inspecting an engine folder: `wan-build list` and `wan-build verify`.

`verify` trusts nothing it checks: every file is re-hashed in full (not taken from this process's
memo), and only then is an entry loaded and run, from the very bytes that were checked. A package
whose files fail their hashes is never loaded, so its code never runs. The manifest's digest
(`sha256:...`) is what a deployment pins with `load_engines(folder, trusted=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from runtime.backends import backend
from runtime.config import WanConfig
from runtime.errors import WanBuildError
from runtime.integrity import HASHED, HashStats, weights_fingerprint
from runtime.manifest import Entry, EngineError, capability_of, check_files, read_manifest, tool_versions
from runtime.precision import Precision
from runtime.stages import StageModel, stage_example
from runtime.static import StaticWanTransformer, parameter_shapes
from runtime.weights import load_checkpoint, materialize

from .backends import builder
from .build.parity import PARITY_SEED, compare
from .tables import table


def _shape_label(entry: Entry) -> str:
    video = "x".join(map(str, entry.video)) if entry.video else "?"
    return f"{video} b{entry.shape.batch} ({entry.tokens} tok)"


def backend_label(entry: Entry) -> str:
    """The backend, and the stage for a stage entry ("onnxruntime prologue")."""
    return f"{entry.backend} {entry.stage}" if entry.stage else entry.backend


def list_entries(folder: Path) -> list[str]:
    manifest = read_manifest(folder)
    entries = list(manifest.entries.values())
    lines = []
    if not entries:
        lines.append(f"{folder}: no engines built yet")
    else:
        rows = [("id", "expert", "shape (video, batch)", "backend", "precision", "size", "parity rel", "built")]
        for e in sorted(entries, key=lambda e: (e.expert, _shape_label(e), e.backend, e.precision)):
            size = sum(f.bytes for f in e.files.values()) / 1e6
            flag = " MISMATCH" if e.allow_mismatch or not e.parity.passed else ""
            rows.append((e.id, e.expert, _shape_label(e), backend_label(e), e.precision, f"{size:.1f} MB",
                         f"{e.parity.relative:.1e}{flag}", e.built_at or "?"))
        lines += table(rows)
    lines += [f"malformed entry {key[:40]}: {reason}" for key, reason in manifest.bad_entries.items()]
    return lines


@dataclass
class Verified:
    entry: Entry | None  # None for a manifest record that is not an entry at all
    status: str  # ok, failed, skipped
    detail: str
    key: str = ""

    @property
    def id(self) -> str:
        return self.entry.id if self.entry is not None else self.key


@dataclass
class Verification:
    results: list[Verified]
    digest: str  # of the manifest as read
    hashed: HashStats  # what the checks read


    @property
    def passed(self) -> bool:
        return all(r.status != "failed" for r in self.results)


def verify(folder: Path, echo: Callable[[str], None] = print) -> Verification:
    """Re-hash every file in full, then load and re-run every entry's parity check against eager."""
    folder = Path(folder)
    before = HASHED.snapshot()
    manifest = read_manifest(folder)
    results = [Verified(None, "failed", f"malformed: {reason}", key) for key, reason in manifest.bad_entries.items()]
    checkpoints: dict[str, object] = {}
    materialized: dict[tuple, dict[str, torch.Tensor]] = {}
    versions = tool_versions()
    for entry in manifest.entries.values():
        b = backend(entry.backend)
        problem = check_files(entry, folder, b.required_files(entry), fresh=True)
        if problem:
            results.append(Verified(entry, "failed", problem))
            continue
        device = torch.device(entry.device_type)
        skip = b.missing_library() or (device.type == "cuda" and not torch.cuda.is_available() and "needs CUDA")
        if not skip:
            skip = b.compatibility(entry, device, capability_of(device), versions)
        if skip:
            results.append(Verified(entry, "skipped", f"checksums ok; parity not re-run ({skip})"))
            continue
        expert = manifest.experts.get(entry.expert)
        if expert is None:
            results.append(Verified(entry, "failed", f"the manifest has no {entry.expert} expert"))
            continue
        if entry.expert not in checkpoints:
            try:
                ckpt = load_checkpoint(expert.weights)
            except Exception as e:  # weights moved or unreadable: say so, keep verifying the rest
                checkpoints[entry.expert] = e
            else:
                checkpoints[entry.expert] = (ckpt, weights_fingerprint(ckpt.tensors, ckpt.files))
        loaded = checkpoints[entry.expert]
        if isinstance(loaded, Exception):
            results.append(Verified(entry, "failed", f"cannot read the weights {expert.weights}: {loaded}"))
            continue
        ckpt, fingerprint = loaded
        if fingerprint != entry.weights_fingerprint:
            results.append(Verified(entry, "failed", f"the weights at {expert.weights} changed since the build"))
            continue
        config = WanConfig.from_diffusers(expert.config)
        key = (entry.expert, Precision(entry.precision).dtype, device)
        if key not in materialized:  # one copy per expert, dtype and device, as the build keeps
            materialized.clear()
            materialized[key] = materialize(ckpt.tensors, parameter_shapes(config), key[1], device)
        results.append(rerun_parity(entry, folder, config, materialized[key], device))
        echo(f"{entry.describe()}: {results[-1].status} ({results[-1].detail})")
    return Verification(results, manifest.digest, HASHED.since(before))


def rerun_parity(entry: Entry, folder: Path, config: WanConfig, tensors: dict[str, torch.Tensor],
                 device: torch.device) -> Verified:
    precision = Precision(entry.precision)
    model = StaticWanTransformer.from_parameters(config, entry.shape, tensors).eval()
    try:
        tolerance = builder(entry.backend).verify_reference(entry, model)
    except WanBuildError as e:
        return Verified(entry, "failed", str(e))
    inputs = model.example_inputs(seed=PARITY_SEED, dtype=precision.dtype, device=device)
    if entry.stage is not None:  # a stage runs on what the whole model gives it
        inputs, _ = stage_example(model, entry.stage, inputs)
        model = StageModel(model, entry.stage)
    try:
        engine = backend(entry.backend).load(entry, folder, device, model)
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
    for r in results:
        e = r.entry
        rows.append((r.id[:40], e.expert if e else "?", backend_label(e) if e else "?", e.precision if e else "?", r.status,
                     r.detail))
    return table(rows)


def require_folder(folder: Path) -> Path:
    if not Path(folder).is_dir():
        raise EngineError(f"{folder}: no such engine folder")
    return Path(folder)

