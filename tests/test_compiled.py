"""The compiled route (`compile=True`): torch.compile per block, regional, never failing a call."""

from __future__ import annotations

import logging

import pytest
import torch

import runtime.compiled as compiled
from builder.init_weights import init_weights
from runtime import WanTransformer, get_preset

from .conftest import make_inputs, reference_model, relative_error

CONFIG = get_preset("tiny-t2v")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    init_weights(CONFIG, root / "w", seed=5)
    return root / "w"


@pytest.mark.slow
def test_compiled_route_matches_diffusers_and_says_so(weights):
    model = WanTransformer.from_pretrained(weights, compile=True)
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=8)
    with torch.no_grad():
        out = model(x, t, ctx).sample
        assert model.last_route.backend == "compiled" and "one block's code serves all 2 blocks" in \
            model.last_route.reason
        again = model(x, t, ctx).sample
        ref = reference_model(weights)(x, t, ctx).sample
    assert relative_error(out, ref) < 1e-5 and relative_error(again, ref) < 1e-5
    assert all(b._compiled_call_impl is not None for b in model._eager[model.last_route.shape].blocks)


def test_a_compile_failure_falls_back_to_eager_with_a_warning(weights, monkeypatch, caplog):
    """Guards a compile error escaping into the caller's forward (the route must never crash)."""
    def failing_backend(gm, example_inputs):
        raise RuntimeError("simulated compiler crash")
    monkeypatch.setattr(compiled, "COMPILE_OPTIONS", {"fullgraph": True, "backend": failing_backend})
    model = WanTransformer.from_pretrained(weights, compile=True)
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=8)
    with caplog.at_level(logging.WARNING, logger="wan_build.runtime"), torch.no_grad():
        out = model(x, t, ctx).sample
        assert model.last_route.backend == "eager" and "torch.compile failed" in model.last_route.reason
        assert "simulated compiler crash" in model.last_route.reason
        model(x, t, ctx)
        assert model.last_route.backend == "eager"
        ref = WanTransformer.from_pretrained(weights)(x, t, ctx).sample
    assert caplog.text.count("torch.compile failed") == 1
    assert relative_error(out, ref) < 1e-6
