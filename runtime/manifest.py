"""The engine folder's manifest: schema, engine identity, checksums, and the checks made at load.

    engines/<profile>/manifest.json
    engines/<profile>/<entry-id>/{model.onnx, model.onnx.data, engine.pt2, engine.plan, parity.json}

An entry is identified by a hash of exactly the fields that change the engine (backend, precision,
static shape, model structure, weights fingerprint, export opset, the tool versions that produced
it, backend options). Before an entry is used, the runtime checks its files' sha256, the versions
of the tools that must match, the device and the weights; any failure is a refusal with a reason.

sha256 of multi-GB files is cached per (path, size, mtime, inode), so loading is not a re-read of
every engine; `wan-build verify` re-hashes in full.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import WanBuildError
from .static import StaticShape

MANIFEST = "manifest.json"
# An entry folder's artifacts (the builder writes them, the backends read them).
ONNX_FILE, ONNX_DATA = "model.onnx", "model.onnx.data"
AOTI_FILE = "engine.pt2"
PLAN_FILE = "engine.plan"
FORMAT = 1
# The tools whose exact version an engine of each backend depends on at load time.
BACKEND_VERSION_KEYS = {"aoti": ("torch",), "onnxruntime": (), "tensorrt": ("tensorrt",)}


class EngineError(WanBuildError):
    """An engine folder or entry that cannot be used (with strict=True, or for the CLI)."""


# -- hashing --------------------------------------------------------------------------------------
def sha256_cache_dir() -> Path:
    """wan-build's cache folder: $WAN_BUILD_CACHE_DIR, else $XDG_CACHE_HOME/wan-build or ~/.cache/wan-build."""
    return Path(os.environ.get("WAN_BUILD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wan-build"))


def _cache_file() -> Path:
    return sha256_cache_dir() / "sha256-cache.json"


def _stat_key(path: Path) -> str:
    # Keyed by the file itself (device and inode), not its name: hard links share one entry.
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"


_memory: dict[Path, dict[str, str]] = {}  # the cache file, read once per process (per location)


def _read_cache(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _load_cache() -> dict[str, str]:
    path = _cache_file()
    if path not in _memory:
        _memory[path] = _read_cache(path)
    return _memory[path]


def _store_cache(key: str, digest: str) -> None:
    path = _cache_file()
    cache = _read_cache(path)  # merged with what other processes wrote since this one read it
    cache[key] = digest
    _memory[path] = cache
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation; an unwritable home must not break loading


def sha256_file(path: Path, use_cache: bool = True) -> str:
    path = Path(path)
    key = _stat_key(path)
    if use_cache:
        hit = _load_cache().get(key)
        if hit:
            return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _store_cache(key, digest)
    return digest


def weights_fingerprint(tensors: Mapping[str, torch.Tensor], files: Iterable[Path]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order.

    It depends on the values only, not on the file layout: the same weights in diffusers or
    original layout, one file or shards, have one fingerprint. Cached per set of files.
    """
    files = sorted(Path(f) for f in files)
    key = "fingerprint|" + "|".join(_stat_key(f) for f in files)
    hit = _load_cache().get(key) if files else None
    if hit:
        return hit
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{str(t.dtype)}|{list(t.shape)}|".encode())
        h.update(memoryview(t.cpu().view(torch.uint8).reshape(-1).numpy()))
    digest = h.hexdigest()
    if files:
        _store_cache(key, digest)
    return digest


def entry_id(identity: Mapping[str, Any]) -> str:
    """Stable id of an engine: a hash of exactly the fields that change it."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# -- versions and devices -------------------------------------------------------------------------
def tool_versions() -> dict[str, str | None]:
    """Versions of the tools engines depend on, read from package metadata (nothing is imported)."""
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    trt = next((v for v in (version(d) for d in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12")) if v), None)
    ort = next((v for v in (version(d) for d in ("onnxruntime", "onnxruntime-gpu")) if v), None)
    return {"torch": torch.__version__, "onnx": version("onnx"), "onnxruntime": ort, "tensorrt": trt,
            "modelopt": version("nvidia-modelopt"), "python": platform.python_version()}


def device_info(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {"type": "cuda", "name": props.name, "compute_capability": f"{props.major}.{props.minor}"}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "compute_capability": None}


# -- manifest -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One engine as the runtime sees it."""

    id: str
    backend: str
    precision: str
    expert: str
    shape: StaticShape
    files: dict[str, dict[str, Any]]
    versions: dict[str, Any]
    device: dict[str, Any]
    weights_fingerprint: str
    parity: dict[str, Any]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Entry":
        s = data["shape"]
        shape = StaticShape(s["batch"], s["latent_frames"], s["latent_height"], s["latent_width"],
                            s["text_tokens"], s["image_tokens"], s["per_token_timesteps"])
        return cls(data["id"], data["backend"], data["precision"], data["expert"], shape, dict(data["files"]),
                   dict(data["versions"]), dict(data["device"]), data["weights_fingerprint"], dict(data["parity"]),
                   dict(data))

    def describe(self) -> str:
        return f"{self.id} ({self.backend}, {self.precision}, {self.expert})"


def shape_json(shape: StaticShape, config, video: tuple[int, int, int] | None) -> dict[str, Any]:
    frames, height, width = video if video is not None else (None, None, None)
    return {"batch": shape.batch, "video_frames": frames, "height": height, "width": width,
            "latent_frames": shape.latent_frames, "latent_height": shape.latent_height,
            "latent_width": shape.latent_width, "tokens": shape.tokens(config), "text_tokens": shape.text_tokens,
            "image_tokens": shape.image_tokens, "per_token_timesteps": shape.per_token_timesteps}


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EngineError(f"{folder}: no {MANIFEST}; build it with `wan-build build PROFILE --out {folder}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"{path}: unreadable ({e}); rebuild with `wan-build build`") from None
    if data.get("format") != FORMAT:
        raise EngineError(f"{path}: manifest format {data.get('format')!r}, this runtime reads {FORMAT}; "
                          "rebuild the engines with this version of wan-build")
    return data


def check_files(entry: Entry, folder: Path, full: bool = False) -> str | None:
    """The first problem with an entry's files (missing, size, sha256), or None."""
    for name, info in entry.files.items():
        path = Path(folder) / entry.id / name
        if not path.is_file():
            return f"file {path} is missing"
        size = path.stat().st_size
        if size != info["bytes"]:
            return f"file {path} has {size} bytes, the manifest says {info['bytes']}"
        if sha256_file(path, use_cache=not full) != info["sha256"]:
            return f"file {path} fails its sha256 check (changed since it was built)"
    return None


def compatibility_problem(built_with: str | None, built_for: str | None, portable: bool, trt_version: str,
                          device: torch.device, capability: tuple[int, int] | None) -> str | None:
    """Why this TensorRT and GPU cannot run a plan built with TensorRT `built_with` for compute
    capability `built_for` (checked before deserializing), or None."""
    if built_with != trt_version:
        return f"built with TensorRT {built_with}, this machine has {trt_version} (plans need the exact version)"
    if device.type != "cuda" or capability is None:
        return f"TensorRT plans run on CUDA devices, the model is on {device.type}"
    here = f"{capability[0]}.{capability[1]}"
    if built_for != here and not portable:
        return f"built for compute capability {built_for}, this GPU is {here}"
    return None


def check_entry(entry: Entry, folder: Path, *, fingerprint: str, device: torch.device,
                versions: Mapping[str, Any] | None = None, full: bool = False) -> str | None:
    """Why this machine and these weights cannot use `entry`, or None when it can."""
    versions = versions or tool_versions()
    if entry.weights_fingerprint != fingerprint:
        return (f"built from other weights (fingerprint {entry.weights_fingerprint[:12]}, "
                f"these weights {fingerprint[:12]})")
    for tool in BACKEND_VERSION_KEYS.get(entry.backend, ()):
        if entry.versions.get(tool) != versions.get(tool):
            return f"built with {tool} {entry.versions.get(tool)}, this machine has {versions.get(tool) or 'none'}"
    if entry.backend == "aoti" and entry.device.get("type") != torch.device(device).type:
        return f"compiled for {entry.device.get('type')}, the model runs on {torch.device(device).type}"
    if entry.backend == "tensorrt":
        device = torch.device(device)
        here = device_info(device)["compute_capability"]
        portable = entry.raw.get("tensorrt_options", {}).get("hardware_compatibility", "none") != "none"
        problem = compatibility_problem(entry.versions.get("tensorrt"), entry.device.get("compute_capability"),
                                        portable, versions.get("tensorrt"), device,
                                        tuple(int(x) for x in here.split(".")) if here else None)
        if problem:
            return problem
    return check_files(entry, folder, full=full)
