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

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from runtime.backends.tensorrt import make_logger
from runtime.errors import WanBuildError

from .profiles import TensorRTOptions

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
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_cache(path: Path) -> bytes:
    with locked(path):
        return path.read_bytes() if path.is_file() else b""


def merge_cache(path: Path, ours: bytes, combine: Callable[[bytes, bytes], bytes]) -> None:
    """Write `combine(on_disk, ours)` atomically while holding the lock: entries another build added
    since we read the file are kept."""
    with locked(path):
        on_disk = path.read_bytes() if path.is_file() else b""
        merged = combine(on_disk, ours) if on_disk else ours
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(merged)
        os.replace(tmp, path)


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


def build_plan(onnx_path: Path, plan_path: Path, options: TensorRTOptions, cache_dir: Path, gpu_name: str,
               compute_capability: str) -> BuildInfo:
    """Parse `onnx_path` and write a serialized plan to `plan_path` (atomically) and its build log."""
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
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"node {e.node_name() or '?'} ({e.node_operator() or '?'}): {e.desc()}")
        raise TensorRTBuildError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors or logger.errors()))

    config = builder.create_builder_config()
    workspace = int(options.workspace_gb * 2**30) if options.workspace_gb else None
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.builder_optimization_level = options.optimization_level
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                  HARDWARE_LEVELS[options.hardware_compatibility])
    if options.strip_weights:
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)

    cache_file = options.timing_cache or timing_cache_path(cache_dir, gpu_name, compute_capability, trt.__version__)
    before = read_cache(cache_file)
    cache = config.create_timing_cache(before)
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError(f"TensorRT could not build {onnx_path}: " + "; ".join(logger.errors()[-5:]))

    def combine(on_disk: bytes, ours: bytes) -> bytes:
        merged = config.create_timing_cache(on_disk)
        merged.combine(config.create_timing_cache(ours), ignore_mismatch=True)
        return bytes(merged.serialize())

    after = bytes(config.get_timing_cache().serialize())
    merge_cache(cache_file, after, combine)
    tmp = plan_path.with_name(f".{plan_path.name}.tmp")
    tmp.write_bytes(bytes(plan))
    os.replace(tmp, plan_path)

    info = BuildInfo(trt.__version__, typed, options.optimization_level, workspace, options.hardware_compatibility,
                     options.strip_weights, options.weight_streaming, str(cache_file), len(before), len(after),
                     round(time.perf_counter() - start, 2), plan_path.stat().st_size, logger.warnings()[-20:])
    (plan_path.parent / BUILD_LOG).write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info
