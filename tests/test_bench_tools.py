"""The GPU diagnosis and the cold-start benchmark run end to end on the CPU at toy sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_aoti_probe_names_the_call_that_crashed():
    """A child that dies by a signal after a stage is reported with that stage and the signal."""
    sys.path.insert(0, str(ROOT / "bench"))
    import aoti_probe

    original = aoti_probe.CHILD
    try:
        aoti_probe.CHILD = "import os, signal\nprint('compiled', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)\n"
        result = aoti_probe.probe({"name": "x"}, timeout=60)
    finally:
        aoti_probe.CHILD = original
    assert result["status"] == "SIGSEGV" and result["after"] == "compiled"


def test_aoti_probe_forms_are_checked():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "aoti_probe.py"), "--forms", "user-managed,mmap"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--forms: unknown mmap; choose from embedded, user-managed" in r.stderr, r.stderr


@pytest.mark.slow
def test_cold_start_times_each_route_in_a_fresh_process(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cold_start.py"), "--preset", "tiny-t2v", "--latent",
                        "2,4,6", "--text-tokens", "16", "--calls", "2", "--routes", "eager,onnxruntime",
                        "--json", str(tmp_path / "c.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    routes = {x["route"]: x for x in json.loads((tmp_path / "c.json").read_text())["routes"]}
    assert routes["eager"]["served_by"] == "eager" and routes["onnxruntime"]["served_by"] == "onnxruntime"
    for x in routes.values():
        assert x["to_first_output_s"] > x["child_s"] > 0 and x["steady_s"] > 0
