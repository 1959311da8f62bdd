"""Stage engines (`cache_stages: true`): each shape's prologue, first block, other blocks and epilogue
built by ONNX Runtime and AOTInductor, sharing the whole model's weights; step-cached calls run on
them, checked against diffusers' own hooks on `WanTransformer3DModel`; what callers and broken
folders give them."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from builder.init_weights import init_weights
from runtime import WanTransformer, get_preset
from runtime.config import latent_size
from runtime.stages import STAGES, StagedCall, StageModel, context_names, stage_example, stages_of
from runtime.static import StaticShape, StaticWanTransformer

from .conftest import make_inputs, relative_error
from .test_cache import CONFIG as CACHE_CONFIG, TEXT, configs, denoise, record_routes
from .test_trust import flip_byte_keep_time

diffusers = pytest.importorskip("diffusers")
hooks = pytest.importorskip("diffusers.hooks")

CONFIG = CACHE_CONFIG.replace(num_layers=3)  # stage engines need two blocks or more; three compile faster than four


def profile_text(weights, backends: str, extra: str = "") -> str:
    return (f"name: s\nmodel: {{weights: {weights}}}\nprecision: fp32\nbackends: [{backends}]\ncache_stages: true\n"
            f"shapes:\n  - {{frames: 5, height: 32, width: 48}}\ntext_tokens: {TEXT}\ndevice: cpu\n{extra}")


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """An engine folder with the whole-model and stage entries of one shape, for both CPU backends."""
    from builder.build import build
    from builder.profiles import load_profile

    root = tmp_path_factory.mktemp("stages")
    init_weights(CONFIG, root / "w", seed=3)
    (root / "p.yaml").write_text(profile_text(root / "w", "onnxruntime, aoti"))
    report = build(load_profile(root / "p.yaml"), root / "engines", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"] * 10, "\n".join(report.table())
    return root


# -- the stages themselves (eager) ------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v", "tiny-flf2v", "tiny-ti2v"])
@pytest.mark.parametrize("layers", [1, 3])
def test_stages_compose_to_the_whole_model_and_share_its_tensors(preset, layers):
    config = get_preset(preset).replace(num_layers=layers)
    shape = StaticShape.for_latent(config, 2, latent_size(config, 9, 64, 96))
    torch.manual_seed(0)
    model = StaticWanTransformer(config, shape).eval()
    inputs = model.example_inputs()
    stages = {s: StageModel(model, s) for s in stages_of(layers)}
    assert ("other_blocks" in stages) == (layers > 1)
    with torch.no_grad():
        call = StagedCall(stages, len(context_names(model)))
        x, contexts, temb, temb_proj = call.prologue(*inputs)
        out = call.epilogue(call.blocks(x, contexts, temb_proj, 0, None), temb)
        assert relative_error(out, model(*inputs)) < 1e-6
    # every weight is in exactly one stage, under its own name, the very tensor of the whole model
    whole = model.weights()
    names = [n for s in stages.values() for n in s.weights()]
    assert sorted(names) == sorted(whole)
    assert all(t.data_ptr() == whole[n].data_ptr() for s in stages.values() for n, t in s.weights().items())
    for stage, module in stages.items():
        ins, outs = stage_example(model, stage, inputs)
        assert len(ins) == len(module.input_names) and len(outs) == len(module.output_names)
        with torch.no_grad():
            assert all(relative_error(a, b) < 1e-6 for a, b in zip(module(*ins), outs))
    with pytest.raises(Exception, match="not one of"):
        StageModel(model, "middle")


# -- built stage engines -----------------------------------------------------------------------------
def test_stages_share_the_whole_models_weights_file(staged):
    from runtime.manifest import read_manifest

    manifest = read_manifest(staged / "engines")
    stages = [e for e in manifest.entries.values() if e.stage]
    assert sorted(e.stage for e in stages) == sorted(STAGES * 2)
    assert all(e.front_weights and e.parity.passed and e.parity.relative < 1e-5 for e in stages)
    data = {os.stat(staged / "engines" / e.id / "model.onnx.data").st_ino
            for e in manifest.entries.values() if e.backend == "onnxruntime"}
    assert len(data) == 1  # one file on disk for the whole model and its four stages
    assert len(list((staged / "engines" / ".weights").iterdir())) == 1


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
@pytest.mark.parametrize("index", [0, 1], ids=["first-block-cache", "mag-cache"])
def test_cached_calls_run_on_stage_engines_and_match_diffusers_hooks(staged, backend, index):
    ref = diffusers.WanTransformer3DModel.from_pretrained(staged / "w").eval()
    expected, _ = denoise(ref, configs()[index])
    ours = WanTransformer.from_pretrained(staged / "w", engines=staged / "engines", backends=[backend])
    routes = record_routes(ours)
    got, skipped = denoise(ours, configs()[index])
    assert 0 < sum(skipped) < len(skipped)
    assert max(relative_error(a, b) for a, b in zip(got, expected)) < 1e-5
    # each stage engine loaded once for the whole loop (the default max_loaded_engines=2 counts a
    # shape's stage engines as one)
    assert len(ours.engines.load_attempts) == 4 and set(ours.engines.load_attempts.values()) == {1}
    assert all(r.backend == backend and "stage engines run: prologue" in r.reason for r in routes)
    for route, skip in zip(routes, skipped):
        ran = re.search(r"stage engines run: ([a-z_, ]+);", route.reason).group(1).split(", ")
        if index == 1:  # MagCache skips every block, or none
            assert ran == (["prologue", "epilogue"] if skip else list(STAGES)), route.reason
        else:  # First-Block-Cache always runs the first block
            assert ran == (["prologue", "first_block", "epilogue"] if skip else list(STAGES)), route.reason
    # without a policy the whole-model entry serves, as before
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=TEXT)
    with torch.no_grad():
        ours(x, t, ctx)
    assert ours.last_route.backend == backend and "stage" not in ours.last_route.reason


def test_stage_engines_take_strided_and_expanded_inputs(staged):
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=TEXT)
    strided = x.transpose(3, 4).contiguous().transpose(3, 4)
    expanded = ctx[:, :1].expand(-1, TEXT, -1)
    assert not strided.is_contiguous() and expanded.stride(1) == 0
    outs = {}
    for name, kwargs in (("onnxruntime", {"backends": ["onnxruntime"]}), ("aoti", {"backends": ["aoti"]}),
                         ("eager", {})):
        model = WanTransformer.from_pretrained(staged / "w", engines=staged / "engines" if kwargs else None,
                                               **kwargs)
        model.enable_cache(configs()[0])
        with model.cache_context("cond"), torch.no_grad():
            outs[name] = [model(strided, t, expanded).sample, model(strided * 1.001, t, expanded).sample]
        assert model.last_route.backend == name
    for name in ("onnxruntime", "aoti"):
        assert all(relative_error(a, b) < 1e-5 for a, b in zip(outs[name], outs["eager"])), name


def test_stage_engines_serve_other_weights_and_merged_loras(staged, tmp_path):
    """Stage engines take the model's tensors: a fine-tune of the same structure, and LoRAs merged
    into the model (swapped after the engines loaded), run on them with eager's answers on those weights."""
    from .test_lora import make_lora

    init_weights(CONFIG, tmp_path / "other", seed=11)
    lora = make_lora(CONFIG, tmp_path / "lora.safetensors", "diffusers", seed=5)
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=TEXT)

    def cached(model):
        model._reset_stateful_cache()
        with model.cache_context("cond"), torch.no_grad():
            return model(x, t, ctx).sample

    for backend in ("onnxruntime", "aoti"):
        other = WanTransformer.from_pretrained(tmp_path / "other", engines=staged / "engines", backends=[backend])
        other.enable_cache(configs()[0])
        plain = WanTransformer.from_pretrained(tmp_path / "other")
        plain.enable_cache(configs()[0])
        assert relative_error(cached(other), cached(plain)) < 1e-5
        assert other.last_route.backend == backend and "another checkpoint" in other.last_route.reason

        model = WanTransformer.from_pretrained(staged / "w", engines=staged / "engines", backends=[backend])
        model.enable_cache(configs()[0])
        base = cached(model)
        model.set_loras([(lora, 0.8)])
        merged = cached(model)
        eager = WanTransformer.from_pretrained(staged / "w", loras=[(lora, 0.8)])
        eager.enable_cache(configs()[0])
        assert relative_error(merged, base) > 1e-3
        assert relative_error(merged, cached(eager)) < 1e-5
        assert model.last_route.backend == backend and "lora.safetensors" in model.last_route.reason
        model.set_loras([])
        assert relative_error(cached(model), base) < 1e-6


def test_a_damaged_stage_falls_back_with_the_reason_and_the_same_answer(staged, tmp_path):
    import shutil

    from runtime.manifest import read_manifest

    folder = tmp_path / "engines"
    shutil.copytree(staged / "engines", folder)
    manifest = read_manifest(folder)
    victim = next(e for e in manifest.entries.values() if e.backend == "aoti" and e.stage == "other_blocks")
    flip_byte_keep_time(folder / victim.id / "engine.pt2")
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=TEXT)
    outs = []
    for engines in (folder, None):
        model = WanTransformer.from_pretrained(staged / "w", engines=engines, backends=["aoti"])
        model.enable_cache(configs()[1])
        with torch.no_grad():
            outs.append(model(x, t, ctx).sample)
        if engines is not None:
            assert model.last_route.backend == "eager"
            assert victim.id in model.last_route.reason and "sha256" in model.last_route.reason
    assert relative_error(*outs) < 1e-6


def test_verify_reruns_the_parity_of_stage_entries(staged):
    from builder.catalog import verify

    results = verify(staged / "engines", echo=lambda s: None).results
    assert len(results) == 10 and all(r.status == "ok" for r in results), [(r.entry.id, r.detail) for r in results]


def test_a_two_expert_pipeline_on_stage_engines_gives_diffusers_latents(tmp_path):
    """Both experts cached, every transformer call on ONNX Runtime stage engines."""
    from builder.build import build
    from builder.profiles import load_profile
    from runtime import load_engines

    from .test_pipeline import _frames, _pipeline

    config = get_preset("tiny-i2v-a14b")
    init_weights(config, tmp_path / "w", seed=9)
    (tmp_path / "p.yaml").write_text(
        f"name: two\nmodel:\n  experts:\n    high_noise: {tmp_path / 'w' / 'transformer'}\n"
        f"    low_noise: {tmp_path / 'w' / 'transformer_2'}\n    boundary: 0.9\n  preset: tiny-i2v-a14b\n"
        "precision: fp32\nbackends: [onnxruntime]\ncache_stages: true\n"
        "shapes:\n  - {frames: 9, height: 32, width: 32}\ndevice: cpu\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "engines", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"] * 10, "\n".join(report.table())
    Ref = diffusers.WanTransformer3DModel
    refs = [Ref.from_pretrained(tmp_path / "w", subfolder=s).eval() for s in ("transformer", "transformer_2")]
    router = load_engines(tmp_path / "engines")
    cache = hooks.FirstBlockCacheConfig(threshold=0.8)
    for model in refs:
        model.enable_cache(cache)
    router.enable_cache(cache)
    high, low = record_routes(router.high_noise), record_routes(router.low_noise)
    reference = _frames(_pipeline(*refs), config.text_dim, "latent")
    got = _frames(_pipeline(router.high_noise, router.low_noise), config.text_dim, "latent")
    assert router.low_noise.cache_policy.skipped > 0
    routes = high + low
    assert high and low and all(r.backend == "onnxruntime" and "stage engines run" in r.reason for r in routes)
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 1e-5


def test_stage_entries_that_are_not_built_say_why(tmp_path):
    from builder.build.entries import plan_entries
    from builder.profiles import ProfileError, load_profile

    init_weights(CONFIG, tmp_path / "w", seed=3)
    (tmp_path / "p.yaml").write_text(profile_text(tmp_path / "w", "tensorrt, inductor"))
    profile = load_profile(tmp_path / "p.yaml")
    planned = plan_entries(profile, {"main": "0" * 64}, torch.device("cpu"))
    # inductor entries serve cached calls themselves; TensorRT stages are planned like ONNX Runtime's
    assert [(e.backend, e.stage) for e in planned] == [("tensorrt", None), *[("tensorrt", s) for s in STAGES],
                                                        ("inductor", None)]
    from builder.backends import builder
    from runtime.precision import Precision

    assert builder("tensorrt").stage_problem(Precision.FP32) is None  # built where TensorRT is
    assert "fp8" in builder("aoti").stage_problem(Precision.FP8)
    assert builder("onnxruntime").stage_problem(Precision.FP32) is None
    (tmp_path / "bad.yaml").write_text(profile_text(tmp_path / "w", "onnxruntime").replace("cache_stages: true",
                                                                                         "cache_stages: 3"))
    with pytest.raises(ProfileError, match="cache_stages"):
        load_profile(tmp_path / "bad.yaml")


def test_tensorrt_stage_graphs_are_exported_and_checked_without_tensorrt(tmp_path, monkeypatch):
    """Everything a TensorRT stage entry does before TensorRT: each stage's ONNX (opset 23, named
    weights in the whole model's weights file) passes the graph check with its own attention count.
    The plans themselves need TensorRT (not here)."""
    import json

    import builder.backends.tensorrt as trt_builder
    from builder.build import build
    from builder.profiles import load_profile

    init_weights(CONFIG, tmp_path / "w", seed=3)
    monkeypatch.setattr(trt_builder.TensorRTBuilder, "unavailable", lambda self, precision, device: None)

    def graph_only(self, job):
        _, reference = trt_builder.prepare_tensorrt_onnx(job)
        return reference, reference  # what a perfect plan returns: the parity gate is not under test
    monkeypatch.setattr(trt_builder.TensorRTBuilder, "build", graph_only)
    (tmp_path / "p.yaml").write_text(profile_text(tmp_path / "w", "tensorrt"))
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "engines", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"] * 5, "\n".join(report.table())
    entries = json.loads((tmp_path / "engines" / "manifest.json").read_text())["entries"].values()
    attention = {e["stage"]: e["build"]["onnx_check"]["attention"] for e in entries}
    per_block = 2  # self- and cross-attention (text only)
    assert attention == {None: per_block * CONFIG.num_layers, "prologue": 0, "first_block": per_block,
                         "other_blocks": per_block * (CONFIG.num_layers - 1), "epilogue": 0}
    assert len({e["files"]["model.onnx.data"]["sha256"] for e in entries}) == 1  # one weights file for all
