"""File hashes and the weights fingerprint, computed so that they are evidence.

What a check costs, and what it proves:

- Every file is read and hashed in full the first time this process uses it. A check is then
  evidence about the bytes on disk, including a byte flipped with the file's time put back, or a
  file copied over another with `cp -a`.
- Within one process a file is not re-read while its identity is unchanged: the memo is keyed by
  (device, inode, size, mtime, ctime). ctime cannot be set from user space: any write, rename over
  the file, `touch` or `cp -a` onto it changes it.
- Nothing is cached across processes. A hash cache keyed on file times is a speed-up for files one
  wrote, not evidence about files one reads (bit rot changes no time stamp).
- `fresh=True` re-reads even a file this process has already hashed (`full_check`, `wan-build
  verify`).

Code that is about to run (an AOTInductor package, a TensorRT plan) is hashed from the very bytes
that are loaded (`read_verified`), so a file swapped between the check and the load is caught too.

`HASHED` counts what this process hashed (files, bytes, seconds), so callers can report what their
checks cost.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .errors import WanBuildError

CHUNK = 1 << 24


class IntegrityError(WanBuildError):
    """A file whose bytes are not the ones recorded for it."""


@dataclass
class HashStats:
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def snapshot(self) -> "HashStats":
        return HashStats(self.files, self.bytes, self.seconds)

    def since(self, before: "HashStats") -> "HashStats":
        return HashStats(self.files - before.files, self.bytes - before.bytes, self.seconds - before.seconds)

    def describe(self) -> str:
        return f"{self.files} files, {self.bytes / 1e9:.2f} GB hashed in {self.seconds:.1f} s"


HASHED = HashStats()
_memo: dict[tuple, str] = {}


def file_key(path: Path) -> tuple:
    """What identifies a file's current content without reading it (for the in-process memo only)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_stream(f) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def sha256_file(path: Path, *, fresh: bool = False) -> str:
    """sha256 of `path`'s bytes, read in full once per process (every time with `fresh`)."""
    path = Path(path)
    key = file_key(path)
    if not fresh and key in _memo:
        return _memo[key]
    start = time.perf_counter()
    with open(path, "rb") as f:
        digest, n = _hash_stream(f)
    HASHED.files += 1
    HASHED.bytes += n
    HASHED.seconds += time.perf_counter() - start
    if file_key(path) == key:  # unchanged while we read it: the digest describes this identity
        _memo[key] = digest
    return digest


def sha256_bytes(data: bytes | memoryview) -> str:
    start = time.perf_counter()
    digest = hashlib.sha256(data).hexdigest()
    HASHED.files += 1
    HASHED.bytes += len(data)
    HASHED.seconds += time.perf_counter() - start
    return digest


def read_verified(path: Path, sha256: str, size: int) -> bytes:
    """The bytes of `path`, checked against the recorded size and sha256 after reading them: the
    caller loads exactly what was checked."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IntegrityError(f"file {path} cannot be read ({e.strerror or e})") from None
    if len(data) != size:
        raise IntegrityError(f"file {path} has {len(data)} bytes, the manifest says {size}")
    if sha256_bytes(data) != sha256:
        raise IntegrityError(f"file {path} fails its sha256 check (changed since it was built)")
    return data


def weights_fingerprint(tensors: Mapping[str, torch.Tensor], files: Iterable[Path] = ()) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order.

    It depends on the values only, not on the file layout: the same weights in diffusers or
    original layout, one file or shards, have one fingerprint. Computed in full once per process
    for a set of unchanged files (keyed as `sha256_file`'s memo), never taken from a cache on disk.
    """
    files = sorted(Path(f) for f in files)
    key = ("fingerprint",) + tuple(file_key(f) for f in files) if files else None
    if key is not None and key in _memo:
        return _memo[key]
    start = time.perf_counter()
    h = hashlib.sha256()
    n = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{str(t.dtype)}|{list(t.shape)}|".encode())
        data = memoryview(t.cpu().reshape(-1).view(torch.uint8).numpy())
        h.update(data)
        n += len(data)
    digest = h.hexdigest()
    HASHED.files += len(files)
    HASHED.bytes += n
    HASHED.seconds += time.perf_counter() - start
    if key is not None and key == ("fingerprint",) + tuple(file_key(f) for f in files):
        _memo[key] = digest
    return digest


def forget() -> None:
    """Drop the in-process memo (tests; a long-running process that wants every check redone)."""
    _memo.clear()
