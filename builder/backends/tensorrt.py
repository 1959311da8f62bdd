"""ONNX -> TensorRT plan, through TensorRT's Python API (10.x and 11.x). The only module that imports
`tensorrt` for building, and only inside `build_plan`.

- Strongly typed networks only: precision comes from the ONNX (bf16/fp16 exported in that dtype,
  FP8/NVFP4 as Q/DQ nodes). 10.x gets the STRONGLY_TYPED flag; 11.x is always strongly typed and
  takes `create_network(0)`. No precision builder flags are ever set (removed in 11.x).
- `parse_from_file`, so external weight data resolves next to the model; every parser error is
  reported with its node and operator.
- Workspace limit and optimisation level from the profile's `tensorrt:` section; optional hardware
  compatibility level; weight-stripped plans (STRIP_PLAN + REFIT_IDENTICAL) so per-shape plans hold
  kernels only and are refitted from the shared weights at load; optional weight streaming.
- A timing cache per GPU model and TensorRT version, read before the build and merged back after it
  under a file lock, so parallel builds share what each measured.
- A build log beside the plan: configuration, time, timing-cache use, the logger's warnings.

Written from NVIDIA's documented API (see the README's TensorRT section for what ran where); the
parts that need no TensorRT (cache locking and merging, option mapping) are tested here.
"""

from __future__ import annotations

import gc
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from runtime.backends.tensorrt import TensorRTEngine, make_logger, parser_errors, trt_version
from runtime.errors import WanBuildError
from runtime.manifest import FP4_DATA, INT8_DATA, ONNX_DATA, PLAN_FILE, WEIGHT_PREFIX, device_info
from runtime.precision import Precision

from ..build.export import export_onnx, table_names
from ..build.folder import locked_file, share_weights, write_atomic
from ..build.onnx_check import check_for_tensorrt
from ..build.parity import PARITY_SEED
from ..profiles import TensorRTOptions
from ..quantize.fp8 import calibrate_fp8, insert_fp8_qdq
from ..quantize.int8 import calibrate_int8, insert_int8_qdq
from ..quantize.nvfp4 import calibrate_nvfp4, insert_nvfp4_qdq
from . import BuilderBackend, Job

BUILD_LOG = "build.log"
HARDWARE_LEVELS = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


class TensorRTBuildError(WanBuildError):
    """TensorRT could not parse or build; the message carries the parser's or logger's errors."""


# -- timing cache: one file per GPU model and TensorRT version, merged under a lock ----------------
def timing_cache_path(folder: Path, gpu_name: str, compute_capability: str, trt_version: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu_name}-sm{compute_capability}-trt{trt_version}").strip("-")
    return folder / f"timing-{slug}.cache"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock on `path` + '.lock' for the duration (other builds of any folder wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked_file(path.with_name(path.name + ".lock")):
        yield


def read_cache(path: Path) -> bytes:
    with locked(path):
        return path.read_bytes() if path.is_file() else b""


def merge_cache(path: Path, ours: bytes, combine: Callable[[bytes, bytes], bytes]) -> None:
    """Write `combine(on_disk, ours)` atomically while holding the lock: entries another build added
    since we read the file are kept."""
    with locked(path):
        on_disk = path.read_bytes() if path.is_file() else b""
        merged = combine(on_disk, ours) if on_disk else ours
        write_atomic(path, merged)


# -- building -------------------------------------------------------------------------------------
@dataclass
class BuildInfo:
    tensorrt: str
    strongly_typed: str
    optimization_level: int
    workspace_bytes: int | None
    hardware_compatibility: str
    strip_weights: bool
    weight_streaming: bool
    timing_cache: str
    timing_cache_bytes_before: int
    timing_cache_bytes_after: int
    seconds: float
    plan_bytes: int
    warnings: list[str]
    tf32: bool = True  # TensorRT's default; cleared for fp32 entries
    timing_cache_used: bool = True


def build_plan(onnx_path: Path, plan_path: Path, options: TensorRTOptions, cache_dir: Path, gpu_name: str,
               compute_capability: str, precision: str = "bf16", refit_weights: list[str] | None = None) -> BuildInfo:
    """Parse `onnx_path` and write a serialized plan to `plan_path` (atomically) and its build log.
    fp32 entries clear TF32 (on by default in TensorRT; TF32 GEMMs are 1e-4-1e-3 off, ten to a
    hundred times the fp32 parity tolerance). `refit_weights`: initializer names made refittable with
    any values (REFIT_INDIVIDUAL; with strip_weights, STRIP_PLAN leaves exactly those out), so the
    runtime refits them from the model's tensors; None: REFIT_IDENTICAL on every weight, refitted
    from the ONNX file."""
    import tensorrt as trt

    start = time.perf_counter()
    major = int(trt.__version__.split(".")[0])
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    if major >= 11:
        network = builder.create_network(0)  # always strongly typed; the flag is deprecated and ignored
        typed = "always (TensorRT 11)"
    else:
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        typed = "STRONGLY_TYPED flag"
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise TensorRTBuildError(f"TensorRT could not parse {onnx_path}: "
                                 + "; ".join(parser_errors(parser) or logger.errors()))

    config = builder.create_builder_config()
    workspace = int(options.workspace_gb * 2**30) if options.workspace_gb else None
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.builder_optimization_level = options.optimization_level
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                  HARDWARE_LEVELS[options.hardware_compatibility])
    if refit_weights is not None:
        # INetworkDefinition.mark_weights_refittable is in TensorRT 11.4's Python bindings; 10.16's do
        # not list it (its C++ API has markWeightsRefittable): asked for where it is absent, say so.
        mark = getattr(network, "mark_weights_refittable", None)
        if mark is None:
            raise TensorRTBuildError(f"tensorrt.refittable needs INetworkDefinition.mark_weights_refittable, which "
                                     f"TensorRT {trt.__version__}'s Python bindings lack; use TensorRT 11, or build "
                                     "without refittable: true")
        unmarked = [n for n in refit_weights if not mark(n)]
        if unmarked:
            raise TensorRTBuildError(f"TensorRT has no weights named {', '.join(unmarked[:4])} in {onnx_path} "
                                     f"({len(unmarked)} of {len(refit_weights)}); build without refittable: true")
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        if options.strip_weights:
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    elif options.strip_weights:
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    tf32 = precision != "fp32"
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)

    cache_file = options.timing_cache or timing_cache_path(cache_dir, gpu_name, compute_capability, trt.__version__)
    before = read_cache(cache_file)
    cache = config.create_timing_cache(before)
    cache_used = bool(config.set_timing_cache(cache, ignore_mismatch=False))
    if not cache_used:  # made by another GPU or TensorRT: build without it (and write a fresh one after)
        logger.log("Severity.WARNING", f"timing cache {cache_file} does not match this GPU and TensorRT; not used")
        before = b""
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError(f"TensorRT could not build {onnx_path}: " + "; ".join(logger.errors()[-5:]))

    def combine(on_disk: bytes, ours: bytes) -> bytes:
        merged = config.create_timing_cache(on_disk)
        merged.combine(config.create_timing_cache(ours), ignore_mismatch=True)
        return bytes(merged.serialize())

    after = bytes(config.get_timing_cache().serialize())
    merge_cache(cache_file, after, combine)
    # The parser owns the parsed weights (one host copy) until it goes; the plan is another. Drop the
    # parser and network first, and write the plan from TensorRT's buffer without copying it again.
    del parser, network
    gc.collect()
    write_atomic(plan_path, memoryview(plan))
    del plan

    info = BuildInfo(trt.__version__, typed, options.optimization_level, workspace, options.hardware_compatibility,
                     options.strip_weights, options.weight_streaming, str(cache_file), len(before), len(after),
                     round(time.perf_counter() - start, 2), plan_path.stat().st_size, logger.warnings()[-20:],
                     tf32, cache_used)
    (plan_path.parent / BUILD_LOG).write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info


# -- the entry ------------------------------------------------------------------------------------
FP8_CALIBRATION_BATCHES = 4  # fixed-seed calibration inputs at the entry's shape
# Options that change how a plan is loaded or built, not the plan: not part of an entry's identity.
RUNTIME_ONLY = ("timing_cache", "cuda_graphs", "weight_streaming_budget_gb")
PRECISION_ONLY = {"smoothquant": Precision.INT8}  # options that make a difference to entries of one precision


def prepare_tensorrt_onnx(job: Job) -> tuple[Path, torch.Tensor]:
    """Everything before TensorRT (runs without it): export in the entry's dtype; for fp8, int8 and nvfp4,
    calibration with Model Optimizer (on the entry's recorded calls, or fixed-seed inputs) and Q/DQ
    insertion; weights shared; the graph checked. Returns the ONNX and the eager reference of
    exactly what the engine computes (fake-quantized for FP8, emulated for NVFP4)."""
    entry, model, inputs, folder, record = job.entry, job.model, job.inputs, job.folder, job.record
    config = job.profile.config
    constants = getattr(model, "whole", model).constants()  # a stage's graph reads the whole model's weights file
    job.echo("eager reference")
    # FP8/NVFP4: the Q/DQ writers rewrite the folded form (weights stored [in, out]); those plans hold
    # their weights anyway. Others keep every weight named, for refittable plans.
    path = export_onnx(config, entry.shape, constants, model.dtype, folder, job.profile.onnx_opset, job.echo,
                       named_weights=not Precision(entry.precision).quantized, model_stage=entry.stage,
                       inputs_like=inputs if entry.stage else None)
    seeds = range(PARITY_SEED + 1, PARITY_SEED + 1 + FP8_CALIBRATION_BATCHES)
    calibration_inputs = (model.example_inputs(seed=s, dtype=model.dtype) for s in seeds)
    build = record.setdefault("build", {})
    if entry.calibration:  # the user's recorded calls instead
        device = model.rope_cos.device
        calibration_inputs = (tuple(t.to(device=device, dtype=model.dtype if t.is_floating_point() and i != 1
                                         else t.dtype) for i, t in enumerate(call.inputs))
                              for call in entry.calibration)
        build["calibration_calls"] = [call.file.name for call in entry.calibration]
    if entry.precision == Precision.FP8.value:
        calibration = calibrate_fp8(model, calibration_inputs, inputs)
        insert_fp8_qdq(path, calibration, model.dtype)
        reference = calibration.output  # Model Optimizer's fake quantization: what the engine computes
        record["quantization_error"] = {**calibration.to_json(), "relative": calibration.relative_error}
    elif entry.precision == Precision.INT8.value:
        calibration = calibrate_int8(model, calibration_inputs, inputs, job.profile.tensorrt.smoothquant)
        insert_int8_qdq(path, calibration, model.dtype)
        reference = calibration.output  # Model Optimizer's fake quantization: what the engine computes
        record["quantization_error"] = {**calibration.to_json(), "relative": calibration.relative_error}
        if calibration.smoothquant:
            share_weights(folder, job.store, INT8_DATA, job.echo)
    elif entry.precision == Precision.NVFP4.value:
        calibration = calibrate_nvfp4(model, calibration_inputs, inputs)
        insert_nvfp4_qdq(path, calibration.input_amax, {n: model.get_submodule(n).weight
                                                         for n in calibration.input_amax}, model.dtype)
        reference = calibration.output  # the engine's arithmetic, emulated
        record["quantization_error"] = {**calibration.to_json(), "relative": calibration.relative_error}
        share_weights(folder, job.store, FP4_DATA, job.echo)
    else:
        with torch.no_grad():
            reference = model(*inputs)
    share_weights(folder, job.store, ONNX_DATA, job.echo)
    build["onnx_check"] = check_for_tensorrt(path, config, len(getattr(model, "blocks", ())) if entry.stage else None)
    return path, reference


# ONNX operators TensorRT's parser takes from which release (onnx-tensorrt release notes): opset 23's
# Attention from 10.14, RMSNormalization from 10.15. onnx_opset: 20 decomposes both for older releases.
OPSET_MINIMUM_TENSORRT = {23: (10, 15)}


def opset_problem(opset: int, version: str | None) -> str | None:
    need = OPSET_MINIMUM_TENSORRT.get(opset)
    if need is None or version is None:
        return None
    have = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if have < need:
        return (f"onnx_opset {opset} needs TensorRT {need[0]}.{need[1]} or newer (its parser reads Attention from 10.14 "
                f"and RMSNormalization from 10.15); this machine has {version}: use onnx_opset: 20 in the profile")
    return None


def timing_cache_dir() -> Path:
    """$WAN_BUILD_CACHE_DIR/timing, else $XDG_CACHE_HOME/wan-build/timing or ~/.cache/wan-build/timing."""
    root = os.environ.get("WAN_BUILD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wan-build")
    return Path(root) / "timing"


class TensorRTBuilder(BuilderBackend):
    name = "tensorrt"

    def unavailable(self, precision: Precision, device: torch.device) -> str | None:
        missing = self.runtime.missing_library()
        if missing:
            return missing
        if torch.device(device).type != "cuda":
            return "TensorRT builds need an NVIDIA GPU (torch sees none here)"
        return super().unavailable(precision, device)

    def identity(self, profile, device, versions) -> dict[str, Any]:
        return {"onnx_opset": profile.onnx_opset, "tensorrt": versions["tensorrt"], "gpu": device["compute_capability"],
                "options": {k: str(v) for k, v in vars(profile.tensorrt).items()
                            if k not in RUNTIME_ONLY and k not in PRECISION_ONLY}}

    def precision_identity(self, profile, precision: Precision) -> dict[str, Any]:
        return {k: str(getattr(profile.tensorrt, k)) for k, p in PRECISION_ONLY.items() if p == precision}

    def options(self, profile) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(profile.tensorrt).items()}

    def calibrates(self, precision: Precision) -> bool:
        return precision.quantized

    def front_weights(self, precision: Precision, profile) -> bool:
        # calibrated FP8/NVFP4 plans hold weights quantized at build: they stay tied to those
        return profile.tensorrt.refittable and not precision.quantized

    def build(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        problem = opset_problem(job.profile.onnx_opset, trt_version())
        if problem:
            raise TensorRTBuildError(problem)
        constants = job.model.constants()
        refit = ([WEIGHT_PREFIX + n for n in job.model.weights()]
                 if self.front_weights(Precision(job.entry.precision), job.profile) else None)
        path, reference = prepare_tensorrt_onnx(job)
        # TensorRT builds from the ONNX file: the torch copy of the weights (host and GPU) and the
        # checkpoint's mapping go first; the parity run needs the shape tables only (a refittable
        # plan is refitted from the ONNX file there, as its weights were written from these tensors).
        constants = {n: constants[n] for n in table_names(job.model)}
        job.release_weights()
        gpu = device_info(job.device)
        job.echo("building the TensorRT plan (minutes to tens of minutes for a 14B model; TensorRT's progress "
                 "goes to build.log)")
        info = build_plan(path, job.folder / PLAN_FILE, job.profile.tensorrt, timing_cache_dir(), gpu["name"],
                          gpu["compute_capability"], job.entry.precision, refit)
        job.record["build"]["tensorrt"] = asdict(info)
        job.record["versions"] = {"tensorrt": info.tensorrt}
        plan = (job.folder / PLAN_FILE).read_bytes()
        job.echo("parity (loading the plan)")
        engine = TensorRTEngine(job.draft, job.folder / PLAN_FILE, plan, job.device, constants,
                                built_with=info.tensorrt, built_for=gpu["compute_capability"],
                                options=self.options(job.profile), refit_from="file")
        return engine(*job.inputs), reference


    def verify_reference(self, entry, model) -> float:
        tolerance = super().verify_reference(entry, model)
        if not Precision(entry.precision).quantized:
            return tolerance
        # The build compared the engine with its calibrated fake quantization; verify compares it with
        # the unquantized model, so the bound adds the recorded quantization error
        # (||e - u|| <= ||e - q|| + ||q - u||, all on the same fixed-seed inputs).
        q = (entry.quantization_error or {}).get("relative")
        if not isinstance(q, (int, float)) or isinstance(q, bool):
            raise TensorRTBuildError(f"entry {entry.id} is {entry.precision} but records no quantization error")
        return tolerance * (1 + q) + q
