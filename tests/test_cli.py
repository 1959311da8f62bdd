"""The real `wan-build` command, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def wan_build(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_plan_prints_the_model_card_figures():
    r = wan_build("plan", "--preset", "wan2.2-i2v-a14b", "--frames", "81", "--height", "480", "--width", "832")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "in [1, 36, 21, 60, 104] -> out [1, 16, 21, 60, 104]" in out
    assert "32,760 video" in out
    assert "14,288,901,184 per expert" in out and "28,577,802,368 in all" in out
    assert "bf16 28.6 GB" in out and "fp32 57.2 GB" in out
    assert "FLOPs/forward  1.678e+15" in out


def test_invalid_geometry_is_one_line_exit_1():
    r = wan_build("plan", "--preset", "wan2.2-i2v-a14b", "--frames", "80", "--height", "480", "--width", "832")
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("error: frames=80 is not 4k+1") and "77 or 81" in lines[0]


def test_unknown_preset_is_a_user_error():
    r = wan_build("plan", "--preset", "wan3")
    assert r.returncode == 1 and "unknown preset 'wan3'" in r.stderr and "Traceback" not in r.stderr


def test_init_weights_writes_diffusers_layout(tmp_path):
    r = wan_build("init-weights", "tiny-i2v-a14b", "--out", str(tmp_path / "w"), "--seed", "3")
    assert r.returncode == 0, r.stderr
    for sub in ("transformer", "transformer_2"):
        assert (tmp_path / "w" / sub / "config.json").is_file()
        assert (tmp_path / "w" / sub / "diffusion_pytorch_model.safetensors").is_file()
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "w", subfolder="transformer_2")
    assert model.config.in_channels == 36
    r = wan_build("init-weights", "tiny-t2v", "--out", str(tmp_path / "w2"), "--dtype", "int4")
    assert r.returncode == 1 and "--dtype 'int4'" in r.stderr


@pytest.mark.parametrize("command", ["plan", "presets", "init-weights", "demo"])
def test_every_command_has_help_with_an_example(command):
    r = wan_build(command, "--help")
    assert r.returncode == 0 and "Example: wan-build" in r.stdout.replace("\n", " ")
