"""The memory and cost model, checked against what the code really allocates and the model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.planning.costs import (activation_bytes, best_fit, build_memory, costs, custom_gpu, find_gpu, floor_seconds,
                           serving_memory)
from builder.planning.plan import weight_bytes
from runtime import StaticShape, get_preset, latent_size
from runtime.errors import WanBuildError

ROOT = Path(__file__).resolve().parents[1]

RSS_PROBE = """
import sys, threading, torch
torch.set_num_threads(2)
from runtime import StaticShape, StaticWanTransformer, get_preset
name, f, h, w = sys.argv[1], *map(int, sys.argv[2:5])
c = get_preset(name)
m = StaticWanTransformer(c, StaticShape(1, f, h, w, 512, c.image_tokens, c.per_token_timesteps)).eval()
inputs = m.example_inputs(1)
with torch.inference_mode():
    m(*inputs)  # warm up allocator pools and kernels
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
base, peak, done = rss(), [0], [False]
def watch():
    while not done[0]:
        peak[0] = max(peak[0], rss())
t = threading.Thread(target=watch); t.start()
with torch.inference_mode():
    m(*inputs)
done[0] = True; t.join()
print(max(peak[0], base) - base)
"""


def measured_rss_delta(preset: str, latent: tuple[int, int, int]) -> int:
    # A fixed mmap threshold makes glibc return freed blocks at once, so RSS follows live tensors
    # (with its adaptive default, a second forward can reuse the first one's heap and show nothing).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, "-c", RSS_PROBE, preset, *map(str, latent)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


# Tolerance: 10% for the mid config; 25% + 8 MB for the tiny ones, where terms that do not scale with
# tokens x dim (timestep sinusoids, per-head scratch) are a large share. Measured when written (three
# runs each, identical to 0.1 MB): mid 3,510 tokens 65.8 MB (predicted 65.6), mid 8,190 tokens
# 152.1 MB (153.0), tiny 6.5 MB (6.2), tiny-ti2v 16.4 MB (10.9).
@pytest.mark.slow
@pytest.mark.parametrize("preset,latent", [("mid-i2v", (9, 30, 52)), ("mid-i2v", (21, 30, 52)),
                                           ("tiny-t2v", (9, 30, 52)), ("tiny-ti2v", (9, 30, 52))])
def test_activation_model_against_peak_rss_on_the_cpu(preset, latent):
    config = get_preset(preset)
    shape = StaticShape(1, *latent, 512, config.image_tokens, config.per_token_timesteps)
    predicted = sum(t.bytes for t in activation_bytes(config, shape, "fp32"))
    measured = measured_rss_delta(preset, latent)
    tolerance = 0.10 * predicted if preset.startswith("mid") else 0.25 * predicted + 8e6
    assert abs(measured - predicted) <= tolerance, (measured, predicted)


def test_activation_model_against_the_recorded_gpu_run():
    """bench/gpu.py's peak allocated memory on an H200 (docs/benchmarks) against the model, 5%."""
    run = json.loads((ROOT / "docs" / "benchmarks" / "gpu-h200-2026-11-26.json").read_text())
    for case, preset, latent in (("block480", "wan2.1-t2v-14b", (21, 60, 104)),
                                 ("block720", "wan2.1-t2v-14b", (21, 90, 160)),
                                 ("block5b", "wan2.2-ti2v-5b", (31, 44, 80))):
        config = get_preset(preset)
        shape = StaticShape(1, *latent, 512, 0, config.per_token_timesteps)
        terms = [t for t in activation_bytes(config, shape, "bf16") if "context" not in t.name]
        predicted = sum(t.bytes for t in terms)
        measured = run["cases"][case]["peak_activation_bytes"]
        assert abs(measured - predicted) <= 0.05 * measured, (case, measured, predicted)


def test_weights_and_flops_of_the_14b_and_5b_models():
    i2v = get_preset("wan2.2-i2v-a14b")
    assert weight_bytes(i2v, "bf16") == 2 * 14_288_901_184
    assert weight_bytes(i2v, "fp32") == 4 * 14_288_901_184
    assert 15e9 < weight_bytes(i2v, "fp8") < 18e9  # middle 34 blocks' linear layers at 1 byte
    ti2v = get_preset("wan2.2-ti2v-5b")
    assert weight_bytes(ti2v, "bf16") == 2 * 4_999_787_712
    shape = StaticShape.for_latent(i2v, 1, latent_size(i2v, 81, 480, 832))
    c = costs(i2v, shape)
    assert c.steps == 40 and c.per_video == pytest.approx(1.678e15 * 2 * 40, rel=1e-3)
    ti_shape = StaticShape.for_latent(ti2v, 1, latent_size(ti2v, 121, 704, 1280))
    assert costs(ti2v, ti_shape).per_video == pytest.approx(5.2e16, rel=0.01)  # section 9: ~5.2e16 at 50 steps


def test_serving_memory_terms_explain_themselves():
    config = get_preset("wan2.2-i2v-a14b")
    shape = StaticShape.for_latent(config, 1, latent_size(config, 81, 720, 1280))
    both = serving_memory(config, shape, "bf16")
    one = serving_memory(config, shape, "bf16", experts_resident=1)
    assert both.total - one.total == pytest.approx(weight_bytes(config, "bf16"))
    names = [t.name for t in both.terms]
    assert names[0].startswith("weights (2 experts") and "activations (attention phase)" in names
    text = "\n".join(both.lines())
    assert "57.16 GB" in text and "9.29 GB" in text
    build = build_memory(config, shape, "bf16", "tensorrt")
    assert build["host"].total > weight_bytes(config, "bf16") and "estimate" in build["gpu"].lines()[0]


def test_fits_on_known_gpus():
    i2v = get_preset("wan2.2-i2v-a14b")
    s480 = StaticShape.for_latent(i2v, 1, latent_size(i2v, 81, 480, 832))
    s720 = StaticShape.for_latent(i2v, 1, latent_size(i2v, 81, 720, 1280))
    assert best_fit(i2v, s480, find_gpu("h100")).short() == "bf16"
    assert best_fit(i2v, s480, find_gpu("A100 40GB")).short() == "bf16 +offload"
    assert best_fit(i2v, s480, find_gpu("rtx 4090")).short() == "fp8 +offload"
    assert best_fit(i2v, s480, find_gpu("RTX 5090")).short() == "nvfp4"  # Blackwell
    assert best_fit(i2v, s720, find_gpu("l40s")).short() == "fp8"
    assert best_fit(i2v, s720, custom_gpu(8)).mode == "no"
    # FP8/NVFP4 only where the hardware has them.
    assert not find_gpu("a100").supports("fp8") and not find_gpu("h100").supports("nvfp4")
    # Floors: 14B 480p step with CFG on an H100 at its datasheet rate, ~3.4 s; fp8 linear layers lower it.
    h100 = find_gpu("h100")
    assert floor_seconds(i2v, s480, h100, "bf16") == pytest.approx(2 * 1.678e15 / 989e12, rel=1e-3)
    assert floor_seconds(i2v, s480, h100, "fp8") < floor_seconds(i2v, s480, h100, "bf16")


def test_unknown_gpu_suggests_the_closest():
    with pytest.raises(WanBuildError, match="did you mean H100 SXM"):
        find_gpu("h100-sxn")
    with pytest.raises(WanBuildError, match="must be > 0"):
        custom_gpu(0)
