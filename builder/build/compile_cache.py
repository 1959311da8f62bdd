"""The compile cache of a compiled entry (`runtime.compile_cache`): what a fresh process writes into
an empty Inductor cache while it loads the entry, captured at build time.

A child process (this interpreter, an empty TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR unset so
Triton's files land inside it) probes the CPU's instruction sets on the CPU and loads the entry's
artifact; every file it leaves is packed. That child is also the check that the artifact loads in a
process other than the one that compiled it: if it dies or fails, the entry fails with its reason.
The instruction-set probe is the same for every entry of a build, so it runs once per process.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import runtime
from runtime.compile_cache import files_under, pack

ROOT = Path(runtime.__file__).resolve().parents[1]
TIMEOUT_S = 1800.0

CHILD = """
import json, sys
spec = json.loads(sys.argv[1])
import torch
if spec["device"].startswith("cuda"):
    torch.cuda.set_device(torch.device(spec["device"]))
if spec["probe_cpu"]:
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    print("cpu vector isa:", pick_vec_isa(), flush=True)
if spec["artifact"]:
    from runtime.backends.inductor import load_block
    with open(spec["artifact"], "rb") as f:
        load_block(spec["form"], f.read())
print("loaded", flush=True)
"""


class LoadFailed(RuntimeError):
    """The fresh process could not load what was built (the message says how it ended)."""


def _run_child(cache: Path, device: str, probe_cpu: bool, artifact: Path | None, form: str | None) -> None:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("TRITON_CACHE_DIR", None)
    spec = {"device": device, "probe_cpu": probe_cpu, "artifact": str(artifact) if artifact else None, "form": form}
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"a fresh process took over {TIMEOUT_S:.0f} s to load the artifact") from None
    if proc.returncode != 0:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        last = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        raise LoadFailed(f"a fresh process could not load it ({how}){': ' + last if last else ''}")


@functools.cache
def cpu_probe_files() -> dict[str, bytes]:
    """The files of Inductor's instruction-set probe on this machine (once per process)."""
    with tempfile.TemporaryDirectory(prefix="wan-build-isa-") as tmp:
        _run_child(Path(tmp), "cpu", True, None, None)
        return files_under(Path(tmp))


def capture(device: str, artifact: Path, form: str) -> tuple[bytes, dict]:
    """(bundle bytes, a record for the entry): what a fresh process compiles while loading `artifact`
    (an `inductor` entry's), with, on the CPU, the instruction-set probe it runs first. Raises
    LoadFailed when the fresh process fails to load it."""
    start = time.perf_counter()
    cpu = not device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="wan-build-cache-") as tmp:
        cache = Path(tmp)
        for name, content in (cpu_probe_files() if cpu else {}).items():
            (cache / name).parent.mkdir(parents=True, exist_ok=True)
            (cache / name).write_bytes(content)
        _run_child(cache, device, cpu, artifact, form)
        files = files_under(cache)
    return pack(files), {"files": len(files), "bytes": sum(len(v) for v in files.values()),
                         "seconds": round(time.perf_counter() - start, 1)}
