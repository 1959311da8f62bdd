"""The static and dynamic transformer against diffusers' WanTransformer3DModel, fp32, CPU."""

from __future__ import annotations

import pytest
import torch

from runtime import StaticShape, StaticWanTransformer, WanTransformer, get_preset

from .conftest import STRUCTURAL_PRESETS, make_inputs, reference_model, relative_error

FP32_TOLERANCE = 1e-5
# Non-square patch grids (3 x 3 x 5 and 2 x 5 x 2), batch 2 (a CFG pair in one call).
LATENTS = [(3, 6, 10), (2, 10, 4)]


@pytest.mark.parametrize("latent", LATENTS, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("preset", STRUCTURAL_PRESETS)
def test_front_matches_diffusers(checkpoints, preset, latent):
    config = get_preset(preset)
    ours = WanTransformer.from_pretrained(checkpoints[preset])
    ref = reference_model(checkpoints[preset])
    x, t, ctx, image = make_inputs(config, 2, latent, seed=1, per_token=config.per_token_timesteps)
    with torch.no_grad():
        out = ours(x, t, ctx, image).sample
        expected = ref(x, t, ctx, image).sample
    assert relative_error(out, expected) < FP32_TOLERANCE
    assert ours.last_route.backend == "eager"
    assert ours.last_route.shape.batch == 2


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-ti2v"])
def test_scalar_and_per_token_timesteps(checkpoints, preset):
    """A scalar t, a [B] t and an all-equal [B, L] t are the same function; [B, L] with the first
    frame at 0 (TI2V image-to-video) matches diffusers too."""
    config = get_preset(preset)
    ours = WanTransformer.from_pretrained(checkpoints[preset])
    ref = reference_model(checkpoints[preset])
    x, _, ctx, _ = make_inputs(config, 2, (3, 6, 10), seed=2)
    tokens = 3 * 3 * 5
    with torch.no_grad():
        scalar = ours(x, torch.tensor(500.0), ctx).sample
        per_sample = ours(x, torch.tensor([500.0, 500.0]), ctx).sample
        per_token = ours(x, torch.full((2, tokens), 500.0), ctx).sample
        assert ours.last_route.shape.per_token_timesteps
        t = torch.full((2, tokens), 700.0)
        t[:, :15] = 0
        mixed, expected = ours(x, t, ctx).sample, ref(x, t, ctx).sample
    assert relative_error(scalar, per_sample) == 0.0
    assert relative_error(per_token, per_sample) < FP32_TOLERANCE
    assert relative_error(mixed, expected) < FP32_TOLERANCE
    assert relative_error(mixed, per_sample) > 1e-3  # per-token t really changes the output


def test_static_model_alone(checkpoints):
    """StaticWanTransformer built around the front's tensors shares their storage and computes what
    diffusers computes on its own inputs, fp32. Guards against `from_parameters` copying the weights
    (memory per shape) or loading them under the wrong names, its tables (RoPE, timestep
    frequencies) being wrong, and `example_inputs` not matching `input_specs`."""
    config = get_preset("tiny-i2v")
    front = WanTransformer.from_pretrained(checkpoints["tiny-i2v"])
    shape = StaticShape(2, 3, 6, 10, 512, 257, False)
    static = StaticWanTransformer.from_parameters(config, shape, dict(front.named_parameters()))
    assert type(static).__name__ == "StaticWanImageTransformer"
    assert static.input_names[-1] == "encoder_hidden_states_image"
    for name, p in static.named_parameters():  # every parameter shared, none copied
        assert p.data_ptr() == front.get_parameter(name).data_ptr(), name
    inputs = static.example_inputs(seed=3)
    assert [tuple(i.shape) for i in inputs] == [s.shape for s in static.input_specs()]
    assert [i.dtype for i in inputs] == [s.dtype for s in static.input_specs()]
    ref = reference_model(checkpoints["tiny-i2v"])
    with torch.no_grad():
        out = static(*inputs)
        expected = ref(*inputs).sample
    assert out.shape == static.output_spec().shape
    assert relative_error(out, expected) < FP32_TOLERANCE


def test_cache_is_bounded_and_reports_route(checkpoints):
    config = get_preset("tiny-t2v")
    model = WanTransformer.from_pretrained(checkpoints["tiny-t2v"], max_cached_shapes=2)
    with torch.no_grad():
        for latent in [(1, 2, 2), (1, 2, 4), (1, 4, 2), (1, 2, 2)]:
            x, t, ctx, _ = make_inputs(config, 1, latent, text_tokens=16)
            model(x, t, ctx)
    assert len(model._eager) == 2
    assert "built" in model.last_route.reason  # (1, 2, 2) was evicted, so it was rebuilt
    with torch.no_grad():
        model(x, t, ctx)
    assert "cached" in model.last_route.reason
    model.to(torch.float64)  # moving or casting drops the static models built on the old tensors
    assert len(model._eager) == 0
