"""The dynamic front accepts what diffusers accepts and names what it rejects."""

from __future__ import annotations

import pytest
import torch

from runtime import WanTransformer, get_preset
from runtime.errors import InputError, WanBuildError

from .conftest import make_inputs


@pytest.fixture(scope="module")
def i2v(checkpoints):
    return WanTransformer.from_pretrained(checkpoints["tiny-i2v"])


@pytest.fixture(scope="module")
def t2v(checkpoints):
    return WanTransformer.from_pretrained(checkpoints["tiny-t2v"])


def test_exposes_what_pipelines_read(i2v):
    assert i2v.config.patch_size == [1, 2, 2] and i2v.config["in_channels"] == 36
    assert i2v.config.image_dim == 24
    assert i2v.dtype == torch.float32 and i2v.device.type == "cpu"
    with i2v.cache_context("cond"):
        assert i2v._cache_context == "cond"
    assert i2v._cache_context is None


def test_return_forms(t2v):
    x, t, ctx, _ = make_inputs(get_preset("tiny-t2v"), 1, (1, 2, 2), text_tokens=8)
    with torch.no_grad():
        out = t2v(x, t, ctx)
        tup = t2v(x, t, ctx, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1
    assert torch.equal(out.sample, tup[0]) and torch.equal(out[0], out["sample"])


def test_inputs_are_cast_to_the_model(t2v):
    x, t, ctx, _ = make_inputs(get_preset("tiny-t2v"), 1, (1, 2, 2), text_tokens=8)
    with torch.no_grad():
        a = t2v(x.double(), t.long(), ctx.half()).sample
        b = t2v(x.double().float(), t.long().float(), ctx.half().float()).sample
    assert a.dtype == torch.float32 and torch.equal(a, b)


def _bad_calls():
    c = get_preset("tiny-i2v")
    x, t, ctx, img = make_inputs(c, 2, (2, 4, 6))
    return [
        ("rank", dict(hidden_states=x[0]), "hidden_states must be 5-D"),
        ("channels", dict(hidden_states=x[:, :16]), "16 channels; tiny-i2v takes 36"),
        ("odd latent", dict(hidden_states=x[..., :5]), "latent size 2x4x5"),
        ("context width", dict(encoder_hidden_states=ctx[..., :16]), "wants \\[2, tokens, 32\\]"),
        ("batch", dict(encoder_hidden_states=ctx[:1]), "batch 2 as in hidden_states"),
        ("timestep shape", dict(timestep=torch.ones(3)), "timestep has shape \\[3\\]"),
        ("per-token length", dict(timestep=torch.ones(2, 7)), "12 tokens at this latent size"),
        ("missing image", dict(encoder_hidden_states_image=None), "needs encoder_hidden_states_image"),
        ("image width", dict(encoder_hidden_states_image=img[..., :5]), "wants \\[2, tokens, 24\\]"),
        ("text tokens", dict(encoder_hidden_states=ctx[:, :100]), "exactly 512 text tokens"),
        ("not a tensor", dict(hidden_states=[1, 2]), "must be a torch.Tensor"),
        ("integer latents", dict(hidden_states=x.long()), "floating-point"),
    ], (x, t, ctx, img)


@pytest.mark.parametrize("label", [label for label, _, _ in _bad_calls()[0]])
def test_bad_inputs_name_the_input_and_rule(i2v, label):
    calls, (x, t, ctx, img) = _bad_calls()
    override, match = next((o, m) for lbl, o, m in calls if lbl == label)
    kwargs = dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img)
    kwargs.update(override)
    with pytest.raises(InputError, match=match):
        i2v(**kwargs)
    assert issubclass(InputError, WanBuildError)


def test_image_tokens_rejected_by_text_only_model(t2v):
    x, t, ctx, _ = make_inputs(get_preset("tiny-t2v"), 1, (1, 2, 2), text_tokens=8)
    with pytest.raises(InputError, match="takes no encoder_hidden_states_image"):
        t2v(x, t, ctx, torch.randn(1, 257, 24))


def test_flf2v_takes_pipeline_layout(checkpoints):
    model = WanTransformer.from_pretrained(checkpoints["tiny-flf2v"])
    x, t, ctx, img = make_inputs(get_preset("tiny-flf2v"), 2, (1, 2, 2))
    assert img.shape == (4, 257, 24)
    with torch.no_grad():
        a = model(x, t, ctx, img).sample
        b = model(x, t, ctx, img.reshape(2, 514, 24)).sample
    assert torch.equal(a, b)
    with pytest.raises(InputError, match="needs 514 image tokens"):
        model(x, t, ctx, img[:2])
