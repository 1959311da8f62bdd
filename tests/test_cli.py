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


@pytest.mark.parametrize("command", ["plan", "presets", "init-weights", "demo", "build", "list", "verify"])
def test_every_command_has_help_with_an_example(command):
    r = wan_build(command, "--help")
    assert r.returncode == 0 and "Example: wan-build" in r.stdout.replace("\n", " ")


def test_build_list_verify_through_the_cli(tmp_path):
    from builder.init_weights import init_weights
    from runtime.config import get_preset

    init_weights(get_preset("tiny-t2v"), tmp_path / "w", seed=1)
    (tmp_path / "p.yaml").write_text("name: cli\nmodel: {weights: w}\nprecision: fp32\nbackends: [onnxruntime]\n"
                                     "shapes:\n  - {frames: 5, height: 32, width: 48}\n")
    out = str(tmp_path / "out")
    r = wan_build("build", str(tmp_path / "p.yaml"), "--out", out)
    assert r.returncode == 0, r.stderr
    assert "[1/1] main 5x32x48 b1 fp32 onnxruntime: built" in r.stdout and r.stdout.strip().endswith("1 built")
    r = wan_build("list", out)
    assert r.returncode == 0 and "onnxruntime" in r.stdout and "5x32x48 b1" in r.stdout
    r = wan_build("verify", out)
    assert r.returncode == 0 and " ok " in r.stdout


@pytest.mark.parametrize("args,message", [
    (("build", "nope.yaml"), "cannot read the profile"),
    (("list", "/no/such/folder"), "no such engine folder"),
    (("verify", "/no/such/folder"), "no such engine folder"),
])
def test_engine_commands_user_errors(args, message):
    r = wan_build(*args)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
