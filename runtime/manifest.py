"""The engine folder's manifest: a typed record per engine, validated on read, confined to the folder.

    engines/<profile>/manifest.json
    engines/<profile>/<entry-id>/{entry.json, parity.json, model.onnx, model.onnx.data, engine.pt2, ...}

An entry is identified by a hash of exactly the fields that change the engine (`entry_id`). Reading
is strict and local: a malformed entry is refused alone, with its reason, and the others stay
usable; a manifest that cannot be read at all (not JSON, another format) is an error naming the
file. Every path an entry names stays inside the folder: entry ids are 16 hex digits, file names
are plain names (no separators, no leading dot), and symbolic links are refused.

Each entry folder also holds `entry.json`, the entry's own record, so a manifest lost or damaged
can be rebuilt from the folders (`wan-build build --rebuild-manifest`).

The manifest's digest (`Manifest.digest`, sha256 of its bytes) pins a folder: the manifest records
the sha256 of every file, and every file is hashed before it is loaded, so a deployment that passes
`trusted="sha256:..."` runs nothing the pinned manifest does not describe.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import WanBuildError
from .integrity import sha256_file
from .precision import PRECISIONS
from .stages import STAGES
from .static import StaticShape

MANIFEST = "manifest.json"
FORMAT = 2
# An entry folder's files (the builder writes them, the backends read them).
ONNX_FILE, ONNX_DATA = "model.onnx", "model.onnx.data"
FP4_DATA = "model.nvfp4.data"
INT8_DATA = "model.int8.data"  # SmoothQuant int8 entries: the smoothed weights, quantized
# A weight's ONNX initializer name (and so its TensorRT weight name): this + its parameter name.
WEIGHT_PREFIX = "model."
AOTI_FILE = "engine.pt2"
INDUCTOR_FILE = "block.compiled"
COMPILE_CACHE_FILE = "compile-cache.zip"  # inductor and aoti entries: what a fresh process compiled at load (runtime.compile_cache)
PLAN_FILE = "engine.plan"
PARITY_FILE = "parity.json"
ENTRY_FILE = "entry.json"  # the entry's own record, for rebuilding a lost manifest; not in `files`

ENTRY_ID = re.compile(r"^[0-9a-f]{16}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class EngineError(WanBuildError):
    """An engine folder or entry that cannot be used (with strict=True, or for the CLI)."""


class ManifestError(EngineError):
    """A manifest, or one entry of it, that does not follow the format."""


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

    from .backends.tensorrt import trt_version  # the module's own version where it imports

    trt = trt_version()
    ort = next((v for v in (version(d) for d in ("onnxruntime", "onnxruntime-gpu")) if v), None)
    triton = next((v for v in (version(d) for d in ("triton", "pytorch-triton")) if v), None)
    return {"torch": torch.__version__, "onnx": version("onnx"), "onnxruntime": ort, "tensorrt": trt,
            "modelopt": version("nvidia-modelopt"), "triton": triton, "python": platform.python_version()}


def device_info(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {"type": "cuda", "name": props.name, "compute_capability": f"{props.major}.{props.minor}"}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "compute_capability": None,
            "cpu_isa": cpu_isa()}


def cpu_isa() -> str:
    """The vector instruction sets of this CPU that compiled CPU code uses: ATen's capability
    (avx2, avx512, sve256, default) and the extensions Inductor's kernels pick up (amx, vnni,
    avx512_bf16). Code compiled on one such CPU is refused on another (it could fault or differ)."""
    isa = torch.backends.cpu.get_cpu_capability().lower()
    extensions = [name for name, probe in (("amx", "_is_amx_tile_supported"), ("vnni", "_is_vnni_supported"),
                                           ("avx512_bf16", "_is_avx512_bf16_supported"))
                  if getattr(torch.cpu, probe, lambda: False)()]
    return "+".join([isa, *extensions])


def capability_of(device: torch.device | str) -> tuple[int, int] | None:
    """The compute capability of a CUDA device, None for other devices (or without CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


# -- reading JSON with errors that name the field ---------------------------------------------------
class _Fields:
    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ManifestError(f"{where} must be a JSON object, not {type(data).__name__}")
        self.data, self.where = data, where

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False, default: Any = None) -> Any:
        if key not in self.data or (optional and self.data[key] is None):
            if optional:
                return default
            raise ManifestError(f"{self.where} lacks {key!r}")
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int):
            ok, value = True, float(value)
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = "/".join(k.__name__ for k in kinds)
            raise ManifestError(f"{self.where}.{key} must be {names}, not {type(value).__name__}")
        return value

    def int(self, key: str, minimum: int = 0) -> int:
        value = self.get(key, int)
        if value < minimum:
            raise ManifestError(f"{self.where}.{key} must be >= {minimum}, not {value}")
        return value


# -- the typed entry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch."

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "TensorInfo":
        f = _Fields(data, where)
        shape = f.get("shape", list)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ManifestError(f"{where}.shape must be a list of sizes")
        dtype = f.get("dtype", str)
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ManifestError(f"{where}.dtype {dtype!r} is not a torch dtype")
        return cls(f.get("name", str), tuple(shape), dtype)

    @classmethod
    def of(cls, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> "TensorInfo":
        return cls(name, tuple(int(s) for s in shape), str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class FileInfo:
    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class ParityInfo:
    """An engine's error against the eager model on fixed-seed inputs, and the gate it passed or not."""

    max_abs: float
    relative: float
    cosine: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.relative) and self.relative <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "relative": self.relative, "cosine": self.cosine,
                "tolerance": self.tolerance, "passed": self.passed}

    def describe(self) -> str:
        return f"rel {self.relative:.2e} (max abs {self.max_abs:.2e}, cos {self.cosine:.6f}, tol {self.tolerance:g})"


@dataclass(frozen=True)
class Entry:
    """One engine: every field the builder records and the runtime checks."""

    id: str
    backend: str
    precision: str
    expert: str
    shape: StaticShape
    video: tuple[int, int, int] | None  # video frames, height, width (None when built from latents)
    tokens: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    files: Mapping[str, FileInfo]
    versions: Mapping[str, str | None]
    device: Mapping[str, Any]  # type, name, compute_capability
    weights_fingerprint: str
    parity: ParityInfo
    allow_mismatch: bool = False  # built with --allow-mismatch: the parity gate did not pass
    onnx_opset: int | None = None
    quantization_error: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # backend options the runtime obeys
    build: Mapping[str, Any] = field(default_factory=dict)  # the backend's build record
    built_at: str = ""
    build_seconds: float = 0.0
    stage: str | None = None  # one stage of the model (`runtime.stages`), None for the whole forward

    def describe(self) -> str:
        stage = f", {self.stage} stage" if self.stage else ""
        return f"{self.id} ({self.backend}, {self.precision}, {self.expert}{stage})"

    @property
    def front_weights(self) -> bool:
        """Whether the engine runs on the weights the runtime hands it (any weights of the recorded
        layout: a fine-tune, merged LoRAs) rather than weights baked in at build."""
        return self.options.get("weights") == "front" and isinstance(self.options.get("weights_layout"), str)

    @property
    def device_type(self) -> str:
        return str(self.device.get("type") or "cpu")

    def to_json(self) -> dict[str, Any]:
        s = self.shape
        frames, height, width = self.video if self.video is not None else (None, None, None)
        return {
            "id": self.id, "backend": self.backend, "precision": self.precision, "expert": self.expert,
            "shape": {"batch": s.batch, "video_frames": frames, "height": height, "width": width,
                      "latent_frames": s.latent_frames, "latent_height": s.latent_height,
                      "latent_width": s.latent_width, "tokens": self.tokens, "text_tokens": s.text_tokens,
                      "image_tokens": s.image_tokens, "per_token_timesteps": s.per_token_timesteps},
            "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
            "files": {n: f.to_json() for n, f in sorted(self.files.items())}, "versions": dict(self.versions),
            "device": dict(self.device), "weights_fingerprint": self.weights_fingerprint,
            "parity": self.parity.to_json(), "allow_mismatch": self.allow_mismatch, "onnx_opset": self.onnx_opset,
            "quantization_error": None if self.quantization_error is None else dict(self.quantization_error),
            "options": dict(self.options), "build": dict(self.build), "built_at": self.built_at,
            "build_seconds": self.build_seconds, "stage": self.stage,
        }

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Entry":
        """An entry's own record (`entry.json`)."""
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ManifestError(f"{where}: not valid JSON ({str(e)[:120]})") from None
        try:
            return cls.from_json(raw, where)
        except RecursionError:
            raise ManifestError(f"{where}: nested too deeply") from None

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: Any, where: str = "entry") -> "Entry":
        """Validate and type one entry; a ManifestError names the first field that is wrong."""
        from .backends import BACKENDS  # the registry imports this module

        f = _Fields(data, where)
        eid = f.get("id", str)
        if not ENTRY_ID.match(eid):
            raise ManifestError(f"{where}.id {eid[:40]!r} is not an entry id (16 hex digits)")
        backend = f.get("backend", str)
        if backend not in BACKENDS:
            raise ManifestError(f"{where}.backend {backend[:40]!r} is not one of {', '.join(BACKENDS)}")
        precision = f.get("precision", str)
        if precision not in PRECISIONS:
            raise ManifestError(f"{where}.precision {precision[:40]!r} is not one of {', '.join(PRECISIONS)}")
        s = _Fields(f.get("shape", dict), f"{where}.shape")
        shape = StaticShape(s.int("batch", 1), s.int("latent_frames", 1), s.int("latent_height", 1),
                            s.int("latent_width", 1), s.int("text_tokens", 1), s.int("image_tokens", 0),
                            s.get("per_token_timesteps", bool))
        video = None
        if s.data.get("video_frames") is not None:
            video = (s.int("video_frames", 1), s.int("height", 1), s.int("width", 1))
        files = {}
        for name, info in f.get("files", dict).items():
            if not FILE_NAME.match(name) or name == ENTRY_FILE:
                raise ManifestError(f"{where}.files: {name[:60]!r} is not a plain file name inside the entry folder")
            fi = _Fields(info, f"{where}.files[{name}]")
            digest = fi.get("sha256", str)
            if not SHA256.match(digest):
                raise ManifestError(f"{where}.files[{name}].sha256 is not a sha256 digest")
            files[name] = FileInfo(digest, fi.int("bytes"))
        p = _Fields(f.get("parity", dict), f"{where}.parity")
        parity = ParityInfo(p.get("max_abs", float), p.get("relative", float), p.get("cosine", float),
                            p.get("tolerance", float))
        versions = f.get("versions", dict)
        if not all(isinstance(v, (str, type(None))) for v in versions.values()):
            raise ManifestError(f"{where}.versions must map tool names to version strings")
        device = f.get("device", dict)
        opset = f.get("onnx_opset", int, optional=True)
        qerr = f.get("quantization_error", dict, optional=True)
        stage = f.get("stage", str, optional=True)
        if stage is not None and stage not in STAGES:
            raise ManifestError(f"{where}.stage {stage[:40]!r} is not one of {', '.join(STAGES)}")
        return cls(
            eid, backend, precision, f.get("expert", str), shape, video, s.int("tokens", 1),
            tuple(TensorInfo.from_json(t, f"{where}.inputs[{i}]") for i, t in enumerate(f.get("inputs", list))),
            tuple(TensorInfo.from_json(t, f"{where}.outputs[{i}]") for i, t in enumerate(f.get("outputs", list))),
            files, dict(versions), dict(device), f.get("weights_fingerprint", str), parity,
            f.get("allow_mismatch", bool, optional=True, default=False), opset, qerr,
            dict(f.get("options", dict, optional=True, default={})), dict(f.get("build", dict, optional=True, default={})),
            f.get("built_at", str, optional=True, default=""),
            f.get("build_seconds", float, optional=True, default=0.0), stage)


# -- the manifest -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertRecord:
    weights: str  # where the build read them (absolute)
    fingerprint: str
    layout: str
    config: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"weights": self.weights, "fingerprint": self.fingerprint, "layout": self.layout,
                "config": dict(self.config)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "ExpertRecord":
        f = _Fields(data, where)
        return cls(f.get("weights", str), f.get("fingerprint", str), f.get("layout", str, optional=True, default=""),
                   dict(f.get("config", dict, optional=True, default={})))


@dataclass
class Manifest:
    name: str
    experts: dict[str, ExpertRecord] = field(default_factory=dict)
    entries: dict[str, Entry] = field(default_factory=dict)
    boundary: float | None = None
    profile: dict[str, Any] = field(default_factory=dict)
    # Entries that failed validation: reason, and their JSON kept verbatim so a build writes them back.
    bad_entries: dict[str, str] = field(default_factory=dict)
    raw_bad_entries: dict[str, Any] = field(default_factory=dict)
    digest: str = ""  # "sha256:<hex>" of the bytes this was read from ("" for a new one)

    def to_json(self) -> dict[str, Any]:
        entries = {**self.raw_bad_entries, **{k: e.to_json() for k, e in self.entries.items()}}
        return {"format": FORMAT, "name": self.name, "profile": self.profile, "boundary": self.boundary,
                "experts": {n: e.to_json() for n, e in self.experts.items()},
                "entries": dict(sorted(entries.items()))}

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> "Manifest":
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ManifestError(f"{path}: not valid JSON ({str(e)[:120]})") from None
        if not isinstance(raw, dict):
            raise ManifestError(f"{path}: not a manifest (a JSON object with format, experts, entries)")
        version = raw.get("format")
        if version != FORMAT:
            if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT:
                raise ManifestError(f"{path}: written by a newer wan-build (manifest format {version}; this one "
                                    f"reads {FORMAT}); use that version, or rebuild into another folder")
            raise ManifestError(f"{path}: manifest format {version!r}, this wan-build reads {FORMAT}; rebuild "
                                "the engines (wan-build build PROFILE --rebuild-manifest keeps entries it can check)")
        try:
            f = _Fields(raw, str(path))
            experts = {n: ExpertRecord.from_json(e, f"{path}: experts.{n}") for n, e in f.get("experts", dict).items()}
            boundary = f.get("boundary", float, optional=True)
            name = f.get("name", str, optional=True, default="")
            profile = f.get("profile", dict, optional=True, default={})
        except RecursionError:
            raise ManifestError(f"{path}: nested too deeply to be a manifest") from None
        manifest = cls(name, experts, {}, boundary, profile, digest=digest)
        entries = raw.get("entries", {})
        if not isinstance(entries, dict):
            manifest.bad_entries["entries"] = f"entries must be a JSON object keyed by entry id, not {type(entries).__name__}"
            return manifest
        for key, value in entries.items():
            try:
                entry = Entry.from_json(value, f"entries.{key[:40]}")
                if entry.id != key:
                    raise ManifestError(f"entries.{key[:40]} holds entry {entry.id}; the key must be its id")
            except (ManifestError, RecursionError) as e:
                reason = str(e) if isinstance(e, ManifestError) else "nested too deeply"
                manifest.bad_entries[key] = reason
                manifest.raw_bad_entries[key] = value
                continue
            manifest.entries[key] = entry
        return manifest


def check_pin(trusted: str | None, digest: str, path: Path) -> None:
    """Raise unless `trusted` (a "sha256:<hex>" from `wan-build verify --print-digest`) is None or
    the digest of the manifest as read."""
    if trusted is None:
        return
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", str(trusted)):
        raise ManifestError(f"trusted={trusted!r} is not a manifest digest; pass the 'sha256:<64 hex digits>' "
                            "that `wan-build verify FOLDER --print-digest` prints")
    if digest != trusted:
        raise ManifestError(f"{path}: manifest digest {digest} is not the trusted {trusted}; the folder "
                            "changed since it was pinned: verify it again (wan-build verify --print-digest)")


def read_manifest(folder: Path, trusted: str | None = None) -> Manifest:
    """The folder's manifest, validated; with `trusted`, only if its digest is that one."""
    folder = Path(folder)
    path = folder / MANIFEST
    if path.is_symlink():
        raise ManifestError(f"{path} is a symbolic link; an engine folder's manifest must be a file of its own")
    if not path.is_file():
        raise EngineError(f"{folder}: no {MANIFEST}; build it with `wan-build build PROFILE --out {folder}`")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: unreadable ({e.strerror or e})") from None
    check_pin(trusted, "sha256:" + hashlib.sha256(data).hexdigest(), path)
    return Manifest.from_bytes(data, path)


# -- paths inside the folder, and file checks --------------------------------------------------------
def entry_dir(folder: Path, entry_or_id: Entry | str) -> Path:
    """`folder/<id>`, refused (ManifestError) unless it is a real folder directly inside `folder`."""
    eid = entry_or_id.id if isinstance(entry_or_id, Entry) else entry_or_id
    if not ENTRY_ID.match(eid):
        raise ManifestError(f"{eid[:40]!r} is not an entry id")
    path = Path(folder) / eid
    if path.is_symlink():
        raise ManifestError(f"{path} is a symbolic link; entry folders must lie inside the engine folder")
    if path.exists() and path.resolve().parent != Path(folder).resolve():
        raise ManifestError(f"{path} resolves outside the engine folder")
    return path


def entry_file(folder: Path, entry: Entry, name: str) -> Path:
    if not FILE_NAME.match(name):
        raise ManifestError(f"{name[:60]!r} is not a plain file name")
    path = entry_dir(folder, entry) / name
    if path.is_symlink():
        raise ManifestError(f"file {path} is a symbolic link; engine files must be files of their own")
    return path


def check_files(entry: Entry, folder: Path, required: tuple[str, ...] = (), fresh: bool = False) -> str | None:
    """The first problem with an entry's files (unlisted, missing, outside the folder, size, sha256), or None.
    Every listed file is hashed in full (once per process; every time with `fresh`)."""
    unlisted = [n for n in required if n not in entry.files]
    if unlisted:
        return f"the manifest lists no {', '.join(unlisted)} for this {entry.backend} entry (incomplete record)"
    for name, info in entry.files.items():
        try:
            path = entry_file(folder, entry, name)
        except ManifestError as e:
            return str(e)
        if not path.is_file():
            return f"file {path} is missing"
        size = path.stat().st_size
        if size != info.bytes:
            return f"file {path} has {size} bytes, the manifest says {info.bytes}"
        try:
            digest = sha256_file(path, fresh=fresh)
        except OSError as e:
            return f"file {path} cannot be read ({e.strerror or e})"
        if digest != info.sha256:
            return f"file {path} fails its sha256 check (changed since it was built)"
    return None
