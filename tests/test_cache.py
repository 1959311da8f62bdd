"""Step caching through the front, against diffusers' own hooks on `WanTransformer3DModel` with the
same config: the same outputs step by step (so the same skip decisions), per cache context, reset
as diffusers resets; and a real diffusers pipeline with both experts cached."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from builder.init_weights import init_weights
from runtime import WanTransformer, get_preset
from runtime.errors import InputError

from .conftest import make_inputs, relative_error

diffusers = pytest.importorskip("diffusers")
hooks = pytest.importorskip("diffusers.hooks")

CONFIG = get_preset("tiny-t2v").replace(num_layers=4)
STEPS = 10
TEXT = 16


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    init_weights(CONFIG, root, seed=3)
    return root


def denoise(model, config=None, steps=STEPS, contexts=("cond", "uncond")):
    """A denoising loop as a pipeline runs it: slowly changing latents, falling timesteps, cond and
    uncond calls in their cache contexts, the cache reset at the end. Returns every call's output
    and, for our front, which calls skipped blocks."""
    if config is not None:
        model.enable_cache(config)
    x, _, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=TEXT)
    g = torch.Generator().manual_seed(1)
    noise, negative = torch.randn(x.shape, generator=g), torch.randn(ctx.shape, generator=g)
    outs, skipped = [], []
    for i in range(steps):
        for name, text in zip(contexts, (ctx, negative)):
            with model.cache_context(name), torch.no_grad():
                outs.append(model(x + 0.05 * i * noise, torch.tensor([1000.0 - 90 * i]), text).sample)
            step = getattr(model, "last_step", None)
            skipped.append(step is not None and not step.computed)
    model._reset_stateful_cache()
    if config is not None:
        model.disable_cache()
    return outs, skipped


def record_routes(model) -> list:
    """The `last_route` of every call `model` serves from now on (appended to the returned list)."""
    routes, real = [], model.run

    def run(shape, inputs):
        out = real(shape, inputs)
        routes.append(model.last_route)
        return out
    model.run = run
    return routes


def configs():
    return [hooks.FirstBlockCacheConfig(threshold=0.6),
            hooks.MagCacheConfig(threshold=0.06, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=STEPS,
                                 mag_ratios=[1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0])]  # interpolated to STEPS


@pytest.mark.parametrize("index", [0, 1], ids=["first-block-cache", "mag-cache"])
def test_the_same_steps_are_skipped_as_by_diffusers_hooks(weights, index):
    ref = diffusers.WanTransformer3DModel.from_pretrained(weights).eval()
    ours = WanTransformer.from_pretrained(weights)
    uncached, _ = denoise(ours)
    expected, _ = denoise(ref, configs()[index])
    got, skipped = denoise(ours, configs()[index])
    assert 0 < sum(skipped) < len(skipped)  # the policy did skip, and not everything
    for i, (a, b, u) in enumerate(zip(got, expected, uncached)):
        assert relative_error(a, b) < 1e-5, i
        if skipped[i]:
            assert relative_error(a, u) > 1e-3, i  # a skipped call really reused a residual
    # run again: the reset at the end of the loop gives the same decisions from a fresh state
    again, skipped_again = denoise(ours, configs()[index])
    assert skipped_again == skipped and all(torch.equal(a, b) for a, b in zip(again, got))


def test_each_context_keeps_its_own_state(weights):
    """cond and uncond calls in one context would share a residual: the outputs differ from
    separate contexts, and diffusers agrees on both."""
    ref = diffusers.WanTransformer3DModel.from_pretrained(weights).eval()
    ours = WanTransformer.from_pretrained(weights)
    shared, _ = denoise(ours, configs()[0], contexts=("one", "one"))
    separate, _ = denoise(ours, configs()[0])
    assert max(relative_error(a, b) for a, b in zip(shared, separate)) > 1e-3
    for got, contexts in ((shared, ("one", "one")), (separate, ("cond", "uncond"))):
        expected, _ = denoise(ref, configs()[0], contexts=contexts)
        assert max(relative_error(a, b) for a, b in zip(got, expected)) < 1e-5


def ratios(printed: str) -> list[list[float]]:
    """The ratio lists a calibration run printed (one line per context)."""
    return [[float(v) for v in line.strip("[]").split(",")] for line in printed.splitlines()
            if re.fullmatch(r"\[[-+0-9.e, ]+\]", line.strip())]


def test_mag_cache_calibration_gives_diffusers_ratios(weights, capsys):
    ref = diffusers.WanTransformer3DModel.from_pretrained(weights).eval()
    ours = WanTransformer.from_pretrained(weights)
    config = hooks.MagCacheConfig(calibrate=True, num_inference_steps=STEPS)
    denoise(ref, config)
    printed = ratios(capsys.readouterr().out)
    ours.enable_cache(config)
    _, skipped = denoise(ours)
    assert not any(skipped) and ours.cache_policy.calls == 2 * STEPS
    mine = ratios(capsys.readouterr().out)
    kept = ours.cache_policy.calibration
    assert len(printed) == 2 and mine == [kept["cond"], kept["uncond"]] and len(kept["cond"]) == STEPS
    for a, b in zip(mine, printed):  # cond's run ends first, then uncond's
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)


def test_what_the_front_refuses(weights):
    ours = WanTransformer.from_pretrained(weights)
    with pytest.raises(InputError, match="supported: FirstBlockCacheConfig, MagCacheConfig"):
        ours.enable_cache(hooks.PyramidAttentionBroadcastConfig())
    with pytest.raises(InputError, match="MagCacheConfig needs mag_ratios"):
        ours.enable_cache(type("MagCacheConfig", (), {"threshold": 0.1, "max_skip_steps": 2, "retention_ratio": 0.2,
                                                      "num_inference_steps": 4, "mag_ratios": None,
                                                      "calibrate": False})())
    ours.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(InputError, match="enabled already"):
        ours.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.1))
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=TEXT)
    with pytest.raises(InputError, match="cache_context"), torch.no_grad():
        ours(x, t, ctx)  # First-Block-Cache keeps its state per context, as in diffusers
    ours.disable_cache()
    ours.enable_cache(configs()[1])
    with torch.no_grad():
        ours(x, t, ctx)  # MagCache: the "inference" context outside any
    assert "MagCache" in ours.last_route.reason and "ran blocks 0-3" in ours.last_route.reason


@pytest.mark.slow
def test_a_two_expert_pipeline_gives_diffusers_latents_with_both_experts_cached(tmp_path):
    from .test_pipeline import _frames, _pipeline

    config = get_preset("tiny-i2v-a14b")
    init_weights(config, tmp_path, seed=9)
    Ref = diffusers.WanTransformer3DModel
    refs = [Ref.from_pretrained(tmp_path, subfolder=s).eval() for s in ("transformer", "transformer_2")]
    ours = [WanTransformer.from_pretrained(tmp_path, subfolder=s) for s in ("transformer", "transformer_2")]
    cache = hooks.FirstBlockCacheConfig(threshold=0.8)  # skips 3 of the low-noise expert's 6 calls here
    uncached = _frames(_pipeline(*ours), config.text_dim, "latent")
    for model in refs + ours:
        model.enable_cache(cache)
    reference = _frames(_pipeline(*refs), config.text_dim, "latent")
    got = _frames(_pipeline(*ours), config.text_dim, "latent")
    skipped = sum(m.cache_policy.skipped for m in ours)
    assert skipped > 0, [m.cache_policy.calls for m in ours]
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 1e-5
    assert np.linalg.norm(got - uncached) / np.linalg.norm(uncached) > 1e-4  # the skipping changed the result
    assert re.search(r"FirstBlockCache in context (cond|uncond)", ours[1].last_route.reason)


def test_cached_calls_run_on_an_inductor_engine_and_others_say_why_not(weights, tmp_path):
    """An `inductor` entry runs its blocks apart (each through the compiled block), so it serves
    step-cached calls: the same outputs as diffusers' hooks, every call on the engine. An ONNX
    Runtime entry computes whole forwards: cached calls run the static model and say so."""
    from builder.build import build
    from builder.profiles import load_profile

    (tmp_path / "p.yaml").write_text(f"name: c\nmodel: {{weights: {weights}}}\nprecision: fp32\n"
                                     "backends: [inductor, onnxruntime]\nshapes:\n  - {frames: 5, height: 32, width: 48}\n"
                                     f"text_tokens: {TEXT}\ndevice: cpu\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "engines", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built", "built"], report.table()
    expected, _ = denoise(diffusers.WanTransformer3DModel.from_pretrained(weights).eval(), configs()[0])
    ours = WanTransformer.from_pretrained(weights, engines=tmp_path / "engines", backends=["inductor"])
    ours.enable_cache(configs()[0])
    routes = record_routes(ours)
    got, skipped = denoise(ours)
    assert 0 < sum(skipped) < len(skipped)
    assert all(r.backend == "inductor" and "through the engine's compiled block" in r.reason for r in routes)
    assert max(relative_error(a, b) for a, b in zip(got, expected)) < 1e-5
    other = WanTransformer.from_pretrained(weights, engines=tmp_path / "engines", backends=["onnxruntime"])
    got, _ = denoise(other, configs()[0])
    assert other.last_route.backend == "eager" and "runs whole forwards only" in other.last_route.reason
    assert not other.engines.load_attempts  # a whole-forward engine is not even loaded for cached calls
    assert max(relative_error(a, b) for a, b in zip(got, expected)) < 1e-5

    # what callers pass: a transposed latent view and an expanded text context, on the engine and eager
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=TEXT)
    strided = x.transpose(3, 4).contiguous().transpose(3, 4)
    expanded = ctx[:, :1].expand(-1, TEXT, -1)
    assert not strided.is_contiguous() and expanded.stride(1) == 0
    plain = WanTransformer.from_pretrained(weights)
    outs = []
    for model in (ours, plain):
        model._reset_stateful_cache()
        if not model.is_cache_enabled:
            model.enable_cache(configs()[0])
        with model.cache_context("cond"), torch.no_grad():
            outs.append([model(strided, t, expanded).sample, model(strided + 1e-3, t, expanded).sample])
    assert ours.last_route.backend == "inductor" and plain.last_route.backend == "eager"
    assert ours.last_step.computed == plain.last_step.computed
    assert all(relative_error(a, b) < 1e-5 for a, b in zip(*outs))


def test_the_two_expert_router_caches_each_expert_apart(weights):
    from runtime.experts import WanExpertRouter

    router = WanExpertRouter(WanTransformer.from_pretrained(weights), WanTransformer.from_pretrained(weights), 0.5)
    with pytest.raises(InputError, match="supported"):
        router.enable_cache(object())
    assert not router.is_cache_enabled and not router.high_noise.is_cache_enabled
    router.enable_cache(configs()[0])
    assert router.high_noise.cache_policy is not router.low_noise.cache_policy
    x, _, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=TEXT)
    with router.cache_context("cond"), torch.no_grad():
        for t in (900.0, 800.0, 100.0):
            router(x, torch.tensor([t]), ctx)
    assert (router.high_noise.cache_policy.calls, router.low_noise.cache_policy.calls) == (2, 1)
    assert set(router.high_noise.cache_policy.states) == {"cond"}
    router._reset_stateful_cache()
    assert not router.high_noise.cache_policy.states and not router.low_noise.cache_policy.states
    router.disable_cache()
    assert not router.is_cache_enabled
