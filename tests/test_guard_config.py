"""Config and geometry rules, the expert boundary and call capture, where a planted bug slipped past
the suite: frame counts that are neither 4k nor 4k+1, sizes of zero, added K/V widths, boundaries at
the ends of (0, 1), t exactly at the boundary, and which calls a capture keeps. Each test names the
bug it guards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from runtime.config import WanConfig, get_preset, latent_size
from runtime.errors import ConfigError, GeometryError, InputError


@pytest.mark.parametrize("frames", [2, 3, 4, 78, 79, 80, 82, 83])
def test_every_frame_count_off_the_4k_plus_1_lattice_is_refused(frames):
    """Guards the frame rule weakened to "not a multiple of 4" (`video_frames % 4 == 0`): 82 or 83
    frames are not 4k+1 either, and the VAE cannot take them."""
    with pytest.raises(GeometryError, match=f"frames={frames} is not 4k\\+1"):
        latent_size(get_preset("wan2.2-i2v-a14b"), frames, 480, 832)


@pytest.mark.parametrize("frames,latent", [(1, 1), (5, 2), (81, 21), (85, 22)])
def test_frame_counts_on_the_lattice_are_taken(frames, latent):
    assert latent_size(get_preset("wan2.2-i2v-a14b"), frames, 480, 832).frames == latent


def test_added_kv_width_must_be_the_model_dim():
    """Guards a removed check of `added_kv_proj_dim` in a diffusers config: the image K/V projection
    of an I2V model maps to the model dim; any other width is a config for another model."""
    raw = get_preset("wan2.1-i2v-14b").to_diffusers()
    assert WanConfig.from_diffusers(raw).image_dim == 1280
    assert WanConfig.from_diffusers({**raw, "added_kv_proj_dim": None}).image_dim == 1280
    with pytest.raises(ConfigError, match="added_kv_proj_dim=4096 must equal the model dim 5120"):
        WanConfig.from_diffusers({**raw, "added_kv_proj_dim": 4096})


@pytest.mark.parametrize("key", ["num_layers", "num_attention_heads", "ffn_dim", "in_channels"])
def test_a_size_of_zero_is_refused(key):
    """Guards the size rule loosened to accept 0 (`0 <= value`): a config with zero layers, heads or
    channels is a mistake named by its key."""
    raw = get_preset("tiny-t2v").to_diffusers()
    with pytest.raises(ConfigError, match=f"{key} must be a positive whole number, got 0"):
        WanConfig.from_diffusers({**raw, key: 0})
    with pytest.raises(ConfigError, match=f"{key} must be a positive whole number, got {1 << 20 | 1}"):
        WanConfig.from_diffusers({**raw, key: 1 << 20 | 1})


@pytest.mark.parametrize("boundary", [0.0, 1.0, 1.5, -0.1])
def test_a_two_expert_boundary_must_lie_strictly_inside_0_1(boundary):
    """Guards the boundary range loosened at either end (`<= 1.0`): at 1.0 the high-noise expert would
    never run (t < 1000 always), at 0.0 the low-noise one never would."""
    with pytest.raises(ConfigError, match=f"boundary must lie in \\(0, 1\\) \\(got {boundary}\\)"):
        get_preset("tiny-i2v-a14b").replace(boundary=boundary)
    assert get_preset("tiny-i2v-a14b").replace(boundary=0.999).boundary == 0.999


def test_the_expert_boundary_itself_belongs_to_the_high_noise_expert():
    """Guards `t >= boundary * 1000` turned into `>` in the router (diffusers' Wan2.2 pipelines give
    t == boundary * 1000 to the high-noise transformer)."""
    from runtime.experts import WanExpertRouter

    router = WanExpertRouter(nn.Identity(), nn.Identity(), 0.875)
    assert router.expert_for(torch.tensor([875.0])) == "high_noise"
    assert router.expert_for(875) == "high_noise"
    assert router.expert_for(torch.tensor([874.9])) == "low_noise"
    assert router.expert_for(torch.tensor([[875.0, 900.0]])) == "high_noise"
    with pytest.raises(InputError, match="both sides of the expert boundary"):
        router.expert_for(torch.tensor([875.0, 874.0]))


def test_calibration_routes_a_call_at_the_boundary_to_the_high_noise_expert(tmp_path):
    """Guards the same `>=` turned into `>` where recorded calibration calls are given to experts."""
    from safetensors.torch import save_file

    from builder.quantize.calibration import load_calls

    config = get_preset("tiny-i2v-a14b")
    for i, t in enumerate((900.0, 899.5, 1000.0)):
        save_file({"hidden_states": torch.randn(1, config.in_channels, 2, 4, 6), "timestep": torch.tensor([t]),
                   "encoder_hidden_states": torch.randn(1, 8, config.text_dim)},
                  str(tmp_path / f"call-{i:04d}.safetensors"))
    calls = load_calls(tmp_path, config, ("high_noise", "low_noise"), 0.9)
    assert [c.expert for c in calls] == ["high_noise", "low_noise", "high_noise"]


class _Recorder(nn.Module):
    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None):
        return hidden_states


def _run_captured(tmp_path, calls: int, **kw) -> list[float]:
    from safetensors.torch import load_file

    from runtime.capture import capture_calls

    model = _Recorder()
    with capture_calls(model, tmp_path, **kw) as written:
        for i in range(calls):
            model(torch.zeros(1, 2), torch.tensor([float(i)]), encoder_hidden_states=torch.zeros(1, 3))
    model(torch.zeros(1, 2), torch.tensor([99.0]), torch.zeros(1, 3))  # after the block: not recorded
    files = sorted(tmp_path.glob("call-*.safetensors"))
    assert files == sorted(written)
    return [float(load_file(str(f))["timestep"]) for f in files]


def test_capture_keeps_every_nth_call_starting_with_the_first(tmp_path):
    """Guards an off-by-one in `every` ((seen - 1) % every turned into seen % every): with every=2 the
    1st, 3rd and 5th calls are kept, the first step of a generation included."""
    assert _run_captured(tmp_path, 5, every=2) == [0.0, 2.0, 4.0]


def test_capture_stops_at_its_limit(tmp_path):
    """Guards the limit compared with `>` instead of `>=` (one call too many recorded)."""
    assert _run_captured(tmp_path, 6, limit=2) == [0.0, 1.0]
    assert _run_captured(tmp_path / "b", 6, every=3, limit=5) == [0.0, 3.0]
    with pytest.raises(InputError, match="every must be >= 1"):
        _run_captured(tmp_path / "c", 1, every=0)


def test_capture_records_keyword_arguments_under_their_names(tmp_path):
    from safetensors.torch import load_file

    from runtime.capture import capture_calls

    model = _Recorder()
    image = torch.ones(1, 4)
    with capture_calls(model, tmp_path):
        model(hidden_states=torch.zeros(1, 2), timestep=3.0, encoder_hidden_states=torch.zeros(1, 3),
              encoder_hidden_states_image=image)
    [f] = tmp_path.glob("call-*.safetensors")
    saved = load_file(str(f))
    assert set(saved) == {"hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"}
    assert float(saved["timestep"]) == 3.0 and torch.equal(saved["encoder_hidden_states_image"], image)
