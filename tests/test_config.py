"""Presets, config conversions and geometry against the model card's numbers."""

from __future__ import annotations

import pytest

from builder.planning.plan import forward_flops, parameter_count, plan
from runtime.config import PRESETS, WanConfig, get_preset, latent_size
from runtime.errors import ConfigError, GeometryError

# wan-architecture.md section 8: exact parameter counts.
PARAMETERS = {
    "wan2.1-t2v-1.3b": 1_418_996_800, "wan2.1-t2v-14b": 14_288_491_584, "wan2.1-i2v-14b": 16_394_878_784,
    "wan2.1-flf2v-14b": 16_395_536_704, "wan2.2-t2v-a14b": 14_288_491_584, "wan2.2-i2v-a14b": 14_288_901_184,
    "wan2.2-ti2v-5b": 4_999_787_712,
}
# Section 9: FLOPs per forward (batch 1), to the card's 4 significant digits.
FLOPS = [
    ("wan2.1-t2v-14b", (81, 480, 832), 1.678e15), ("wan2.1-t2v-14b", (81, 720, 1280), 6.523e15),
    ("wan2.1-i2v-14b", (81, 480, 832), 1.686e15), ("wan2.1-i2v-14b", (81, 720, 1280), 6.541e15),
    ("wan2.2-ti2v-5b", (121, 704, 1280), 5.21e14), ("wan2.1-t2v-1.3b", (81, 480, 832), 2.83e14),
]


@pytest.mark.parametrize("name", PARAMETERS)
def test_parameter_counts_match_the_model_card(name):
    assert parameter_count(get_preset(name)) == PARAMETERS[name]


@pytest.mark.parametrize("name,video,expected", FLOPS)
def test_flops_match_the_model_card(name, video, expected):
    p = plan(get_preset(name), *video)
    assert p.flops.total == pytest.approx(expected, rel=1e-3)


def test_geometry_of_the_standard_cases():
    cases = [("wan2.2-i2v-a14b", (81, 480, 832), (21, 60, 104), 32_760),
             ("wan2.2-t2v-a14b", (81, 720, 1280), (21, 90, 160), 75_600),
             ("wan2.2-ti2v-5b", (121, 704, 1280), (31, 44, 80), 27_280)]
    for name, video, latent, tokens in cases:
        size = latent_size(get_preset(name), *video)
        assert (size.frames, size.height, size.width) == latent
        assert size.tokens(get_preset(name)) == tokens
    # Self-attention dominates at 720p (72% of FLOPs, section 9).
    p = plan(get_preset("wan2.1-t2v-14b"), 81, 720, 1280)
    assert p.flops.self_attention / p.flops.total == pytest.approx(0.718, abs=2e-3)


@pytest.mark.parametrize("preset,video,match", [
    ("wan2.2-i2v-a14b", (80, 480, 832), "frames=80 is not 4k\\+1.*nearest valid: 77 or 81"),
    ("wan2.2-i2v-a14b", (81, 470, 832), "height=470 is not a multiple of 16.*464 or 480"),
    ("wan2.2-ti2v-5b", (121, 720, 1280), "height=720 is not a multiple of 32.*704 or 736"),
    ("wan2.2-i2v-a14b", (81, 480, 8), "width=8 is not a multiple of 16.*nearest valid: 16$"),
    ("wan2.2-i2v-a14b", (0, 480, 832), "frames=0 .*nearest valid: 1$"),
    ("wan2.2-i2v-a14b", (81, 480, 16400), "over the RoPE table's 1024"),
])
def test_invalid_geometry_names_rule_and_nearest(preset, video, match):
    with pytest.raises(GeometryError, match=match):
        latent_size(get_preset(preset), *video)


def test_diffusers_config_round_trip():
    for name, config in PRESETS.items():
        back = WanConfig.from_diffusers(config.to_diffusers(), name=name)
        assert back.same_structure(config), name


def test_original_config_conversion():
    raw = {"_class_name": "WanModel", "model_type": "flf2v", "dim": 5120, "ffn_dim": 13824, "freq_dim": 256,
           "in_dim": 36, "out_dim": 16, "num_heads": 40, "num_layers": 40, "eps": 1e-6, "text_len": 512}
    assert WanConfig.from_original(raw, image_dim=1280).same_structure(get_preset("wan2.1-flf2v-14b"))
    # "i2v" without img_emb weights is Wan2.2 I2V (no CLIP tokens).
    raw.update(model_type="i2v")
    assert WanConfig.from_original(raw, image_dim=None).same_structure(get_preset("wan2.2-i2v-a14b"))
    raw.update(model_type="ti2v", dim=3072, num_heads=24, num_layers=30, ffn_dim=14336, in_dim=48, out_dim=48)
    ti2v = WanConfig.from_original(raw, image_dim=None)
    assert ti2v.same_structure(get_preset("wan2.2-ti2v-5b")) and ti2v.vae_spatial_stride == 16
    with pytest.raises(ConfigError, match="model_type 'vace' is not supported"):
        WanConfig.from_original({**raw, "model_type": "vace"}, image_dim=None)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean wan2.2-i2v-a14b"):
        get_preset("wan2.2-i2v-14b")


def test_inconsistent_config_is_refused():
    with pytest.raises(ConfigError, match="image_dim and image_tokens"):
        get_preset("tiny-t2v").replace(image_dim=24)
    with pytest.raises(ConfigError, match="boundary"):
        get_preset("tiny-t2v").replace(experts=2)


def test_flops_scale_with_batch():
    from runtime import StaticShape

    c = get_preset("wan2.1-t2v-14b")
    one = forward_flops(c, StaticShape(1, 21, 60, 104))
    two = forward_flops(c, StaticShape(2, 21, 60, 104))
    assert two.total == pytest.approx(2 * one.total)
