"""Build, load and route: engines against diffusers, every fallback reason, resume, concurrency."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import builder.build as build_module
from builder.build import build
from builder.catalog import list_entries, verify
from builder.init_weights import init_weights
from builder.profiles import load_profile
from runtime import WanExpertRouter, WanTransformer, get_preset, load_engines
from runtime.manifest import EngineError

from .conftest import cpu_fp16_onnxruntime, cpu_statuses, make_inputs, reference_model, relative_error

LATENT = (3, 8, 12)  # 9 frames x 64 x 96 pixels


def profile_text(weights: str, precision: str, backends: str, name: str = "t") -> str:
    return (f"name: {name}\nmodel: {{weights: {weights}}}\nprecision: {precision}\nbackends: {backends}\n"
            "shapes:\n  - {batch: 1, frames: 9, height: 64, width: 96}\ndevice: cpu\n")


@pytest.fixture(scope="session", autouse=True)
def hash_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("WAN_BUILD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """tiny-i2v (CLIP image tokens) with fp32 and fp16 engines of both CPU backends."""
    root = tmp_path_factory.mktemp("engines")
    init_weights(get_preset("tiny-i2v"), root / "w", seed=21)
    (root / "p.yaml").write_text(profile_text("w", "[fp32, fp16]", "[onnxruntime, aoti]"))
    report = build(load_profile(root / "p.yaml"), root / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == cpu_statuses(report), report.table()
    return root


def call(model, seed=0, latent=LATENT, dtype=torch.float32):
    x, t, ctx, image = make_inputs(get_preset("tiny-i2v"), 1, latent, seed=seed)
    with torch.no_grad():
        return model(x.to(dtype), t, ctx.to(dtype), image.to(dtype)).sample, (x, t, ctx, image)


def test_engine_folder_and_manifest(built):
    out = built / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 2 and set(manifest["experts"]) == {"main"}
    entries = manifest["entries"]
    assert len(entries) == (4 if cpu_fp16_onnxruntime() else 3) and not list(out.glob(".partial-*"))
    for eid, e in entries.items():
        assert e["id"] == eid and (out / eid / "parity.json").is_file()
        assert e["shape"]["video_frames"] == 9 and e["shape"]["tokens"] == 72 and e["shape"]["image_tokens"] == 257
        assert e["parity"]["passed"] and e["weights_fingerprint"] == manifest["experts"]["main"]["fingerprint"]
        assert e["versions"]["torch"] == torch.__version__
        assert all(len(f["sha256"]) == 64 for f in e["files"].values())
        names = {"aoti": {"engine.pt2", "parity.json"}, "onnxruntime": {"model.onnx", "model.onnx.data", "parity.json"}}
        assert set(e["files"]) == names[e["backend"]]
        assert [i["name"] for i in e["inputs"]][-1] == "encoder_hidden_states_image"


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_routes_to_engine_and_matches_diffusers(built, backend):
    model = WanTransformer.from_pretrained(built / "w", engines=built / "out", backends=[backend])
    out, (x, t, ctx, image) = call(model, seed=1)
    assert model.last_route.backend == backend and "built for this shape" in model.last_route.reason
    with torch.no_grad():
        ref = reference_model(built / "w")(x, t, ctx, image).sample
    assert relative_error(out, ref) < 1e-5


def test_fp16_engines(built):
    model = WanTransformer.from_pretrained(built / "w", torch.float16, engines=built / "out")
    out, (x, t, ctx, image) = call(model, seed=2, dtype=torch.float16)
    assert model.last_route.backend == "aoti" and "fp16" in model.last_route.reason
    with torch.no_grad():
        ref = reference_model(built / "w")(x, t, ctx, image).sample
    assert out.dtype == torch.float16 and relative_error(out, ref) < 1e-2


def test_fallback_reasons(built, tmp_path):
    plain = WanTransformer.from_pretrained(built / "w")
    call(plain)
    assert plain.last_route.backend == "eager" and plain.last_route.reason.startswith("no engine folder given")

    model = WanTransformer.from_pretrained(built / "w", engines=built / "out")
    out, _ = call(model, latent=(3, 8, 16))
    assert model.last_route.backend == "eager"
    assert model.last_route.reason.startswith("no engine built for this shape (1 usable shapes")
    assert relative_error(out, call(plain, latent=(3, 8, 16))[0]) == 0

    bf16 = WanTransformer.from_pretrained(built / "w", torch.bfloat16, engines=built / "out")
    call(bf16, dtype=torch.bfloat16)
    assert bf16.last_route.reason.startswith("engines for this shape are fp16, fp32, this model runs bf16")

    # other weights of this model: the entries take the model's weights, so they serve them
    init_weights(get_preset("tiny-i2v"), tmp_path / "other", seed=22)
    other = WanTransformer.from_pretrained(tmp_path / "other", engines=built / "out")
    out, _ = call(other)
    assert other.last_route.backend != "eager" and "another checkpoint" in other.last_route.reason
    assert relative_error(out, call(WanTransformer.from_pretrained(tmp_path / "other"))[0]) < 1e-5
    # weights of another model: refused, eager answers
    deeper = get_preset("tiny-i2v").replace(num_layers=get_preset("tiny-i2v").num_layers + 1)  # same shapes
    init_weights(deeper, tmp_path / "deeper", seed=22)
    model = WanTransformer.from_pretrained(tmp_path / "deeper", engines=built / "out")
    out, _ = call(model)
    assert model.last_route.backend == "eager" and "built for another model" in model.last_route.reason
    assert relative_error(out, call(WanTransformer.from_pretrained(tmp_path / "deeper"))[0]) == 0
    with pytest.raises(EngineError, match="refused: built for another model"):
        WanTransformer.from_pretrained(tmp_path / "deeper", engines=built / "out", strict=True)
    with pytest.raises(EngineError, match="no manifest.json"):
        WanTransformer.from_pretrained(built / "w", engines=tmp_path)


def _copy(built: Path, tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "engines"
    shutil.copytree(built / "out", folder)
    return folder, json.loads((folder / "manifest.json").read_text())


def _entry(manifest: dict, backend: str, precision: str = "fp32") -> dict:
    return next(e for e in manifest["entries"].values() if e["backend"] == backend and e["precision"] == precision)


@pytest.mark.parametrize("damage,reason", [
    ("tamper", "fails its sha256 check"), ("truncate", "the manifest says"), ("delete", "is missing"),
    ("version", "built with torch 0.0"), ("garbage", "failed to load"),
])
def test_damaged_engine_is_refused_and_the_call_still_answers(built, tmp_path, damage, reason):
    folder, manifest = _copy(built, tmp_path)
    entry = _entry(manifest, "aoti")
    path = folder / entry["id"] / "engine.pt2"
    data = path.read_bytes()
    if damage == "tamper":
        path.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        path.unlink()
    elif damage == "version":
        entry["versions"]["torch"] = "0.0"
    elif damage == "garbage":  # passes every manifest check, fails inside the library
        import hashlib

        path.write_bytes(b"not a zip archive" * 100)
        entry["files"]["engine.pt2"] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": 1700}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    model = WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"])
    out, _ = call(model, seed=3)
    assert model.last_route.backend == "eager"
    assert reason in model.last_route.reason and entry["id"] in model.last_route.reason
    assert relative_error(out, call(WanTransformer.from_pretrained(built / "w"), seed=3)[0]) == 0
    # The ONNX Runtime engine of the same shape still serves when both are allowed.
    both = WanTransformer.from_pretrained(built / "w", engines=folder)
    call(both)
    assert both.last_route.backend == "onnxruntime"
    strict = dict(engines=folder, backends=["aoti"], strict=True)
    if damage == "garbage":
        with pytest.raises(EngineError, match="failed to load"):
            call(WanTransformer.from_pretrained(built / "w", **strict))
    else:
        with pytest.raises(EngineError, match=reason):
            WanTransformer.from_pretrained(built / "w", **strict)
    # verify re-hashes and re-runs the engine: damaged files and an unloadable package fail; an entry the
    # runtime would refuse on this machine (another torch) is not run, and says why.
    result = next(r for r in verify(folder, echo=lambda s: None).results if r.id == entry["id"])
    assert result.status == ("skipped" if damage == "version" else "failed")
    assert (reason if damage != "garbage" else "not a ZIP archive") in result.detail


def test_verify_and_list(built):
    results = verify(built / "out", echo=lambda s: None).results
    count = 4 if cpu_fp16_onnxruntime() else 3
    assert [r.status for r in results] == ["ok"] * count
    lines = list_entries(built / "out")
    assert len(lines) == count + 1 and "aoti" in "".join(lines) and "MB" in lines[1]


def test_interrupted_build_resumes(tmp_path, monkeypatch):
    init_weights(get_preset("tiny-t2v"), tmp_path / "w", seed=3)
    (tmp_path / "p.yaml").write_text(profile_text("w", "fp32", "[onnxruntime, inductor]"))
    profile = load_profile(tmp_path / "p.yaml")
    real = build_module.build_files
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            (args[3]).mkdir(parents=True, exist_ok=True)
            (args[3] / "model.onnx").write_bytes(b"half written")
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "build_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(profile, tmp_path / "out", echo=lambda s: None)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["entries"]) == 1
    assert not list((tmp_path / "out").glob(".partial-*"))
    monkeypatch.setattr(build_module, "build_files", real)
    report = build(profile, tmp_path / "out", echo=lambda s: None)
    assert sorted(r.status for r in report.results) == ["built", "kept"]


def test_parity_failure_fails_the_build_unless_allowed(tmp_path, monkeypatch):
    init_weights(get_preset("tiny-t2v"), tmp_path / "w", seed=4)
    (tmp_path / "p.yaml").write_text(profile_text("w", "fp32", "onnxruntime"))
    import dataclasses

    from runtime.precision import FACTS, Precision

    monkeypatch.setitem(FACTS, Precision.FP32, dataclasses.replace(FACTS[Precision.FP32], parity_tolerance=0.0))
    profile = load_profile(tmp_path / "p.yaml")
    report = build(profile, tmp_path / "out", echo=lambda s: None)
    assert report.results[0].status == "failed" and "parity failed" in report.results[0].message
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["entries"] == {}
    assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] == ["manifest.json"]
    report = build(profile, tmp_path / "out", allow_mismatch=True, echo=lambda s: None)
    assert report.results[0].status == "built" and "PARITY FAILED" in report.results[0].message
    entry = next(iter(json.loads((tmp_path / "out" / "manifest.json").read_text())["entries"].values()))
    assert entry["allow_mismatch"] is True and entry["parity"]["passed"] is False
    assert "MISMATCH" in "".join(list_entries(tmp_path / "out"))


@pytest.mark.slow
def test_two_concurrent_builds_of_one_folder(tmp_path):
    init_weights(get_preset("tiny-t2v"), tmp_path / "w", seed=5)
    (tmp_path / "p.yaml").write_text(profile_text("w", "fp32", "[onnxruntime, inductor]"))
    cmd = [sys.executable, "-m", "builder.cli", "build", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    summaries = [o[0].strip().splitlines()[-1] for o in outs]
    assert sorted(summaries) == sorted([f"{tmp_path / 'out'}: 2 built", f"{tmp_path / 'out'}: 2 kept"]), summaries
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["entries"]) == 2
    assert not list((tmp_path / "out").glob(".partial-*"))


def test_two_expert_router(tmp_path):
    config = get_preset("tiny-i2v-a14b")
    init_weights(config, tmp_path / "w", seed=6)
    (tmp_path / "p.yaml").write_text(
        "name: two\nmodel:\n  experts: {high_noise: w/transformer, low_noise: w/transformer_2, boundary: 0.9}\n"
        "precision: fp32\nbackends: onnxruntime\nshapes:\n  - {batch: 1, frames: 9, height: 64, width: 96}\n")
    build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    router = load_engines(tmp_path / "out")
    assert isinstance(router, WanExpertRouter) and router.boundary == 0.9
    x, _, ctx, _ = make_inputs(config, 1, LATENT)
    with torch.no_grad():
        for t, expert in ((torch.tensor([900.0]), "high_noise"), (torch.tensor(899.0), "low_noise")):
            out = router(x, t, ctx).sample
            assert router.last_expert == expert and router.last_route.backend == "onnxruntime"
            ref = reference_model(tmp_path / "w" / ("transformer" if expert == "high_noise" else "transformer_2"))
            assert relative_error(out, ref(x, t.reshape(1), ctx).sample) < 1e-5
        with pytest.raises(Exception, match="both sides of the expert boundary"):
            router(torch.cat([x, x]), torch.tensor([950.0, 100.0]), torch.cat([ctx, ctx]))
    # Each diffusers expert finds its own engines by its weights' fingerprint.
    low = WanTransformer.from_pretrained(tmp_path / "w", subfolder="transformer_2", engines=tmp_path / "out")
    assert low.engines.expert == "low_noise"
