"""The `inductor` backend: one block compiled ahead of time per shape, served on the front's tensors."""

from __future__ import annotations

import json

import pytest
import torch

import runtime.backends.inductor as inductor_runtime
from builder.build import build
from builder.init_weights import init_weights
from builder.profiles import load_profile
from runtime import WanTransformer, get_preset

from .conftest import make_inputs, reference_model, relative_error

CONFIG = get_preset("tiny-t2v")


def _build(root, form_patch=None):
    init_weights(CONFIG, root / "w", seed=9)
    (root / "p.yaml").write_text("name: ind\nmodel: {weights: w}\nprecision: fp32\nbackends: [inductor]\n"
                                 "shapes:\n  - {batch: 1, frames: 5, height: 32, width: 48}\ntext_tokens: 16\n"
                                 "device: cpu\n")
    report = build(load_profile(root / "p.yaml"), root / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"], report.table()
    return json.loads((root / "out" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def aot_built(tmp_path_factory):
    """One tiny entry of the aot_compile form (what this torch builds), shared by the tests below."""
    if inductor_runtime.available_form() != "aot_compile":
        pytest.skip(f"torch {torch.__version__} has no aot_compile; the cache_artifacts case covers the backend")
    root = tmp_path_factory.mktemp("aot")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor-cache"))
        manifest = _build(root)
    return root, manifest


@pytest.mark.slow
@pytest.mark.parametrize("form", ["aot_compile", "cache_artifacts"])
def test_inductor_entries_serve_like_diffusers(tmp_path, monkeypatch, request, form):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    if form == "aot_compile":
        root, manifest = request.getfixturevalue("aot_built")
    else:
        monkeypatch.setattr(inductor_runtime, "available_form", lambda: form)
        monkeypatch.setattr("builder.backends.inductor.available_form", lambda: form)
        root, manifest = tmp_path, _build(tmp_path)
    entry = next(iter(manifest["entries"].values()))
    assert entry["options"]["form"] == form and set(entry["files"]) == {"block.compiled", "compile-cache.zip",
                                                                        "parity.json"}
    assert entry["parity"]["relative"] < 1e-5
    model = WanTransformer.from_pretrained(root / "w", engines=root / "out")
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=16)
    strided = x.permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)
    with torch.no_grad():
        out = model(strided, t, ctx).sample
        assert model.last_route.backend == "inductor", model.last_route
        ref = reference_model(root / "w")(x, t, ctx).sample
    assert relative_error(out, ref) < 1e-5
    with torch.inference_mode():  # pipelines call under no_grad or inference mode: both are served
        again = model(x, t, ctx).sample
    [engine] = model.engines._loaded.values()
    assert engine.fell_back is None and relative_error(again, ref) < 1e-5


def test_inductor_entries_are_refused_for_another_torch_python_or_device(tmp_path, monkeypatch):
    """Guards the version and device rules of compiled code (no compile here: the records are edited)."""
    from runtime.backends import backend
    from runtime.manifest import capability_of, cpu_isa, tool_versions
    from runtime.static import StaticShape

    from .conftest import make_entry

    b = backend("inductor")
    here = tool_versions()
    entry = make_entry(CONFIG, StaticShape(1, 2, 4, 6, 16), "inductor", versions=dict(here),
                       options={"form": "aot_compile"})
    cpu = torch.device("cpu")
    assert b.compatibility(entry, cpu, capability_of(cpu), here) in (None, "an aot_compile artifact, and torch "
                                                                     f"{torch.__version__} cannot load those")
    for tool in ("torch", "python"):
        other = make_entry(CONFIG, StaticShape(1, 2, 4, 6, 16), "inductor", versions={**here, tool: "0.0"},
                           options={"form": "aot_compile"})
        assert f"built with {tool} 0.0" in b.compatibility(other, cpu, None, here)
    gpu = make_entry(CONFIG, StaticShape(1, 2, 4, 6, 16), "inductor", versions=dict(here),
                     device={"type": "cuda", "compute_capability": "9.0"}, options={"form": "aot_compile"})
    assert "compiled for cuda, the model runs on cpu" in b.compatibility(gpu, cpu, None, here)
    odd = make_entry(CONFIG, StaticShape(1, 2, 4, 6, 16), "inductor", versions=dict(here), options={"form": "x"})
    assert "artifact form 'x'" in b.compatibility(odd, cpu, None, here)
    for name in ("inductor", "aoti"):  # CPU code of other vector instruction sets (AVX-512 or AMX code faults on AVX2)
        other_cpu = make_entry(CONFIG, StaticShape(1, 2, 4, 6, 16), name, versions=dict(here),
                               device={"type": "cpu", "compute_capability": None, "cpu_isa": "sve256"},
                               options={"form": "aot_compile"})
        assert (f"compiled for a CPU with sve256, this CPU has {cpu_isa()}"
                in backend(name).compatibility(other_cpu, cpu, None, here))
    assert "fp8 engines are built by the tensorrt backend and aoti" in b.runs(
        __import__("runtime.precision", fromlist=["Precision"]).Precision.FP8, cpu, None)


FRESH = """
import json, sys, torch
import torch._inductor.cpp_builder as cpp_builder
from runtime import WanTransformer
import runtime.compile_cache as compile_cache
def no_compiler(self, *a, **k):
    raise RuntimeError("the C++ compiler was called")
cpp_builder.CppBuilder.build = no_compiler
if sys.argv[2] == "no-seed":
    compile_cache.seed_entry = lambda *a, **k: 0
model = WanTransformer.from_pretrained(sys.argv[1] + "/w", engines=sys.argv[1] + "/out")
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 16, 2, 4, 6, generator=g)
ctx = torch.randn(1, 16, model.config.text_dim, generator=g)
with torch.no_grad():
    out = model(x, torch.tensor([500.0]), ctx).sample
torch.save(out, sys.argv[3])
print(json.dumps({"backend": model.last_route.backend, "reason": model.last_route.reason}))
"""


@pytest.mark.slow
def test_a_fresh_process_serves_the_artifact_without_compiling(tmp_path, aot_built):
    """A process with an empty compile cache and no C++ compiler serves the entry from its compile
    cache (the kernels its build's fresh-process load compiled) and equals diffusers; without the
    seeding, the same process cannot load it and falls back to eager, saying why."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    built, _ = aot_built
    root = Path(__file__).resolve().parents[1]
    results = {}
    for mode in ("seed", "no-seed"):
        (tmp_path / f"tmp-{mode}").mkdir()  # an empty temp folder too: torch keeps precompiled headers there
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"empty-{mode}"), "PYTHONPATH": str(root),
               "TMPDIR": str(tmp_path / f"tmp-{mode}")}
        r = subprocess.run([sys.executable, "-c", FRESH, str(built), mode, str(tmp_path / f"out-{mode}.pt")],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        results[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    assert results["seed"]["backend"] == "inductor", results
    assert results["no-seed"]["backend"] == "eager" and "the C++ compiler was called" in results["no-seed"]["reason"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 16, CONFIG.text_dim, generator=g)
    with torch.no_grad():
        ref = reference_model(built / "w")(x, torch.tensor([500.0]), ctx).sample
    assert relative_error(torch.load(tmp_path / "out-seed.pt"), ref) < 1e-5


def test_a_flipped_byte_in_the_compile_cache_is_refused_and_the_call_answers(tmp_path, aot_built, monkeypatch):
    """The bundle is code written into torch's cache: a byte changed with the file's time kept fails
    its sha256 before anything is seeded, the call runs eager (the same answer) and says why."""
    import shutil

    from .test_trust import flip_byte_keep_time

    built, manifest = aot_built
    shutil.copytree(built / "out", tmp_path / "out")
    [entry_id] = manifest["entries"]
    flip_byte_keep_time(tmp_path / "out" / entry_id / "compile-cache.zip")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    model = WanTransformer.from_pretrained(built / "w", engines=tmp_path / "out")
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=16)
    with torch.no_grad():
        out = model(x, t, ctx).sample
        ref = reference_model(built / "w")(x, t, ctx).sample
    assert model.last_route.backend == "eager" and "sha256" in model.last_route.reason, model.last_route
    assert relative_error(out, ref) < 1e-5
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.so"))
