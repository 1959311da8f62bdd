"""`build(profile) -> report`: every (expert x shape x precision x backend) entry of a profile.

- An entry already in the manifest whose files still pass their checks (hashed in full) is kept.
- Each entry is built in `.partial-<id>-<pid>/` and renamed into place only after it passed its
  parity gate; the manifest is rewritten atomically after every entry. An interrupted build
  (an error, kill -9, a full disk) leaves no half entry and a manifest that lists only finished
  ones; the next build resumes. Each entry folder also holds its own record (`entry.json`).
- A lock file serialises builds of one folder: a second build waits, then skips what the first built.
- An entry this machine cannot build (a library or a GPU missing) is skipped with the reason. An
  entry that fails (a user error, an exporter, compiler or library error, a parity failure, a full
  disk) is marked failed with a one-line reason and the build goes on to the next; `allow_mismatch`
  lets a parity failure through, recorded as such in the manifest.
- An unreadable manifest stops the build before anything is written (`rebuild_manifest` recovers
  the entries from their folders instead).

Build steps, in order: `entries` (what to build and its id), `folder` (lock, atomic writes, shared
weights, manifest), the backend's `build` (`builder.backends`: export, compile, quantize), `parity`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from runtime.backends import input_infos
from runtime.errors import WanBuildError
from runtime.integrity import file_key, sha256_file, weights_fingerprint
from runtime.manifest import (ENTRY_FILE, PARITY_FILE, Entry, EngineError, ExpertRecord, FileInfo, Manifest,
                              ParityInfo, TensorInfo, device_info, tool_versions)
from runtime.precision import Precision
from runtime.stages import StageModel, stage_example
from runtime.static import StaticWanTransformer, parameter_shapes, weights_layout
from runtime.weights import Checkpoint, load_checkpoint, materialize

from ..backends import Job, builder
from ..profiles import Profile
from ..quantize.calibration import calls_for, load_calls
from ..tables import table
from .entries import PlannedEntry, calibrated, plan_entries
from .folder import (WEIGHTS_STORE, FolderError, check_kept, clear_stale, folder_lock, install, open_manifest,
                     remove, write_atomic, write_manifest)
from .parity import PARITY_SEED, gate

Echo = Callable[[str], None]


class BuildFailed(EngineError):
    """One entry could not be built; the message says which and why."""


@dataclass
class EntryResult:
    entry: PlannedEntry
    status: str  # built, rebuilt, kept, skipped, failed
    seconds: float = 0.0
    relative_error: float | None = None
    message: str = ""
    host: str | None = None  # the machine that built it (fleet builds)

    def to_json(self) -> dict[str, Any]:
        e = self.entry
        out = {"id": e.id, "expert": e.expert.name, "shape": e.spec.label(), "precision": e.precision,
               "backend": e.backend, "status": self.status, "seconds": round(self.seconds, 2),
               "relative_error": self.relative_error, "message": self.message}
        if e.stage is not None:
            out["stage"] = e.stage
        if self.host is not None:
            out["host"] = self.host
        return out


@dataclass
class BuildReport:
    folder: Path
    results: list[EntryResult] = field(default_factory=list)

    @property
    def failed(self) -> list[EntryResult]:
        return [r for r in self.results if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        return counts

    def table(self) -> list[str]:
        rows = [("expert", "shape", "precision", "backend", "status", "time", "rel.err", "entry / reason")]
        for r in self.results:
            e = r.entry
            err = "" if r.relative_error is None else f"{r.relative_error:.1e}"
            rows.append((e.expert.name, e.spec.label(), e.precision, e.backend, r.status, f"{r.seconds:.1f}s", err,
                         r.message or e.id))
        return table(rows)

    def to_json(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "counts": self.counts(), "entries": [r.to_json() for r in self.results]}


def one_line(e: BaseException) -> str:
    """An exception as one line: the message of a user error, `Type: first line` of anything else."""
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return text if isinstance(e, WanBuildError) else f"{type(e).__name__}: {text}"


def _resolve_device(profile: Profile) -> torch.device:
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise BuildFailed(f"{profile.source}: device: cuda, but torch sees no CUDA GPU here "
                          f"(torch {torch.__version__}); use device: cpu or auto")
    if profile.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(profile.device)


class _Progress:
    """Which entry, how far, and how long is left (from the entries built so far)."""

    def __init__(self, total: int, echo: Echo):
        self.total, self.echo, self.durations = total, echo, []

    def eta(self, done: int) -> str:
        if not self.durations or done >= self.total:
            return ""
        left = (self.total - done) * sum(self.durations) / len(self.durations)
        return f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"


# -- building -------------------------------------------------------------------------------------
@dataclass
class Started:
    """What a build holds once it has the lock: the manifest, the experts' checkpoints (mapped) and
    fingerprints, the calibration calls (None without)."""
    manifest: Manifest
    checkpoints: dict[str, Checkpoint]
    fingerprints: dict[str, str]
    calls: list | None


def begin(profile: Profile, out: Path, rebuild_manifest: bool, echo: Echo) -> Started:
    """The start of every build, under the folder lock: stale partial folders cleared, the manifest
    opened (or recovered), each expert's weights read and fingerprinted, calibration calls read."""
    clear_stale(out)
    manifest = open_manifest(out, profile.name, rebuild_manifest, echo)
    manifest.name, manifest.profile = profile.name, _profile_json(profile)
    checkpoints: dict[str, Checkpoint] = {}
    fingerprints: dict[str, str] = {}
    for expert in profile.experts:
        echo(f"reading {expert.name} weights from {expert.weights}")
        ckpt = load_checkpoint(expert.weights, preset=profile.config)
        checkpoints[expert.name] = ckpt
        fingerprints[expert.name] = weights_fingerprint(ckpt.tensors, ckpt.files)
        manifest.experts[expert.name] = ExpertRecord(
            str(Path(expert.weights).resolve()), fingerprints[expert.name], ckpt.layout,
            {**profile.config.to_diffusers(), "name": profile.config.name})
        del ckpt  # `checkpoints` holds them: released phases drop the mapping from there alone
    manifest.boundary = profile.boundary
    write_manifest(out, manifest)
    if "fp16" in profile.precisions:
        echo("note: fp16 chosen; Wan's activations are known to overflow in FP16 (bf16 is the default and "
             "keeps fp32's range)")
    calls = None
    if profile.calibration is not None and any(calibrated(p, b) for p in profile.precisions
                                               for b in profile.backends):
        echo(f"reading calibration calls from {profile.calibration}")
        calls = load_calls(profile.calibration, profile.config, tuple(e.name for e in profile.experts),
                           profile.boundary)
    return Started(manifest, checkpoints, fingerprints, calls)


def build(profile: Profile, out: Path | None = None, *, allow_mismatch: bool = False, rebuild_manifest: bool = False,
          echo: Echo = print, ray: str | None = None, retries: int = 1, cpus_per_entry: int = 1) -> BuildReport:
    """Build every entry of `profile` into `out`. With `ray` (an address, "auto" or "local") each entry
    is a Ray task on a worker of that cluster (`builder.fleet`); without it, here, one at a time."""
    out = Path(out) if out is not None else Path("engines") / profile.name
    if ray is not None:
        from ..fleet import build_on_ray

        return build_on_ray(profile, out, ray, allow_mismatch=allow_mismatch, rebuild_manifest=rebuild_manifest,
                            echo=echo, retries=retries, cpus_per_entry=cpus_per_entry)
    device = _resolve_device(profile)
    report = BuildReport(out)
    with folder_lock(out, echo):
        start = begin(profile, out, rebuild_manifest, echo)
        manifest, checkpoints, fingerprints, calls = start.manifest, start.checkpoints, start.fingerprints, start.calls
        if profile.targets:
            echo(f"note: the profile targets {', '.join(profile.targets)}; without --ray the entries are built for "
                 f"this machine's {device_info(device)['name']}")
        planned = plan_entries(profile, fingerprints, device, calls)
        for entry in planned:  # before building anything: every calibrated entry this machine builds has calls
            if calls is not None and entry.calibrated and not entry.calibration \
                    and builder(entry.backend).unavailable(Precision(entry.precision), device) is None:
                calls_for(calls, entry.expert.name, entry.shape, entry.label())
        loaded: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]] = {}

        identities = {name: [file_key(f) for f in c.files] for name, c in checkpoints.items()}

        def tensors_for(entry: PlannedEntry) -> dict[str, torch.Tensor]:
            """The expert's weights in the entry's dtype on the build device, made once per expert and
            dtype (on a GPU each is a full host-to-device copy); one expert's are kept at a time. A
            checkpoint released by a phase that needed the memory is mapped again, if unchanged."""
            name = entry.expert.name
            key = (name, Precision(entry.precision).dtype)
            if key not in loaded:
                if any(other != name for other, _ in loaded):
                    loaded.clear()
                if name not in checkpoints:
                    checkpoints[name] = load_checkpoint(entry.expert.weights, preset=profile.config)
                    if [file_key(f) for f in checkpoints[name].files] != identities[name]:
                        raise BuildFailed(f"the {name} weights at {entry.expert.weights} changed during the build; "
                                          "run the build again")
                loaded[key] = materialize(checkpoints[name].tensors, parameter_shapes(profile.config), key[1],
                                          device)
            return loaded[key]

        def release() -> None:
            """Drop every copy and mapping of the weights the build holds (the next entry maps them again)."""
            loaded.clear()
            checkpoints.clear()

        progress = _Progress(len(planned), echo)
        for i, entry in enumerate(planned, 1):
            prefix = f"[{i}/{len(planned)}] {entry.label()}"
            result = _build_one(entry, tensors_for, profile, out, manifest, device, allow_mismatch, echo, prefix,
                                release)
            if result.status in ("built", "rebuilt"):
                echo(f"{prefix}: writing the manifest")
                try:
                    write_manifest(out, manifest)
                except FolderError as e:  # the entry is in place but unrecorded: take it out again
                    manifest.entries.pop(entry.id, None)
                    remove(out / entry.id)
                    result = EntryResult(entry, "failed", result.seconds, None, str(e))
                progress.durations.append(result.seconds)
            report.results.append(result)
            err = "" if result.relative_error is None else f", parity rel {result.relative_error:.1e}"
            echo(f"{prefix}: {result.status} in {result.seconds:.1f}s{err}"
                 + (f" ({result.message})" if result.message else "") + progress.eta(i))
    return report


def _build_one(entry: PlannedEntry, tensors_for: Callable[[PlannedEntry], dict[str, torch.Tensor]],
               profile: Profile, out: Path, manifest: Manifest, device: torch.device, allow_mismatch: bool,
               echo: Echo, prefix: str, release: Callable[[], None] = lambda: None) -> EntryResult:
    start = time.perf_counter()
    status = "built"
    existing = manifest.entries.get(entry.id)
    if existing is not None:
        problem = check_kept(existing, out)
        if problem is None:
            return EntryResult(entry, "kept", time.perf_counter() - start, existing.parity.relative)
        echo(f"{prefix}: rebuilding ({problem})")
        status = "rebuilt"
    elif entry.id in manifest.raw_bad_entries:
        echo(f"{prefix}: rebuilding (its manifest record is malformed: {manifest.bad_entries.get(entry.id)})")
        status = "rebuilt"
    reason = skip_reason(entry, device)
    if reason:
        return EntryResult(entry, "skipped", 0.0, None, reason)
    warning = memory_warning(entry, profile, device)
    if warning:
        echo(f"{prefix}: warning: {warning}")
    echo(f"{prefix}: loading the weights")
    tmp = out / f".partial-{entry.id}-{os.getpid()}"
    try:
        record = build_files(entry, tensors_for(entry), profile, tmp, out / WEIGHTS_STORE, device, allow_mismatch,
                             lambda stage: echo(f"{prefix}: {stage}"), start, release)
        install(tmp, out / entry.id)
    except Exception as e:  # every way an entry fails: it alone is marked failed, with one line
        remove(tmp)
        return EntryResult(entry, "failed", time.perf_counter() - start, None,
                           one_line(e) if isinstance(e, BuildFailed) else f"{entry.label()}: {one_line(e)}")
    except BaseException:
        remove(tmp)
        raise
    manifest.entries[entry.id] = record
    manifest.raw_bad_entries.pop(entry.id, None)
    manifest.bad_entries.pop(entry.id, None)
    return EntryResult(entry, status, record.build_seconds, record.parity.relative,
                       "PARITY FAILED, kept by --allow-mismatch" if record.allow_mismatch else "")


def skip_reason(entry: PlannedEntry, device: torch.device) -> str | None:
    """Why this machine cannot build `entry` (a library or a GPU missing, a stage of a quantized
    precision), or None."""
    reason = builder(entry.backend).unavailable(Precision(entry.precision), device)
    if reason is None and entry.stage is not None:
        reason = builder(entry.backend).stage_problem(Precision(entry.precision))
    return reason


def memory_warning(entry: PlannedEntry, profile: Profile, device: torch.device) -> str | None:
    """A warning when this machine has less memory free than the planner says the entry's build needs
    (beyond what this process already holds); None when it has enough or cannot tell."""
    from ..planning.costs import available_host_bytes, build_memory

    available = available_host_bytes()
    if available is None:
        return None
    need = build_memory(profile.config, entry.shape, entry.precision, entry.backend, device.type,
                        strip_weights=profile.tensorrt.strip_weights)["host"].total
    held = _resident_bytes()
    if need - held <= available:
        return None
    return (f"the build needs about {need / 1e9:.1f} GB of host RAM (the planner's figure) and this machine "
            f"has {(available + held) / 1e9:.1f} GB for it; it may run out of memory (free memory, build "
            "fewer entries at a time, or build on a larger machine)")


def _resident_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


def build_files(entry: PlannedEntry, tensors: dict[str, torch.Tensor], profile: Profile, folder: Path, store: Path,
                device: torch.device, allow_mismatch: bool, stage: Echo = lambda s: None,
                start: float | None = None, release: Callable[[], None] = lambda: None) -> Entry:
    """Build `entry` into `folder` (created here) and return its record; raises on any failure."""
    start = time.perf_counter() if start is None else start
    config, shape = profile.config, entry.shape
    dtype = Precision(entry.precision).dtype
    backend = builder(entry.backend)
    model = StaticWanTransformer.from_parameters(config, shape, tensors).eval()
    inputs = model.example_inputs(seed=PARITY_SEED, dtype=dtype, device=device)
    if entry.stage is None:
        specs, outputs = input_infos(model.input_specs(dtype)), input_infos([model.output_spec(dtype)])
    else:  # a stage, on the values the whole model gives it for the parity inputs
        stage(f"computing the {entry.stage} stage's inputs (eager)")
        inputs, expected = stage_example(model, entry.stage, inputs)
        model = StageModel(model, entry.stage)
        specs = tuple(TensorInfo.of(n, tuple(t.shape), t.dtype) for n, t in zip(model.input_names, inputs))
        outputs = tuple(TensorInfo.of(n, tuple(t.shape), t.dtype) for n, t in zip(model.output_names, expected))
        del expected
    folder.mkdir(parents=True)
    video = (entry.spec.frames, entry.spec.height, entry.spec.width)
    draft = Entry(entry.id, entry.backend, entry.precision, entry.expert.name, shape, video, shape.tokens(config),
                  specs, outputs, {}, tool_versions(),
                  device_info(device), entry.identity["weights"], ParityInfo(math.nan, math.nan, math.nan, math.nan),
                  onnx_opset=entry.identity.get("onnx_opset"), options=backend.options(profile), stage=entry.stage)
    front = backend.front_weights(Precision(entry.precision), profile)
    if front:
        draft = dataclasses.replace(draft, options={**draft.options, "weights": "front"})
    def release_weights() -> None:
        """For phases that need no torch weights (an ONNX Runtime session, a TensorRT build): the build's
        copies and mappings go, and the model's references to them; the caller keeps what it needs."""
        release()
        tensors.clear()  # this entry's reference to them
        model.to("meta")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    job = Job(entry, model, inputs, profile, folder, store, device, draft, stage, release_weights=release_weights)
    out, reference = backend.build(job)
    parity = gate(out, reference, entry.precision)
    stage(f"parity {parity.describe()}; writing the entry")
    if not parity.passed and not allow_mismatch:
        raise BuildFailed(f"parity failed for {entry.label()}: {parity.describe()}; "
                          "the engine was not written (--allow-mismatch keeps it, marked in the manifest)")
    quantization_error = job.record.get("quantization_error")
    write_atomic(folder / PARITY_FILE, (json.dumps(
        {"seed": PARITY_SEED, "reference": f"eager {entry.precision}", "sample": parity.to_json(),
         "quantization_error": quantization_error}, indent=2) + "\n").encode())
    # the large files were hashed as they were stored (share_weights); the memo serves them here
    files = {p.name: FileInfo(sha256_file(p), p.stat().st_size)
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != ENTRY_FILE}
    options = dict(draft.options)
    if front:  # the layout of the tensors the engine was handed (after any quantization of the build)
        options["weights_layout"] = weights_layout(model.weights())
    record = dataclasses.replace(
        draft, options=options, files=files, versions={**draft.versions, **job.record.get("versions", {})},
        parity=parity,
        allow_mismatch=not parity.passed, quantization_error=quantization_error, build=job.record.get("build", {}),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - start, 2))
    write_atomic(folder / ENTRY_FILE, record.to_bytes())
    return record


def _profile_json(profile: Profile) -> dict[str, Any]:
    return {"name": profile.name, "source": str(profile.source), "preset": profile.preset,
            "precisions": list(profile.precisions), "backends": list(profile.backends),
            "shapes": [vars(s) for s in profile.shapes], "text_tokens": profile.text_tokens,
            "device": profile.device, "onnx_opset": profile.onnx_opset,
            "experts": {e.name: str(e.weights) for e in profile.experts}, "boundary": profile.boundary,
            "cache_stages": profile.cache_stages}


__all__ = ["BuildFailed", "BuildReport", "EntryResult", "PlannedEntry", "build", "build_files", "plan_entries"]
