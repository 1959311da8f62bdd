"""Fleet builds: every entry of a profile as a Ray task on a worker of a Ray cluster.

    wan-build build PROFILE --ray local      # a Ray cluster started here, one task per core
    wan-build build PROFILE --ray auto       # the cluster this machine belongs to (`ray start`)
    wan-build build PROFILE --ray HOST:6379  # another cluster's head

Ray does the scheduling; this module only says what each entry needs and commits what comes back.

1. The driver takes the folder lock, reads the manifest and fingerprints the weights (`begin`), as a
   serial build does. Entries whose files still pass their checks are kept without a task.
2. Machines: one per profile `targets:` GPU model (a probe task asks a node of that model, through
   Ray's `accelerator_type`, for its device and tool versions), or, without targets, a GPU node when
   the profile's device is cuda (or auto and the cluster has GPUs), else any CPU. Entry ids are those
   of the machine they are built on, so they equal a serial build's there. A target no node of the
   cluster has is reported skipped, with the cluster's GPU resources; no task waits forever for it.
3. Each entry is a task asking for one GPU of its model (or `cpus_per_entry` CPUs) and the host
   memory the planner says its build needs. The worker checks that its weights are the driver's
   (fingerprint) and that its torch / TensorRT / GPU give the planned id, builds the entry in a
   folder of its own with the parity gate (`build_files`), and streams its progress and its files
   back (a weights file the engine folder already stores is not sent again).
4. The driver writes the files into `.partial-<id>-<pid>/`, hashes each against the record, stores
   weights files once (`share_weights`), records which machine built the entry (`build.machine`),
   renames the folder into place and rewrites the manifest atomically, one entry at a time.
5. A worker that dies (killed, its node lost) fails its entry alone: its partial folder is removed,
   and the entry is submitted again up to `retries` times, then reported failed. The folder never
   holds a half entry; a rerun builds only what is missing.

Weights paths (and calibration calls) must be readable at the same path on every worker (shared
storage), and wan-build must be installed there; the engine folder is only written by the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from runtime.errors import WanBuildError
from runtime.manifest import ENTRY_FILE, Entry, device_info, tool_versions
from runtime.precision import Precision

from .build import BuildFailed, BuildReport, EntryResult, begin, build_files, one_line, plan_entries, skip_reason
from .build.entries import PlannedEntry, machine_identity
from .build.folder import (WEIGHTS_STORE, FolderError, check_kept, folder_lock, install, remove, share_weights,
                           write_atomic, write_manifest)
from .profiles import Profile

Echo = Callable[[str], None]
RAY_HINT = "pip install 'wan-build[ray]'"
CHUNK = 32 << 20  # bytes per streamed piece of a file
# Ray errors that mean the worker or its node went away (the entry may succeed elsewhere)
LOST = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError", "ActorDiedError",
        "LocalRayletDiedError", "RaySystemError", "ObjectReconstructionFailedError", "OutOfMemoryError")


class FleetError(WanBuildError):
    """A fleet build cannot start (no Ray, no cluster at that address); the message says what to do."""


class _SendAgain(BuildFailed):
    """The attempt cannot be committed, but another one can (its files must be sent in full)."""


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise FleetError(f"--ray needs Ray on this machine and the workers: {RAY_HINT} ({e})") from None
    return ray


def connect(ray, address: str, echo: Echo) -> bool:
    """Join (or, for "local", start) the cluster; True when this call started the connection."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
    try:
        if address == "local":
            echo(f"starting a local Ray cluster ({os.cpu_count()} CPUs)")
            ray.init(**kwargs)
        else:
            if address != "auto":
                _reachable(address)
            echo(f"joining the Ray cluster at {address}")
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise FleetError(f"--ray {address}: cannot join a Ray cluster there ({one_line(e)}); start one with "
                         "`ray start --head` on the head node, or use --ray local for a cluster on this machine") from None
    return True


def _reachable(address: str, seconds: float = 10.0) -> None:
    """A FleetError unless something listens at HOST:PORT (Ray itself retries a dead address for minutes)."""
    where = address.split("://", 1)[-1]
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise FleetError(f"--ray {address}: give 'local', 'auto' or the head node's HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as e:
        raise FleetError(f"--ray {address}: cannot join a Ray cluster there ({e.strerror or e}); start one with "
                         "`ray start --head` on the head node, or use --ray local for a cluster on this machine") from None


# -- machines: where entries are built ---------------------------------------------------------------
@dataclasses.dataclass
class Machine:
    """One kind of worker entries are built on, and what it reported of itself."""
    label: str  # "cpu", "gpu", or the target GPU model
    options: dict[str, Any]  # Ray task options that place a task there
    device: str  # the torch device a task uses there
    report: dict[str, Any] | None = None  # {"device", "versions", "host"} from the probe; None: not reached
    problem: str | None = None


def _probe(device: str) -> dict[str, Any]:
    import ray

    return {"device": device_info(torch.device(device)), "versions": tool_versions(), "host": socket.gethostname(),
            "node": ray.get_runtime_context().get_node_id()}


def machines(ray, profile: Profile, cpus_per_entry: int, echo: Echo) -> list[Machine]:
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    models = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    out: list[Machine] = []
    if profile.targets:
        for target in profile.targets:
            m = Machine(target, {"num_gpus": 1, "num_cpus": 1, "accelerator_type": target}, "cuda")
            if f"accelerator_type:{target}" not in resources:
                m.problem = (f"no node of the Ray cluster has a {target} GPU (its GPUs: "
                             f"{', '.join(models) or 'none'}); add such a node or drop {target} from targets")
            out.append(m)
    elif profile.device == "cuda" or (profile.device == "auto" and gpus > 0):
        m = Machine("gpu", {"num_gpus": 1, "num_cpus": 1}, "cuda")
        if gpus == 0:
            m.problem = "the profile asks for device: cuda and no node of the Ray cluster has a GPU"
        out.append(m)
    else:
        out.append(Machine("cpu", {"num_cpus": cpus_per_entry}, "cpu"))
    remote = ray.remote(_probe)
    for m in out:
        if m.problem is None:
            try:
                m.report = ray.get(remote.options(**m.options, max_retries=2).remote(m.device))
            except Exception as e:  # a worker without wan-build, a node lost: say so, in one line
                raise FleetError(f"the probe of the {m.label} machines failed ({one_line(e)}); every node needs "
                                 f"wan-build installed ({RAY_HINT})") from None
            echo(f"machine {m.label}: {m.report['device']['name']} on {m.report['host']} "
                 f"(torch {m.report['versions'].get('torch')})")
    return out


# -- the worker -----------------------------------------------------------------------------------------
WORK_ROOT = "wan-build-fleet"  # under the system temp folder: one folder per entry build, named by the pid


def _work_folder(entry: PlannedEntry) -> Path:
    """A fresh folder for one build on this worker; folders of builds whose process is gone (a worker
    killed mid-build) are removed first."""
    root = Path(tempfile.gettempdir()) / WORK_ROOT
    root.mkdir(exist_ok=True)
    for old in root.iterdir():
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{entry.id}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

def build_task(profile: Profile, entry: PlannedEntry, device: str, fingerprints: dict[str, str], stored: set[str],
               allow_mismatch: bool) -> Iterator[tuple]:
    """Runs on a Ray worker (a streaming generator): builds `entry` and yields what happened, then its
    record and its files. Events: ("started", host, pid, node), ("log", text), ("skipped", reason),
    ("failed", reason), ("record", bytes), ("file", name), ("chunk", bytes), ("stored", name), ("done",)."""
    import ray

    from runtime.static import parameter_shapes
    from runtime.weights import load_checkpoint, materialize
    from runtime.integrity import weights_fingerprint

    host = socket.gethostname()
    yield ("started", host, os.getpid(), ray.get_runtime_context().get_node_id())
    dev = torch.device(device)
    reason = skip_reason(entry, dev)
    if reason:
        yield ("skipped", f"{reason} (on {host})")
        return
    here = machine_identity(profile, entry.backend, entry.precision, device_info(dev), tool_versions())
    differs = [k for k, v in here.items() if entry.identity.get(k) != v]
    if differs:
        yield ("failed", f"{entry.label()}: {host} would build another entry than planned: its "
                         + ", ".join(f"{k} {here[k]!r} (planned {entry.identity.get(k)!r})" for k in differs)
                         + "; give the cluster's nodes of one kind the same libraries")
        return
    work = _work_folder(entry)
    events: queue.Queue = queue.Queue()
    done = object()

    def run() -> None:
        try:
            ckpt = load_checkpoint(entry.expert.weights, preset=profile.config)
            mine = weights_fingerprint(ckpt.tensors, ckpt.files)
            if mine != fingerprints[entry.expert.name]:
                raise BuildFailed(f"{entry.label()}: the {entry.expert.name} weights at {entry.expert.weights} on "
                                  f"{host} are not the driver's (fingerprint {mine[:12]}, the driver's "
                                  f"{fingerprints[entry.expert.name][:12]}); give every node the same files")
            tensors = materialize(ckpt.tensors, parameter_shapes(profile.config), Precision(entry.precision).dtype, dev)
            del ckpt
            record = build_files(entry, tensors, profile, work / entry.id, work / WEIGHTS_STORE, dev, allow_mismatch,
                                 lambda text: events.put(("log", text)))
            events.put(("record", record))
        except BuildFailed as e:
            events.put(("failed", one_line(e)))
        except Exception as e:  # every way an entry fails: one line, as in a serial build
            events.put(("failed", f"{entry.label()}: {one_line(e)}"))
        finally:
            events.put(done)

    thread = threading.Thread(target=run, name=f"build-{entry.id}", daemon=True)
    thread.start()
    try:
        record = None
        while (event := events.get()) is not done:
            if event[0] == "record":
                record = event[1]
            else:
                yield event
        thread.join()
        if record is None:
            return
        yield ("record", record.to_bytes())
        for name, info in sorted(record.files.items()):
            if name.endswith(".data") and info.sha256 in stored:
                yield ("stored", name)
                continue
            yield ("file", name)
            with open(work / entry.id / name, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield ("chunk", chunk)
        yield ("done",)
    finally:
        thread.join()
        shutil.rmtree(work, ignore_errors=True)


# -- the driver -----------------------------------------------------------------------------------------
class _Receiver:
    """The files of one entry, written into its partial folder and checked against its record."""

    def __init__(self, out: Path, entry: PlannedEntry):
        self.out, self.entry = out, entry
        self.tmp = out / f".partial-{entry.id}-{os.getpid()}-{threading.get_ident()}"
        remove(self.tmp)
        self.tmp.mkdir(parents=True)
        self.record: Entry | None = None
        self._file = None
        self._name: str | None = None
        self._hash = None
        self.received: set[str] = set()

    def take_record(self, data: bytes) -> None:
        self.record = Entry.from_bytes(data, f"the record {self.entry.label()} came back with")
        if self.record.id != self.entry.id:
            raise BuildFailed(f"{self.entry.label()}: the worker returned the record of entry {self.record.id}")

    def begin_file(self, name: str) -> None:
        self.end_file()
        if self.record is None or name not in self.record.files:
            raise BuildFailed(f"{self.entry.label()}: the worker sent {name!r}, which its record does not list")
        self._name, self._hash = name, hashlib.sha256()
        self._file = open(self.tmp / name, "wb")

    def chunk(self, data: bytes) -> None:
        if self._file is None:
            raise BuildFailed(f"{self.entry.label()}: the worker sent data outside a file")
        self._file.write(data)
        self._hash.update(data)

    def end_file(self) -> None:
        if self._file is None:
            return
        self._file.close()
        name, digest = self._name, self._hash.hexdigest()
        self._file = None
        want = self.record.files[name]
        size = (self.tmp / name).stat().st_size
        if digest != want.sha256 or size != want.bytes:
            raise BuildFailed(f"{self.entry.label()}: {name} arrived with sha256 {digest[:12]} and {size} bytes, its "
                              f"record says {want.sha256[:12]} and {want.bytes}; it was damaged on the way")
        if name.endswith(".data"):
            share_weights(self.tmp, self.out / WEIGHTS_STORE, name)
        self.received.add(name)

    def link_stored(self, name: str) -> None:
        """A weights file the engine folder already stores: linked from there, after hashing it."""
        self.end_file()
        want = self.record.files.get(name) if self.record is not None else None
        if want is None:
            raise BuildFailed(f"{self.entry.label()}: the worker named {name!r}, which its record does not list")
        stored = self.out / WEIGHTS_STORE / f"{want.sha256}{''.join(Path(name).suffixes[-2:])}"
        digest = _fresh_sha256(stored) if stored.is_file() and not stored.is_symlink() else None
        if digest != want.sha256:
            remove(stored)  # damaged or gone: the next attempt (or run) sends the file itself
            raise _SendAgain(f"{self.entry.label()}: the stored weights {stored.name} were damaged; removed, "
                             "and the entry is sent again with its weights")
        try:
            os.link(stored, self.tmp / name)
        except OSError:
            shutil.copyfile(stored, self.tmp / name)
        self.received.add(name)

    def finish(self, machine: dict[str, Any]) -> Entry:
        self.end_file()
        missing = sorted(set(self.record.files) - self.received)
        if missing:
            raise BuildFailed(f"{self.entry.label()}: the worker's files stopped before {', '.join(missing[:3])}")
        record = dataclasses.replace(self.record, build={**self.record.build, "machine": machine})
        write_atomic(self.tmp / ENTRY_FILE, record.to_bytes())
        return record

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        remove(self.tmp)


def _fresh_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _lost(e: BaseException) -> bool:
    return type(e).__name__ in LOST or any(type(c).__name__ in LOST for c in type(e).__mro__)


def _fits(node: dict, options: dict[str, Any]) -> bool:
    """Whether a node has the resources of `options` (GPUs, CPUs, the accelerator type) at all."""
    have = node.get("Resources", {})
    want = {"GPU": options.get("num_gpus", 0), "CPU": options.get("num_cpus", 0)}
    if options.get("accelerator_type"):
        want[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    return bool(node.get("Alive")) and all(have.get(k, 0) >= v for k, v in want.items() if v)


def _memory_request(ray, entry: PlannedEntry, profile: Profile, machine: "Machine") -> dict[str, Any]:
    """The host memory the planner says the entry's build needs, as a Ray resource, when a node that
    can take the task has that much (left out otherwise: the task runs where it fits best and may run
    short). FleetError when no node can take the task at all (it would wait forever)."""
    from .planning.costs import build_memory

    nodes = [n for n in ray.nodes() if _fits(n, machine.options)]
    if not nodes:
        raise FleetError(f"no node of the Ray cluster has {', '.join(f'{k}={v}' for k, v in machine.options.items())} "
                         "for one task; lower --cpus-per-entry or add such a node")
    need = build_memory(profile.config, entry.shape, entry.precision, entry.backend, machine.device,
                        strip_weights=profile.tensorrt.strip_weights)["host"].total
    largest = max(n.get("Resources", {}).get("memory", 0) for n in nodes)
    return {"memory": int(need)} if 0 < need <= largest else {}


def build_on_ray(profile: Profile, out: Path, address: str, *, allow_mismatch: bool = False,
                 rebuild_manifest: bool = False, echo: Echo = print, retries: int = 1,
                 cpus_per_entry: int = 1) -> BuildReport:
    if retries < 0 or cpus_per_entry < 1:
        raise FleetError(f"--retries must be >= 0 (got {retries}) and --cpus-per-entry >= 1 (got {cpus_per_entry})")
    ray = import_ray()
    out = Path(out)
    report = BuildReport(out)
    started = connect(ray, address, echo)
    try:
        with folder_lock(out, echo):
            start = begin(profile, out, rebuild_manifest, echo)
            manifest = start.manifest
            start.checkpoints.clear()  # the workers read the weights; the driver needs only the fingerprints
            kinds = machines(ray, profile, cpus_per_entry, echo)
            work: list[tuple[PlannedEntry, Machine]] = []
            results: dict[str, EntryResult] = {}
            order: list[str] = []
            planned_ids: set[str] = set()
            for m in kinds:
                # a machine not reached: its ids are unknown; these name the entries in the report only
                stand_in = {"device": {"type": "cuda", "name": m.label, "compute_capability": f"unknown {m.label}"},
                            "versions": tool_versions()}
                planned = plan_entries(profile, start.fingerprints, None, start.calls,
                                       machine=m.report if m.report is not None else stand_in)
                for entry in planned:
                    if entry.id in results or entry.id in planned_ids:
                        continue  # the same entry for two targets (its backend does not depend on the GPU): once
                    planned_ids.add(entry.id)
                    order.append(entry.id)
                    if m.problem is not None:
                        results[entry.id] = EntryResult(entry, "skipped", 0.0, None, m.problem)
                        continue
                    existing = manifest.entries.get(entry.id)
                    if existing is not None and check_kept(existing, out) is None:
                        results[entry.id] = EntryResult(entry, "kept", 0.0, existing.parity.relative)
                        continue
                    work.append((entry, m))
            lock = threading.Lock()
            stopping = threading.Event()
            running: set = set()  # the streams in flight, to cancel on an interrupt
            progress = _FleetProgress(len(work), echo)
            task = ray.remote(build_task)

            def run(entry: PlannedEntry, machine: Machine) -> EntryResult:
                try:
                    result = attempts(entry, machine)
                except Exception as e:  # this entry's failure alone (a full disk here, a Ray error)
                    result = EntryResult(entry, "failed", 0.0, None, f"{entry.label()}: {one_line(e)}")
                if result.status not in ("built", "rebuilt"):  # those were counted as they were committed
                    progress.finished(0.0)
                    progress.echo(f"{entry.label()} [{machine.label}]: {result.status} ({result.message})")
                return result

            def attempts(entry: PlannedEntry, machine: Machine) -> EntryResult:
                status = "rebuilt" if entry.id in manifest.entries or entry.id in manifest.raw_bad_entries else "built"
                label = f"{entry.label()} [{machine.label}]"
                for attempt in range(retries + 1):
                    if stopping.is_set():
                        return EntryResult(entry, "failed", 0.0, None, f"{entry.label()}: the build was interrupted")
                    stored = {p.name.split(".", 1)[0] for p in (out / WEIGHTS_STORE).glob("*.data")} \
                        if (out / WEIGHTS_STORE).is_dir() else set()
                    options = {**machine.options, **_memory_request(ray, entry, profile, machine),
                               "num_returns": "streaming", "max_retries": 0,
                               "_generator_backpressure_num_objects": 8}  # at most 8 chunks ahead of the driver
                    result = _run_one(ray, task, options, profile, entry, machine, start.fingerprints, stored,
                                      allow_mismatch, out, manifest, lock, label, progress, status, running)
                    if result is not None:
                        return result
                    if attempt < retries:
                        echo(f"{label}: the worker was lost; submitting it again ({attempt + 1} of {retries})")
                return EntryResult(entry, "failed", 0.0, None,
                                   f"{entry.label()}: the Ray worker building it died{' every time' if retries else ''} "
                                   f"({retries + 1} attempt{'s' if retries else ''}); a rerun builds it")

            if work:
                echo(f"building {len(work)} entries on the Ray cluster ({len(order) - len(work)} kept or skipped)")
            pool = ThreadPoolExecutor(max_workers=max(1, min(len(work), 64)))
            try:
                futures = {entry.id: pool.submit(run, entry, m) for entry, m in work}
                for entry_id, future in futures.items():
                    results[entry_id] = future.result()
            except BaseException:  # Ctrl-C: no new task starts, running ones are cancelled, partials removed
                stopping.set()
                for gen in list(running):
                    try:
                        ray.cancel(gen, force=True)
                    except Exception:  # already finished
                        pass
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
            report.results = [results[i] for i in order]
    finally:
        if started:
            ray.shutdown()
    return report


def _run_one(ray, task, options, profile, entry, machine, fingerprints, stored, allow_mismatch, out, manifest, lock,
             label, progress, status, running: set) -> EntryResult | None:
    """One attempt; None when the worker was lost or the files must be sent again (the caller may
    submit it again)."""
    t0 = time.perf_counter()
    receiver = _Receiver(out, entry)
    where: dict[str, Any] = {}
    gen = task.options(**options).remote(profile, entry, machine.device, fingerprints, stored, allow_mismatch)
    running.add(gen)
    finished = False
    try:
        for ref in gen:
            event = ray.get(ref)
            kind = event[0]
            if kind == "started":
                where = {"host": event[1], "pid": event[2], "ray_node": event[3], "machine": machine.label}
                progress.echo(f"{label}: started on {event[1]} (pid {event[2]})")
            elif kind == "log":
                progress.echo(f"{label} @{where.get('host')}: {event[1]}")
            elif kind == "skipped":
                finished = True
                receiver.discard()
                return EntryResult(entry, "skipped", 0.0, None, event[1])
            elif kind == "failed":
                finished = True
                receiver.discard()
                return EntryResult(entry, "failed", time.perf_counter() - t0, None, event[1], host=where.get("host"))
            elif kind == "record":
                receiver.take_record(event[1])
            elif kind == "file":
                receiver.begin_file(event[1])
            elif kind == "chunk":
                receiver.chunk(event[1])
            elif kind == "stored":
                receiver.link_stored(event[1])
            elif kind == "done":
                finished = True
                record = receiver.finish(where)
                with lock:
                    install(receiver.tmp, out / entry.id)
                    manifest.entries[entry.id] = record
                    manifest.raw_bad_entries.pop(entry.id, None)
                    manifest.bad_entries.pop(entry.id, None)
                    try:
                        write_manifest(out, manifest)
                    except FolderError as e:  # in place but unrecorded: take it out again
                        manifest.entries.pop(entry.id, None)
                        remove(out / entry.id)
                        return EntryResult(entry, "failed", record.build_seconds, None, str(e))
                seconds = time.perf_counter() - t0
                progress.finished(seconds)
                progress.echo(f"{label}: {status} on {where.get('host')} in {seconds:.1f}s, parity rel "
                              f"{record.parity.relative:.1e}{progress.eta()}")
                return EntryResult(entry, status, seconds, record.parity.relative,
                                   "PARITY FAILED, kept by --allow-mismatch" if record.allow_mismatch else "",
                                   host=where.get("host"))
        receiver.discard()
        return None  # the stream ended without an outcome: the worker went away
    except _SendAgain as e:
        receiver.discard()
        progress.echo(str(e))
        return None
    except BuildFailed as e:
        receiver.discard()
        return EntryResult(entry, "failed", time.perf_counter() - t0, None, one_line(e))
    except Exception as e:
        receiver.discard()
        if _lost(e) or _lost(getattr(e, "cause", None) or e):
            return None
        return EntryResult(entry, "failed", time.perf_counter() - t0, None, f"{entry.label()}: {one_line(e)}")
    except BaseException:
        receiver.discard()
        raise
    finally:
        running.discard(gen)
        if not finished:
            try:
                ray.cancel(gen)  # a stream given up early must not keep its worker busy
            except Exception:  # already finished
                pass


class _FleetProgress:
    """Entries done, and how long is left at the rate the cluster finishes them."""

    def __init__(self, total: int, echo: Echo):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self._echo, self._lock = echo, threading.Lock()

    def echo(self, text: str) -> None:
        with self._lock:
            self._echo(text)

    def finished(self, seconds: float) -> None:
        with self._lock:
            self.done += 1

    def eta(self) -> str:
        with self._lock:
            if not self.done or self.done >= self.total:
                return f" ({self.done}/{self.total} done)"
            left = (time.perf_counter() - self.t0) / self.done * (self.total - self.done)
        return f" ({self.done}/{self.total} done, about {left / 60:.0f} min left)" if left >= 90 else \
            f" ({self.done}/{self.total} done, about {left:.0f} s left)"
