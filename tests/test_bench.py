"""The benchmark harnesses run end to end at toy sizes on the CPU, before any GPU time is spent."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_harness_runs_tiny_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--device", "cpu", "--repeats", "2",
                        "--skip", "compile,aoti", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["cases"]) == {"block480", "full480", "block720", "block5b"}
    for name, case in results["cases"].items():
        assert "error" not in case, case.get("error")
        variants = case["variants"]
        failed = {v: r["error"] for v, r in variants.items() if "error" in r}
        assert not failed, failed
        assert variants["ours eager"]["median_ms"] > 0
        diffusers = variants["diffusers" if name == "full480" else "diffusers block"]
        assert diffusers["rel_error_vs_eager"] < 1e-4  # the same math (0 measured at these sizes)
    block = results["cases"]["block480"]["variants"]
    assert 1e-3 < block["ours FP8 linear (rowwise)"]["rel_error_vs_eager"] < 0.1
    assert "linear part" in " ".join(results["micro"])
    assert "ratio_to_floor" in block["ours eager"] and results["matmul_tflops"] > 0
    assert r.stdout.splitlines()[-1].startswith("full results:")


def test_quantization_error_harness_runs_tiny(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "quantization.py"), "--preset", "tiny-t2v", "--layers",
                        "4", "--latent", "2,4,6", "--seeds", "2", "--json", str(tmp_path / "q.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["quantized_layers"] == 20 and q["tokens"] == 12
    assert 1e-3 < q["nvfp4_model"] < 0.3 and 0.02 < q["nvfp4_weight_per_layer_mean"] < 0.2
    assert 1e-3 < q["nvfp4_weights_only_model"] < 0.3
    if importlib.util.find_spec("modelopt") is None:
        assert q["fp8_model"].startswith("not measured")
    else:
        assert 1e-3 < q["fp8_model"] < 0.05, q["fp8_model"]  # 7.5e-3 measured
