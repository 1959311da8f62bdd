"""The compile cache a compiled entry carries, so a fresh machine or container starts it warm.

Loading torch's compiled code in a process whose Inductor cache is empty compiles again what the
code is built from: on the CPU, Inductor first probes which vector instruction sets the compiler
can build (a test program per set, about 17 s), and an `inductor` artifact's C++ kernels are kept as
source and compiled at load; on a GPU, Triton kernels the artifact does not bundle. At build time a
fresh process loads the entry with an empty cache, and what it wrote there (shared libraries,
their sources, Triton's kernels) is stored in the entry as `compile-cache.zip`. Before the entry
loads, those files are put into this process's cache where it lacks them.

Torch finds them by its own keys (hashes of the source, the compiler's command line and version,
the instruction set, torch's version), so a file made by another compiler, instruction set or
install path is never used: torch compiles as it would have. Files already in the cache are kept.
The bundle is code, like the entry it belongs to: it is opened only from bytes whose sha256 was
just checked, its names are checked (relative, plain segments, nothing outside the cache), and
each file is written to a temp name and renamed, so a concurrent process never reads half a file.
"""

from __future__ import annotations

import io
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch

log = logging.getLogger("wan_build.runtime")

SEGMENT = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,159}$")
MAX_DEPTH = 8
MAX_FILES = 20_000
MAX_BYTES = 1 << 30  # uncompressed; a bundle is a few MB on the CPU


class BundleError(ValueError):
    """A compile-cache bundle that is not one this runtime writes (names, size)."""


def check_name(name: str) -> tuple[str, ...]:
    """The path segments of a bundle member, or BundleError: relative, at most MAX_DEPTH plain
    segments (no `.`, `..`, empty or hidden ones), so it cannot leave the cache folder."""
    parts = tuple(name.split("/"))
    if not 1 <= len(parts) <= MAX_DEPTH or not all(SEGMENT.match(p) and p not in (".", "..") for p in parts):
        raise BundleError(f"compile cache member {name!r} is not a plain relative path")
    return parts


def files_under(root: Path) -> dict[str, bytes]:
    """Relative name -> bytes of every regular file under `root`, but locks and temp files (no links)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not path.is_file() or rel.split("/")[0] == "locks" or path.suffix in (".lock", ".tmp"):
            continue
        check_name(rel)
        out[rel] = path.read_bytes()
    return out


def pack(files: Mapping[str, bytes]) -> bytes:
    """`files` (relative name -> bytes) as a zip, names checked."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, content in files.items():
            check_name(name)
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content)
    return buffer.getvalue()


def unpack(data: bytes) -> dict[str, bytes]:
    """Name -> bytes of a bundle, every name checked; BundleError if one is not plain or it is too big."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            if len(infos) > MAX_FILES or sum(i.file_size for i in infos) > MAX_BYTES:
                raise BundleError(f"compile cache holds {len(infos)} files of {sum(i.file_size for i in infos)} "
                                  f"bytes; at most {MAX_FILES} and {MAX_BYTES} are read")
            out: dict[str, bytes] = {}
            for info in infos:
                if info.is_dir():
                    continue
                check_name(info.filename)
                if info.filename in out:
                    raise BundleError(f"compile cache lists {info.filename!r} twice")
                out[info.filename] = z.read(info)
            return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise BundleError(f"compile cache is not a readable zip ({e})") from None


def cache_folders(device_index: int) -> tuple[Path, Path]:
    """This process's Inductor cache folder and its Triton cache folder for that GPU (torch's rules,
    TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR included)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    return Path(cache_dir()), Path(triton_cache_dir(device_index))


def target(name: str, inductor: Path, triton: Path) -> Path:
    """Where a member goes: `triton/<gpu>/...` into this GPU's Triton cache, the rest under Inductor's."""
    parts = check_name(name)
    if parts[0] == "triton" and len(parts) > 2:
        return triton.joinpath(*parts[2:])
    return inductor.joinpath(*parts)


def seed(data: bytes, device_index: int = 0) -> int:
    """Put the bundle's files into this process's compile caches where they are missing; returns how
    many were written. Raises BundleError for a bundle with a bad name (before writing anything);
    a file that cannot be written is skipped with a warning (torch then compiles it)."""
    files = unpack(data)
    inductor, triton = cache_folders(device_index)
    targets = {name: target(name, inductor, triton) for name in files}
    if any(path.is_relative_to(triton) for path in targets.values()):
        try:
            triton.mkdir(parents=True, exist_ok=True)  # torch makes Inductor's; Triton's may not exist yet
        except OSError:
            pass  # each file below then says why it was not written
    written = 0
    for name, content in files.items():
        path = targets[name]
        if path.exists() or path.is_symlink():
            continue
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        existing = path.parent
        while not existing.exists():
            existing = existing.parent
        if not _inside(existing, inductor, triton):
            log.warning("compile cache: %s leads out of the cache folder (a link); not written", existing)
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                f.write(content)
            os.chmod(tmp, 0o755 if path.suffix == ".so" else 0o644)
            os.replace(tmp, path)
            written += 1
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning("compile cache: %s not written (%s); torch compiles it instead", path, e.strerror or e)
    return written


def _inside(folder: Path, *roots: Path) -> bool:
    """Whether `folder` lies in one of `roots`, links resolved on both sides: a link planted in the
    cache cannot send a write elsewhere."""
    real = folder.resolve()
    return any(real == r.resolve() or r.resolve() in real.parents for r in roots)


def seed_entry(entry, folder: Path, device: torch.device) -> int:
    """Seed this process's caches with `entry`'s compile cache, if it has one (bytes checked first)."""
    from .integrity import read_verified
    from .manifest import COMPILE_CACHE_FILE, entry_file

    info = entry.files.get(COMPILE_CACHE_FILE)
    if info is None:
        return 0
    data = read_verified(entry_file(folder, entry, COMPILE_CACHE_FILE), info.sha256, info.bytes)
    return seed(data, (device.index or 0) if device.type == "cuda" else 0)
