"""The dynamic front accepts what diffusers accepts and names what it rejects."""

from __future__ import annotations

import pytest
import torch

from runtime import WanTransformer, get_preset
from runtime.errors import InputError, WanBuildError

from .conftest import make_inputs, reference_model, relative_error


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


# -- every timestep form, against diffusers ---------------------------------------------------------
TOKENS = 3 * 3 * 5  # latent 3 x 6 x 10, patches 1 x 2 x 2


def _timestep_forms():
    """name -> (timestep as passed to our front, the same timestep as diffusers takes it). diffusers'
    WanTransformer3DModel (0.42.1) takes 1-D [1] and [B] and 2-D [B, L] and [1, L] tensors of any
    real dtype; it refuses a Python number and a 0-d tensor (`timestep.ndim` / "Timesteps should be
    a 1d-array"), which our front also takes: for those the reference is diffusers with the value as [B]."""
    g = torch.Generator().manual_seed(5)
    per_token = torch.rand(2, TOKENS, generator=g) * 1000
    per_token[:, :15] = 0  # TI2V: the first latent frame at t = 0
    one_row = torch.rand(1, TOKENS, generator=g) * 1000
    pair = torch.tensor([731.0, 212.5])
    return {
        "python float": (612.5, torch.tensor([612.5, 612.5])),
        "python int": (612, torch.tensor([612, 612])),
        "0-d tensor": (torch.tensor(612.5), torch.tensor([612.5, 612.5])),
        "0-d int tensor": (torch.tensor(612), torch.tensor([612, 612])),
        "[1]": (torch.tensor([612.5]),) * 2,
        "[B]": (pair,) * 2,
        "[B] int64": (torch.tensor([731, 212]),) * 2,
        "[B] int32": (torch.tensor([731, 212], dtype=torch.int32),) * 2,
        "[B] uint8": (torch.tensor([231, 12], dtype=torch.uint8),) * 2,
        "[B] float64": (pair.double() + 0.25,) * 2,
        "[B] float16": (pair.half(),) * 2,
        "[B] bfloat16": (pair.bfloat16(),) * 2,
        "[B, L]": (per_token,) * 2,
        "[B, L] int64": (per_token.long(),) * 2,
        "[1, L] with B = 2": (one_row,) * 2,
        "[1, L] int32 with B = 2": (one_row.int(),) * 2,
    }


@pytest.fixture(scope="module")
def timestep_models(checkpoints):
    return {p: (WanTransformer.from_pretrained(checkpoints[p]), reference_model(checkpoints[p]))
            for p in ("tiny-t2v", "tiny-ti2v")}


@pytest.mark.parametrize("form", list(_timestep_forms()))
@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-ti2v"])
def test_every_timestep_form_matches_diffusers(timestep_models, preset, form):
    """Each timestep form diffusers accepts (and the scalars our front adds) gives diffusers' output
    on the same inputs, fp32, relative error < 1e-5 (measured 2.4e-7 .. 3.2e-7), for a per-sample
    preset and the per-token one (TI2V-5B's pipeline passes [B, L]). Guards against `_timestep`
    refusing a form diffusers takes ([1, L] with batch 2, integer dtypes), expanding [1] or [1, L]
    to the wrong batch, or rounding a timestep through a low-precision dtype."""
    ours, ref = timestep_models[preset]
    config = get_preset(preset)
    x, _, ctx, _ = make_inputs(config, 2, (3, 6, 10), seed=3, text_tokens=16)
    ours_t, ref_t = _timestep_forms()[form]
    with torch.no_grad():
        out = ours(x, ours_t, ctx).sample
        expected = ref(x, ref_t, ctx).sample
    assert relative_error(out, expected) < 1e-5
    assert ours.last_route.shape.per_token_timesteps == form.startswith(("[B, L]", "[1, L]"))


def test_timestep_forms_are_not_all_alike(timestep_models):
    """The forms above differ where they should: per sample vs per token and sample 0 vs 1 (so the
    comparisons really test the layout, not one value broadcast everywhere)."""
    ours, _ = timestep_models["tiny-t2v"]
    x, _, ctx, _ = make_inputs(get_preset("tiny-t2v"), 2, (3, 6, 10), seed=3, text_tokens=16)
    forms = _timestep_forms()
    with torch.no_grad():
        row = ours(x, forms["[1, L] with B = 2"][0], ctx).sample
        pair = ours(x, forms["[B]"][0], ctx).sample
    assert relative_error(row, pair) > 1e-2
    assert relative_error(pair[0], pair[1]) > 1e-2


@pytest.mark.parametrize("shape", [(2, 1), (1, 1)])
def test_b_by_1_timesteps_like_diffusers(timestep_models, shape):
    """diffusers takes a [B, 1] or [1, 1] timestep (seq_len 1 broadcasts over the tokens); the front
    accepts what diffusers accepts (guards refusing them again)."""
    ours, ref = timestep_models["tiny-t2v"]
    x, _, ctx, _ = make_inputs(get_preset("tiny-t2v"), 2, (3, 6, 10), seed=3, text_tokens=16)
    t = torch.tensor([[731.0], [212.5]])[: shape[0]]
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        out = ours(x, t, ctx).sample
    assert relative_error(out, expected) < 1e-5
