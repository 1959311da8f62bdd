"""`build(profile) -> manifest`: every (expert x shape x precision x backend) entry of a profile.

- An entry already in the manifest whose files still pass their checks is kept, not rebuilt.
- Each entry is built in `.partial-<id>-<pid>/` and renamed into place only after it passed its
  parity gate; the manifest is rewritten (temp file + rename) after every entry. An interrupted
  build leaves no half entry and a manifest that lists only finished ones; the next build resumes.
- A lock file serialises builds of one folder: a second build waits, then skips what the first built.
- An entry this machine cannot build (a library or a GPU missing) is skipped with the reason; an
  entry that fails (export error, parity) fails the build, unless `allow_mismatch` lets a parity
  failure through, recorded as such in the manifest.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from runtime.backends import missing_library
from runtime.fp8 import Fp8Unsupported, check_fp8_device, quantize_fp8
from runtime.errors import WanBuildError
from runtime.manifest import (FORMAT, MANIFEST, PLAN_FILE, Entry, EngineError, check_files, device_info, entry_id,
                              sha256_cache_dir, sha256_file, shape_json, tool_versions, weights_fingerprint)
from runtime.precision import Precision
from runtime.static import StaticShape, StaticWanTransformer, parameter_shapes
from runtime.weights import Checkpoint, load_checkpoint, materialize

from .aoti import compile_aoti
from .export import PARITY_SEED, PARITY_TOLERANCE, compare, export_onnx, share_weights
from .onnx_check import check_for_tensorrt
from .calibration import Call, calls_for, fingerprint, load_calls
from .catalog import table
from .nvfp4 import FP4_DATA, insert_nvfp4_qdq
from .quantize import calibrate_fp8, calibrate_nvfp4, insert_fp8_qdq
from .tensorrt import build_plan
from .profiles import Expert, Profile, ShapeSpec

Echo = Callable[[str], None]
WEIGHTS_STORE = ".weights"  # one copy of each ONNX weights file, hard-linked into the entries
FP8_CALIBRATION_BATCHES = 4  # fixed-seed calibration inputs at the entry's shape


class BuildFailed(EngineError):
    """One entry could not be built; the message says which and why."""


@dataclass(frozen=True)
class PlannedEntry:
    expert: Expert
    spec: ShapeSpec
    shape: StaticShape
    precision: str
    backend: str
    id: str
    identity: dict[str, Any]
    calibration: tuple[Call, ...] = ()  # recorded calls this entry calibrates on (fp8/nvfp4 tensorrt)

    def label(self) -> str:
        return f"{self.expert.name} {self.spec.label()} {self.precision} {self.backend}"


@dataclass
class EntryResult:
    entry: PlannedEntry
    status: str  # built, rebuilt, kept, skipped, failed
    seconds: float = 0.0
    relative_error: float | None = None
    message: str = ""


@dataclass
class BuildReport:
    folder: Path
    results: list[EntryResult] = field(default_factory=list)

    @property
    def failed(self) -> list[EntryResult]:
        return [r for r in self.results if r.status == "failed"]

    def table(self) -> list[str]:
        rows = [("expert", "shape", "precision", "backend", "status", "time", "rel.err", "entry / reason")]
        for r in self.results:
            e = r.entry
            err = "" if r.relative_error is None else f"{r.relative_error:.1e}"
            rows.append((e.expert.name, e.spec.label(), e.precision, e.backend, r.status, f"{r.seconds:.1f}s", err,
                         r.message or e.id))
        return table(rows)


# -- folder plumbing ------------------------------------------------------------------------------
@contextmanager
def folder_lock(folder: Path, echo: Echo) -> Iterator[None]:
    """Exclusive lock on `folder/.lock`; a second build waits for the first."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            echo(f"waiting for the build that holds {folder / '.lock'} ({holder})")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_or_new_manifest(folder: Path, profile: Profile) -> dict[str, Any]:
    path = folder / MANIFEST
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("format") == FORMAT:
                return data
        except ValueError:
            pass
    return {"format": FORMAT, "name": profile.name, "experts": {}, "entries": {}}


def _resolve_device(profile: Profile) -> torch.device:
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise BuildFailed(f"{profile.source}: device: cuda, but torch sees no CUDA GPU here "
                          f"(torch {torch.__version__}); use device: cpu or auto")
    if profile.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(profile.device)


# -- planning -------------------------------------------------------------------------------------
def calibrated(precision: str, backend: str) -> bool:
    """Entries whose quantization scales are calibrated (the others quantize at run time or not at all)."""
    return backend == "tensorrt" and Precision(precision).quantized


def plan_entries(profile: Profile, fingerprints: dict[str, str], device: torch.device,
                 calls: list[Call] | None = None) -> list[PlannedEntry]:
    """Every entry the profile asks for, with its id. With `calls` (the profile's calibration data),
    calibrated entries get those of their expert and shape (checked by `build` before building)."""
    versions = tool_versions()
    dev = device_info(device)
    config = {k: v for k, v in profile.config.to_diffusers().items() if not k.startswith("_")}
    out = []
    for expert in profile.experts:
        for spec in profile.shapes:
            shape = profile.static_shape(spec)
            for precision in profile.precisions:
                for backend in profile.backends:
                    identity = {"backend": backend, "precision": precision, "config": config,
                                "weights": fingerprints[expert.name],
                                "shape": shape_json(shape, profile.config, None), "torch": versions["torch"]}
                    if backend in ("onnxruntime", "tensorrt"):
                        identity["onnx_opset"] = profile.onnx_opset
                    if backend == "aoti":
                        identity["device"] = dev["type"] if dev["type"] != "cuda" else dev["compute_capability"]
                    if backend == "tensorrt":
                        identity.update(tensorrt=versions["tensorrt"], gpu=dev["compute_capability"],
                                        options={k: str(v) for k, v in vars(profile.tensorrt).items()
                                                 if k not in ("timing_cache", "cuda_graphs")})
                    mine: tuple[Call, ...] = ()
                    if calibrated(precision, backend):
                        identity["modelopt"] = versions["modelopt"]
                        if calls:
                            mine = tuple(c for c in calls if c.expert == expert.name and c.shape == shape)
                            identity["calibration"] = fingerprint([c.file for c in mine])
                    out.append(PlannedEntry(expert, spec, shape, precision, backend, entry_id(identity), identity,
                                            mine))
    return out


def unavailable(entry: PlannedEntry, device: torch.device) -> str | None:
    """Why this machine cannot build `entry` at all (skipped, not failed), or None."""
    missing = missing_library(entry.backend)
    if missing:
        return missing
    precision = Precision(entry.precision)
    if entry.backend == "onnxruntime" and precision.quantized:
        return (f"{entry.precision} engines are built by the tensorrt backend"
                + (" and aoti" if precision == Precision.FP8 else "") + "; onnxruntime builds fp32, fp16 and bf16")
    if entry.backend == "onnxruntime" and device.type == "cpu" and precision != Precision.FP32 \
            and precision != Precision.FP16:
        return f"ONNX Runtime's CPU provider has no {entry.precision} kernels; build it on a GPU machine"
    if entry.backend == "aoti" and precision == Precision.NVFP4:
        return "NVFP4 engines are built by the tensorrt backend only"
    if entry.backend == "aoti" and precision == Precision.FP8:
        try:
            check_fp8_device(device)
        except Fp8Unsupported as e:
            return str(e)
    if entry.backend == "tensorrt":
        if device.type != "cuda":
            return "TensorRT builds need an NVIDIA GPU (torch sees none here)"
        cc = tuple(int(x) for x in device_info(device)["compute_capability"].split("."))
        if precision == Precision.FP8 and cc < (8, 9):
            return f"FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); this GPU is {cc[0]}.{cc[1]}"
        if precision == Precision.NVFP4 and cc < (10, 0):
            return (f"NVFP4 needs a Blackwell GPU (compute capability 10.0 or newer); this GPU is "
                    f"{cc[0]}.{cc[1]}; use fp8 or bf16 here")
    return None


# -- building -------------------------------------------------------------------------------------
def build(profile: Profile, out: Path | None = None, *, allow_mismatch: bool = False, echo: Echo = print
          ) -> BuildReport:
    out = Path(out) if out is not None else Path("engines") / profile.name
    device = _resolve_device(profile)
    report = BuildReport(out)
    with folder_lock(out, echo):
        for stale in out.glob(".partial-*"):  # we hold the lock: no one else is writing these
            shutil.rmtree(stale, ignore_errors=True)
        manifest = _read_or_new_manifest(out, profile)
        manifest["profile"] = _profile_json(profile)
        checkpoints: dict[str, Checkpoint] = {}
        fingerprints: dict[str, str] = {}
        for expert in profile.experts:
            echo(f"reading {expert.name} weights from {expert.weights}")
            ckpt = load_checkpoint(expert.weights, preset=profile.config)
            checkpoints[expert.name] = ckpt
            fingerprints[expert.name] = weights_fingerprint(ckpt.tensors, ckpt.files)
            manifest["experts"][expert.name] = {
                "weights": str(Path(expert.weights).resolve()), "fingerprint": fingerprints[expert.name],
                "layout": ckpt.layout, "config": {**profile.config.to_diffusers(), "name": profile.config.name}}
        if profile.boundary is not None:
            manifest["boundary"] = profile.boundary
        write_json_atomic(out / MANIFEST, manifest)

        if "fp16" in profile.precisions:
            echo("note: fp16 chosen; Wan's activations are known to overflow in FP16 (bf16 is the default and "
                 "keeps fp32's range)")
        calls = None
        if profile.calibration is not None and any(calibrated(p, b) for p in profile.precisions
                                                   for b in profile.backends):
            echo(f"reading calibration calls from {profile.calibration}")
            calls = load_calls(profile.calibration, profile.config, tuple(e.name for e in profile.experts),
                               profile.boundary)
        planned = plan_entries(profile, fingerprints, device, calls)
        for entry in planned:  # before building anything: every calibrated entry this machine builds has calls
            if calls is not None and calibrated(entry.precision, entry.backend) and not entry.calibration \
                    and unavailable(entry, device) is None:
                calls_for(calls, entry.expert.name, entry.shape, entry.label())
        loaded: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]] = {}

        def tensors_for(entry: PlannedEntry) -> dict[str, torch.Tensor]:
            """The expert's weights in the entry's dtype on the build device, made once per expert and
            dtype (on a GPU each is a full host-to-device copy); one expert's are kept at a time."""
            key = (entry.expert.name, Precision(entry.precision).dtype)
            if key not in loaded:
                if any(name != key[0] for name, _ in loaded):
                    loaded.clear()
                loaded[key] = materialize(checkpoints[key[0]].tensors, parameter_shapes(profile.config), key[1],
                                          device)
            return loaded[key]

        for i, entry in enumerate(planned, 1):
            prefix = f"[{i}/{len(planned)}] {entry.label()}"
            result = _build_one(entry, tensors_for, profile, out, manifest, device, allow_mismatch, echo, prefix)
            report.results.append(result)
            err = "" if result.relative_error is None else f", parity rel {result.relative_error:.1e}"
            echo(f"{prefix}: {result.status} in {result.seconds:.1f}s{err}"
                 + (f" ({result.message})" if result.message else ""))
            write_json_atomic(out / MANIFEST, manifest)
    return report


def _build_one(entry: PlannedEntry, tensors_for: Callable[[PlannedEntry], dict[str, torch.Tensor]],
               profile: Profile, out: Path, manifest: dict[str, Any], device: torch.device, allow_mismatch: bool,
               echo: Echo, prefix: str) -> EntryResult:
    start = time.perf_counter()
    existing = manifest["entries"].get(entry.id)
    status = "built"
    if existing is not None:
        problem = check_files(Entry.from_json(existing), out)
        if problem is None:
            return EntryResult(entry, "kept", 0.0, existing["parity"]["relative"])
        echo(f"{prefix}: rebuilding ({problem})")
        del manifest["entries"][entry.id]
        status = "rebuilt"
    reason = unavailable(entry, device)
    if reason:
        return EntryResult(entry, "skipped", 0.0, None, reason)
    echo(f"{prefix}: building")
    tmp = out / f".partial-{entry.id}-{os.getpid()}"
    try:
        record = _build_files(entry, tensors_for(entry), profile, tmp, device, allow_mismatch)
    except BuildFailed as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return EntryResult(entry, "failed", time.perf_counter() - start, None, str(e))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = out / entry.id
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    seconds = time.perf_counter() - start
    record["build_seconds"] = round(seconds, 2)
    manifest["entries"][entry.id] = record
    return EntryResult(entry, status, seconds, record["parity"]["relative"],
                       "PARITY FAILED, kept by --allow-mismatch" if record["allow_mismatch"] else "")


def _build_files(entry: PlannedEntry, tensors: dict[str, torch.Tensor], profile: Profile, folder: Path,
                 device: torch.device, allow_mismatch: bool) -> dict[str, Any]:
    config, shape = profile.config, entry.shape
    dtype = Precision(entry.precision).dtype
    model = StaticWanTransformer.from_parameters(config, shape, tensors).eval()
    inputs = model.example_inputs(seed=PARITY_SEED, dtype=dtype, device=device)
    extra: dict[str, Any] = {"quantization_error": None}
    folder.mkdir(parents=True)
    try:
        builder = {"onnxruntime": _onnxruntime, "aoti": _aoti, "tensorrt": _tensorrt}[entry.backend]
        out, reference = builder(entry, model, inputs, profile, folder, device, extra)
    except (BuildFailed, WanBuildError):
        raise
    except Exception as e:  # exporter, compiler or library errors: name the entry and the first line
        raise BuildFailed(f"{entry.label()}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from e
    parity = compare(out, reference, PARITY_TOLERANCE[entry.precision])
    if not parity.passed and not allow_mismatch:
        raise BuildFailed(f"parity failed for {entry.label()}: {parity.describe()}; "
                          "the engine was not written (--allow-mismatch keeps it, marked in the manifest)")
    (folder / "parity.json").write_text(json.dumps({"seed": PARITY_SEED, "reference": f"eager {entry.precision}",
                                                    "sample": parity.to_json(), **extra}, indent=2) + "\n")
    model_spec = lambda s: {"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype).replace("torch.", "")}  # noqa
    # cached: share_weights has just hashed the (large) weights files in full, under this inode and mtime
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file()}
    video = (entry.spec.frames, entry.spec.height, entry.spec.width)
    versions = tool_versions()
    versions.update(extra.pop("versions", {}))
    return {
        "id": entry.id, "backend": entry.backend, "precision": entry.precision, "expert": entry.expert.name,
        "shape": shape_json(shape, config, video),
        "inputs": [model_spec(s) for s in model.input_specs(dtype)], "outputs": [model_spec(model.output_spec())],
        "versions": versions, "device": device_info(device), "onnx_opset": entry.identity.get("onnx_opset"),
        "files": files, "weights_fingerprint": entry.identity["weights"],
        "parity": parity.to_json(), "allow_mismatch": not parity.passed, **extra,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _onnxruntime(entry, model, inputs, profile, folder, device, extra):
    from runtime.backends.onnxruntime import OnnxRuntimeEngine

    with torch.no_grad():
        reference = model(*inputs)
    constants = model.constants()
    path = export_onnx(profile.config, entry.shape, constants, model.dtype, folder, profile.onnx_opset)
    share_weights(folder, folder.parent / WEIGHTS_STORE)
    ort_device = device if device.type == "cuda" else torch.device("cpu")
    out = OnnxRuntimeEngine(path, ort_device, constants)(*(t.to(ort_device) for t in inputs))
    return out, reference


def _aoti(entry, model, inputs, profile, folder, device, extra):
    from runtime.backends.aoti import AOTIEngine

    with torch.no_grad():
        unquantized = model(*inputs)
    reference = unquantized
    if entry.precision == Precision.FP8.value:  # FP8 linear layers through torch._scaled_mm
        quantize_fp8(model, profile.config.num_layers)
        with torch.no_grad():
            reference = model(*inputs)
        extra["quantization_error"] = compare(reference, unquantized, 1.0).to_json()
    constants = model.constants()
    path = compile_aoti(model, inputs, folder)
    return AOTIEngine(path, constants)(*inputs), reference


def prepare_tensorrt_onnx(entry: PlannedEntry, model: StaticWanTransformer, inputs: tuple[torch.Tensor, ...],
                          profile: Profile, folder: Path, extra: dict[str, Any]) -> tuple[Path, torch.Tensor]:
    """Everything before TensorRT (runs without it): export in the entry's dtype; for fp8 and nvfp4,
    calibration with Model Optimizer (on the entry's recorded calls, or fixed-seed inputs) and Q/DQ
    insertion; weights shared; the graph checked. Returns the ONNX and the eager reference of
    exactly what the engine computes (fake-quantized for FP8, emulated for NVFP4)."""
    config = profile.config
    constants = model.constants()
    path = export_onnx(config, entry.shape, constants, model.dtype, folder, profile.onnx_opset)
    seeds = range(PARITY_SEED + 1, PARITY_SEED + 1 + FP8_CALIBRATION_BATCHES)
    calibration_inputs = (model.example_inputs(seed=s, dtype=model.dtype) for s in seeds)
    if entry.calibration:  # the user's recorded calls instead
        device = model.rope_cos.device
        calibration_inputs = (tuple(t.to(device=device, dtype=model.dtype if t.is_floating_point() and i != 1
                                         else t.dtype) for i, t in enumerate(call.inputs))
                              for call in entry.calibration)
        extra["calibration_calls"] = [call.file.name for call in entry.calibration]
    if entry.precision == Precision.FP8.value:
        calibration = calibrate_fp8(model, calibration_inputs, inputs)
        insert_fp8_qdq(path, calibration, model.dtype)
        reference = calibration.output  # Model Optimizer's fake quantization: what the engine computes
        extra["quantization_error"] = {**calibration.to_json(), "relative": calibration.relative_error}
    elif entry.precision == Precision.NVFP4.value:
        calibration = calibrate_nvfp4(model, calibration_inputs, inputs)
        insert_nvfp4_qdq(path, calibration.input_amax, {n: model.get_submodule(n).weight
                                                         for n in calibration.input_amax}, model.dtype)
        reference = calibration.output  # the engine's arithmetic, emulated
        extra["quantization_error"] = {**calibration.to_json(), "relative": calibration.relative_error}
        share_weights(folder, folder.parent / WEIGHTS_STORE, FP4_DATA)
    else:
        with torch.no_grad():
            reference = model(*inputs)
    share_weights(folder, folder.parent / WEIGHTS_STORE)
    extra["onnx_check"] = check_for_tensorrt(path, config)
    return path, reference


def _tensorrt(entry, model, inputs, profile, folder, device, extra):
    from runtime.backends.tensorrt import TensorRTEngine

    constants = model.constants()
    path, reference = prepare_tensorrt_onnx(entry, model, inputs, profile, folder, extra)
    gpu = device_info(device)
    info = build_plan(path, folder / PLAN_FILE, profile.tensorrt, _timing_cache_dir(), gpu["name"],
                      gpu["compute_capability"])
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(profile.tensorrt).items()}
    extra.update(tensorrt_options=options, tensorrt_build=vars(info), versions={"tensorrt": info.tensorrt})
    engine = TensorRTEngine(folder / PLAN_FILE, device, constants, built_with=info.tensorrt,
                            built_for=gpu["compute_capability"], options=options)
    return engine(*inputs), reference


def _timing_cache_dir() -> Path:
    return sha256_cache_dir() / "timing"


def _profile_json(profile: Profile) -> dict[str, Any]:
    return {"name": profile.name, "source": str(profile.source), "preset": profile.preset,
            "precisions": list(profile.precisions), "backends": list(profile.backends),
            "shapes": [vars(s) for s in profile.shapes], "text_tokens": profile.text_tokens,
            "device": profile.device, "onnx_opset": profile.onnx_opset,
            "experts": {e.name: str(e.weights) for e in profile.experts}, "boundary": profile.boundary}
