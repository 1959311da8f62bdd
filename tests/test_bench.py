"""The benchmark harnesses run end to end at toy sizes on the CPU, before any GPU time is spent.

Nothing here is skipped: every variant that can run on a CPU runs (CUDA graphs cannot, so
bench/gpu.py leaves them out on the CPU; the FP8 matmul ceiling likewise, torch's CPU float8
matmul being a minutes-long reference path). The harness drops compiles when its time budget runs
low, so the tests give it a budget it cannot exhaust and check that every variant is there."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


NO_BUDGET_LIMIT = "100000"  # seconds: the harness never drops a variant for time


@pytest.mark.slow
def test_gpu_harness_runs_tiny_on_cpu(tmp_path):
    """Every case and every eager variant of bench/gpu.py at toy sizes (the compiled ones: below).
    Guards against a harness that breaks before a GPU run (an error in any variant), a diffusers
    comparison that drifts from our eager block, and FP8 variants that silently vanish."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--device", "cpu", "--repeats", "2",
                        "--skip", "compile,aoti", "--budget", NO_BUDGET_LIMIT, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
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
        fp8 = {"ours FP8 (recipe)"} if name == "full480" else {"ours FP8 linear (rowwise)", "ours FP8 linear (per-tensor)"}
        assert fp8 <= set(variants), sorted(variants)
    block = results["cases"]["block480"]["variants"]
    assert 1e-3 < block["ours FP8 linear (rowwise)"]["rel_error_vs_eager"] < 0.1
    assert "linear part" in " ".join(results["micro"])
    assert "ratio_to_floor" in block["ours eager"] and results["matmul_tflops"] > 0
    assert r.stdout.splitlines()[-1].startswith("full results:")


@pytest.mark.slow
def test_gpu_harness_compiled_variants_run_on_cpu(tmp_path):
    """torch.compile and AOTInductor run on a CPU too (Inductor's C++ backend): the harness's compiled
    variants of one block, with a budget that cannot run out. Guards against the compiled variants
    failing (or being dropped) where the other test cannot see it, and the AOTInductor pre-flight probe
    with it. Measured: compile 31 s, AOTInductor 17 s, both 3.1e-3 from the eager bf16 block (fusions
    round intermediates elsewhere); the probe 21 s."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--device", "cpu", "--repeats", "2",
                        "--cases", "block480", "--skip", "diffusers,fp8,micro,fp32", "--budget", NO_BUDGET_LIMIT,
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["aoti_loads"] is True, r.stdout[-2000:]
    # The pre-flight probe (bench/aoti_probe.py --forms user-managed, in its own process) ran a package.
    probe = next(line for line in r.stdout.splitlines() if "AOTInductor load probe" in line)
    assert "cpu mlp form=user-managed" in probe and " ok " in probe and "after ran rel" in probe, probe
    variants = results["cases"]["block480"]["variants"]
    failed = {v: x["error"] for v, x in variants.items() if "error" in x}
    assert not failed, failed
    for variant in ("ours torch.compile", "ours AOTInductor"):
        assert variants[variant]["median_ms"] > 0
        assert variants[variant]["rel_error_vs_eager"] < 2e-2  # the bf16 engine parity tolerance


@pytest.mark.slow  # 16 s on 2 cores
def test_quantization_error_harness_runs_tiny(tmp_path):
    """bench/quantization.py at toy sizes: the FP8 (through Model Optimizer when installed) and NVFP4
    errors it reports lie where the recipe puts them. Guards against a harness that quantizes the
    wrong layers (the count) or reports an error of the wrong size."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "quantization.py"), "--preset", "tiny-t2v", "--layers",
                        "4", "--latent", "2,4,6", "--seeds", "2", "--json", str(tmp_path / "q.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["quantized_layers"] == 20 and q["tokens"] == 12
    assert 1e-3 < q["nvfp4_model"] < 0.3 and 0.02 < q["nvfp4_weight_per_layer_mean"] < 0.2
    assert 1e-3 < q["nvfp4_weights_only_model"] < 0.3
    front = q["front"]
    assert front["fp32"]["error"] == 0.0 and 1e-3 < front["bf16"]["error"] < 2e-2
    assert all(1e-4 < front[k]["error"] < 5e-2 for k in ("int8 (fp32 elsewhere)", "int8 (bf16 elsewhere)"))
    assert front["int8 (fp32 elsewhere)"]["weights_bytes"] < front["fp32"]["weights_bytes"]
    # GGUF: the layers whose rows are whole 32-value blocks are quantized (ffn.net.2, the text embedding)
    assert 1e-4 < front["GGUF Q8_0"]["error"] < front["GGUF Q4_0"]["error"] < 0.1
    if importlib.util.find_spec("modelopt") is None:
        assert q["fp8_model"].startswith("not measured")
    else:
        assert 1e-3 < q["fp8_model"] < 0.05, q["fp8_model"]  # 7.5e-3 measured


def test_step_cache_benchmark_runs_tiny(tmp_path):
    """bench/step_cache.py at toy size: every run is printed and recorded, ours matches diffusers'
    hooks with the same config, and the policies do skip."""
    pytest.importorskip("diffusers")
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "step_cache.py"), "--preset", "tiny-t2v", "--steps", "6",
                        "--latent", "2,4,6", "--threshold-fbc", "0.6", "--threshold-mag", "0.3", "--no-engine",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["policy"], x["run"]) for x in rows] == [
        ("none", "diffusers"), ("none (MagCache calibrate)", "ours eager"), ("First-Block-Cache", "diffusers"),
        ("First-Block-Cache", "ours eager"), ("MagCache", "diffusers"), ("MagCache", "ours eager")]
    ours = [x for x in rows if x["run"] == "ours eager" and x["policy"] != rows[1]["policy"]]
    assert all(x["skipped"] > 0 and x["error_vs_diffusers"] < 1e-5 for x in ours), ours
    assert "First-Block-Cache" in r.stdout and "x none" in r.stdout


def test_gpu_features_suite_runs_tiny_on_cpu(tmp_path):
    """`bench/gpu.sh --suite features --tiny`, the prepared GPU check of the LoRA swap and step
    caching, runs end to end here at toy sizes and leaves both records."""
    pytest.importorskip("diffusers")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--suite", "features", "--tiny"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    swap = json.loads((tmp_path / "lora_swap.json").read_text())
    assert set(swap["swaps_s"]) == {"base -> A", "A -> B", "B -> base"} and len(swap["swaps_s"]["A -> B"]) == 2
    cache = json.loads((tmp_path / "step_cache.json").read_text())
    assert len(cache["rows"]) == 6 and all(r["error_vs_diffusers"] < 1e-5 for r in cache["rows"]
                                           if r["error_vs_diffusers"] is not None)
    linear = json.loads((tmp_path / "int8_linear.json").read_text())["rows"]
    assert set(linear) >= {"bf16", "int8 W8A8", "int4 weight-only"} and linear["bf16"]["error_max"] == 0.0
    assert 1e-4 < linear["int8 W8A8"]["error_mean"] < 2e-2 < linear["int4 weight-only"]["error_mean"] < 0.3
