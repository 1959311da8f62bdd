"""The engine folder as the build writes it: lock, atomic files, the shared weights store, the manifest.

Guarantees, whatever happens mid-build (an error, kill -9, a full disk):
- one build at a time per folder (`.lock`, opened without following links, refused unless it is a
  regular file);
- files are written to a temp file next to their target and renamed over it; a write that fails
  removes its temp file and leaves the previous version as it was;
- the manifest is read strictly: an unreadable one, or one of another format, stops the build with
  the way out (`--rebuild-manifest`), never silently replaced; entries the build did not decide to
  drop are written back as they were, malformed ones included;
- a stored weights file is verified (sha256 against its name) before it is linked into an entry,
  and replaced by the fresh bytes when it fails.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from runtime.backends import backend
from runtime.integrity import sha256_file
from runtime.manifest import (ENTRY_FILE, ENTRY_ID, MANIFEST, Entry, EngineError, Manifest, ManifestError,
                              check_files, read_manifest)

log = logging.getLogger("wan_build.build")
Echo = Callable[[str], None]
WEIGHTS_STORE = ".weights"  # one copy of each ONNX weights file, hard-linked into the entries


class FolderError(EngineError):
    """The engine folder cannot be written as asked; the message names the path and the way out."""


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def prepare(folder: Path) -> Path:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"--out {folder} is a file, not a folder; give a folder for the engines")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FolderError(f"cannot create the engine folder {folder} ({_reason(e)})") from None
    return folder


# -- lock -----------------------------------------------------------------------------------------
@contextmanager
def locked_file(path: Path, waiting: Callable[[str], None] | None = None) -> Iterator[int]:
    """Exclusive flock on `path` for the duration. The lock file is opened without following a
    symbolic link and must be a regular file, so nobody can point it at a file of theirs."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        kind = "a symbolic link" if path.is_symlink() else _reason(e)
        raise FolderError(f"lock file {path} cannot be used ({kind}); remove it and run again") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FolderError(f"lock file {path} is not a regular file; remove it and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                waiting(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def folder_lock(folder: Path, echo: Echo) -> Iterator[None]:
    """Exclusive lock on `folder/.lock`; a second build waits for the first."""
    folder = prepare(folder)
    lock = folder / ".lock"
    with locked_file(lock, lambda holder: echo(f"waiting for the build that holds {lock} ({holder})")) as fd:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        except OSError:
            pass  # the holder's pid is a courtesy for the waiting build
        yield


# -- atomic writes ----------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """`path` gets exactly `data` (any buffer) or stays as it was; no temp file is left either way."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()  # our own leftover (same pid), or a planted link: never write through it
        fd = os.open(tmp, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise FolderError(f"could not write {path} ({_reason(e)}); nothing was replaced") from None


# -- the shared weights store -------------------------------------------------------------------------
def share_weights(folder: Path, store: Path, name: str, echo: Echo = log.warning) -> str:
    """Keep one copy of `folder/name` (an external-data file) per content in `store`, hard-linked
    into `folder`. A stored copy is hashed before it is linked; a damaged one is replaced by these
    bytes. Returns the sha256. Falls back to a private copy where hard links are impossible."""
    data = Path(folder) / name
    digest = sha256_file(data)
    if store.is_symlink():
        raise FolderError(f"{store} is a symbolic link; the weights store must be a folder inside the engine folder")
    store.mkdir(parents=True, exist_ok=True)
    shared = store / f"{digest}{''.join(Path(name).suffixes[-2:])}"
    if shared.is_symlink() or (shared.exists() and not shared.is_file()):
        echo(f"{shared} is not a regular file; replacing it")
        shared.unlink() if shared.is_symlink() or shared.is_file() else shutil.rmtree(shared)
    if shared.exists():
        stored = sha256_file(shared)
        if stored != digest:
            echo(f"stored weights {shared} are damaged (sha256 {stored[:12]}); replacing them with fresh ones")
            os.replace(data, shared)
        else:
            data.unlink()
    else:
        os.replace(data, shared)
    try:
        os.link(shared, data)
    except OSError:
        shutil.copyfile(shared, data)
    return digest


# -- entry folders --------------------------------------------------------------------------------------
def clear_stale(folder: Path) -> None:
    """Remove half-built entry folders (we hold the lock: nobody else is writing them)."""
    for stale in folder.glob(".partial-*"):
        if stale.is_symlink() or stale.is_file():
            stale.unlink()
        else:
            shutil.rmtree(stale, ignore_errors=True)
    for tmp in folder.glob(f".{MANIFEST}.*.tmp"):
        tmp.unlink(missing_ok=True)


def install(tmp: Path, final: Path) -> None:
    """Rename a finished entry folder into place, replacing whatever stood there."""
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


# -- the manifest, as a build reads and writes it ---------------------------------------------------
def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_atomic(Path(folder) / MANIFEST, manifest.to_bytes())


def open_manifest(folder: Path, name: str, rebuild: bool, echo: Echo) -> Manifest:
    """The folder's manifest for a build. Unreadable, another format or malformed as a whole: an error
    with the way out, or with `rebuild` the file moved aside and the entries recovered from their
    folders. With `rebuild`, entry folders the manifest does not list are recovered too."""
    path = Path(folder) / MANIFEST
    manifest: Manifest | None = None
    if path.exists() or path.is_symlink():
        try:
            manifest = read_manifest(folder)
            if "entries" in manifest.bad_entries:
                raise ManifestError(f"{path}: {manifest.bad_entries['entries']}")
        except ManifestError as e:
            if not rebuild:
                raise ManifestError(f"{e}. The build stops rather than replace it: move it away, or rebuild it from "
                                    "the entry folders with `wan-build build PROFILE --rebuild-manifest`") from None
            aside = path.with_name(f"{MANIFEST}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(path, aside)
            echo(f"{path}: {e}; moved it to {aside.name} and rebuilding it from the entry folders")
            manifest = None
    if manifest is None:
        manifest = Manifest(name)
    if rebuild:
        for entry, problem in recover_entries(folder, set(manifest.entries)):
            if problem:
                echo(f"entry folder {entry}: not recovered ({problem}); left as it is")
            else:
                manifest.entries[entry.id] = entry
                echo(f"recovered entry {entry.describe()} from its folder")
    for key, reason in manifest.bad_entries.items():
        echo(f"warning: manifest entry {key[:40]} is malformed ({reason}); kept as it is")
    return manifest


def recover_entries(folder: Path, known: set[str]) -> Iterator[tuple[Entry | str, str | None]]:
    """(entry, None) for each entry folder not in `known` whose `entry.json` and files check out,
    (folder name, reason) for the others."""
    for d in sorted(Path(folder).iterdir()):
        if not ENTRY_ID.match(d.name) or d.name in known:
            continue
        if d.is_symlink() or not d.is_dir():
            yield d.name, "not a folder of its own"
            continue
        record = d / ENTRY_FILE
        if record.is_symlink() or not record.is_file():
            yield d.name, f"no {ENTRY_FILE}"
            continue
        try:
            entry = Entry.from_bytes(record.read_bytes(), str(record))
        except (ManifestError, OSError) as e:
            yield d.name, str(e)
            continue
        if entry.id != d.name:
            yield d.name, f"{ENTRY_FILE} describes entry {entry.id}"
            continue
        problem = check_files(entry, folder, backend(entry.backend).required_files(entry), fresh=True)
        yield (entry, None) if problem is None else (d.name, problem)


def check_kept(entry: Entry, folder: Path) -> str | None:
    """Why a built entry must be rebuilt (files missing or changed), or None to keep it."""
    return check_files(entry, folder, backend(entry.backend).required_files(entry))

