"""Engines built once serve other weights of the same structure: a fine-tune's checkpoint, merged
LoRAs. Every backend that takes its weights from the model is fed weights it was not built with and
compared with eager on those weights; what must not serve (another structure, another layout,
entries that hold their build's weights) is refused with its reason."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from builder.build import build
from builder.init_weights import init_weights
from builder.profiles import load_profile
from runtime import WanTransformer
from runtime.config import get_preset

from .conftest import make_inputs, relative_error

BACKENDS = ("onnxruntime", "aoti", "inductor")
LATENT = (2, 4, 6)
TEXT = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One fp32 entry per backend, built from the weights in `built/`; `other/` holds other weights
    of the same model (another seed), `i2v/` weights of another structure."""
    root = tmp_path_factory.mktemp("independent")
    config = get_preset("tiny-t2v")
    init_weights(config, root / "built", seed=7)
    init_weights(config, root / "other", seed=8)
    init_weights(get_preset("tiny-i2v"), root / "i2v", seed=7)
    (root / "p.yaml").write_text(f"name: i\nmodel: {{weights: built}}\nprecision: fp32\n"
                                 f"backends: [{', '.join(BACKENDS)}]\nshapes:\n  - {{frames: 5, height: 32, width: 48}}\n"
                                 f"text_tokens: {TEXT}\ndevice: cpu\n")
    report = build(load_profile(root / "p.yaml"), root / "engines", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"] * len(BACKENDS), report.table()
    return root


def run(model, seed=0):
    x, t, ctx, _ = make_inputs(model.wan_config, 1, LATENT, seed=seed, text_tokens=TEXT)
    with torch.no_grad():
        return model(x, t, ctx).sample


def test_every_entry_records_that_it_takes_the_models_weights(folder):
    manifest = json.loads((folder / "engines" / "manifest.json").read_text())
    for entry in manifest["entries"].values():
        assert entry["options"]["weights"] == "front" and len(entry["options"]["weights_layout"]) == 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_another_checkpoint_of_the_same_model_is_served(folder, backend):
    model = WanTransformer.from_pretrained(folder / "other", engines=folder / "engines", backends=[backend])
    out = run(model)
    assert model.last_route.backend == backend, model.last_route
    assert "another checkpoint" in model.last_route.reason
    eager = run(WanTransformer.from_pretrained(folder / "other"))
    built = run(WanTransformer.from_pretrained(folder / "built"))
    assert relative_error(eager, built) > 1e-2  # the weights do differ
    assert relative_error(out, eager) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_loras_are_served_and_swapped_without_a_rebuild(folder, backend, tmp_path):
    from .test_lora import make_lora

    config = get_preset("tiny-t2v")
    a = make_lora(config, tmp_path / "a.safetensors", "diffusers", seed=1)
    b = make_lora(config, tmp_path / "b.safetensors", "musubi", seed=2, alpha=2.0)
    model = WanTransformer.from_pretrained(folder / "built", engines=folder / "engines", backends=[backend])
    run(model, seed=1)
    for loras in ([(a, 1.0)], [(b, 0.5)], [(a, 1.0), (b, 0.5)], []):
        model.set_loras(loras)
        out = run(model, seed=1)
        assert model.last_route.backend == backend, model.last_route
        eager = run(WanTransformer.from_pretrained(folder / "built", loras=loras), seed=1)
        assert relative_error(out, eager) < 1e-5, (loras, backend)
    # AOTInductor and inductor engines are handed the new tensors in place; ONNX Runtime sessions
    # (weights given at session creation) are opened again
    loads = sum(model.engines.load_attempts.values())
    assert loads == (5 if backend == "onnxruntime" else 1)


def test_weights_of_another_structure_are_refused(folder):
    """The i2v model's weights against the t2v folder: no entry serves, and the reason says why."""
    model = WanTransformer.from_pretrained(folder / "i2v", engines=folder / "engines")
    assert model.engines.refusals and all("built for another model" in why
                                          for _, why in model.engines.refusals.values())


def test_an_entry_of_another_layout_is_not_handed_these_tensors(folder, tmp_path):
    """The layout check is real: an entry whose recorded layout differs from the model's (another
    precision policy, FP8 scaling) does not load; calls fall back with the reason."""
    engines = tmp_path / "engines"
    shutil.copytree(folder / "engines", engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    for entry in manifest["entries"].values():
        entry["options"]["weights_layout"] = "0" * 64
    (engines / "manifest.json").write_text(json.dumps(manifest))
    model = WanTransformer.from_pretrained(folder / "other", engines=engines)
    out = run(model)
    assert model.last_route.backend == "eager" and "another weights layout" in model.last_route.reason
    assert torch.equal(out, run(WanTransformer.from_pretrained(folder / "other")))


def test_two_experts_serve_their_own_loras_from_engines(tmp_path):
    """load_engines(loras={"high_noise": ..., "low_noise": ...}): each expert's engine serves its own
    merged weights (Wan2.2 LoRAs come in high/low pairs), equal to eager on them."""
    from runtime import load_engines

    from .test_lora import make_lora

    config = get_preset("tiny-i2v-a14b")
    high, low = init_weights(config, tmp_path / "w", seed=3)
    (tmp_path / "p.yaml").write_text(f"name: two\nmodel:\n  experts: {{high_noise: {high}, low_noise: {low}, "
                                     f"boundary: {config.boundary}}}\n  preset: tiny-i2v-a14b\nprecision: fp32\n"
                                     "backends: onnxruntime\nshapes:\n  - {frames: 5, height: 32, width: 48}\n"
                                     "device: cpu\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "engines", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"] * 2, report.table()
    a = make_lora(config, tmp_path / "a.safetensors", "diffusers", seed=1)
    b = make_lora(config, tmp_path / "b.safetensors", "original", seed=2)
    router = load_engines(tmp_path / "engines", loras={"high_noise": [(a, 1.0)], "low_noise": [(b, 0.5)]})
    x, _, ctx, image = make_inputs(config, 1, LATENT)
    for t, folder, loras in ((950.0, high, [(a, 1.0)]), (100.0, low, [(b, 0.5)])):
        with torch.no_grad():
            out = router(x, torch.tensor([t]), ctx, image).sample
            eager = WanTransformer.from_pretrained(folder, loras=loras)(x, torch.tensor([t]), ctx, image).sample
        assert router.last_route.backend == "onnxruntime", router.last_route
        assert relative_error(out, eager) < 1e-5
