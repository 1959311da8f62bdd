"""plan --gpu, matrix and the wizard, through the real CLI (the wizard answered as a person would)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builder.planning.matrix import USE_CASES, compute, render_markdown
from builder.profiles import load_profile

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True, text=True, input=stdin,
                          timeout=300, cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_plan_with_a_gpu():
    r = cli("plan", "--preset", "wan2.2-i2v-a14b", "--height", "720", "--width", "1280", "--gpu", "rtx4090")
    assert r.returncode == 0, r.stderr
    assert "GPU RTX 4090: 24 GB, compute capability 8.9" in r.stdout
    assert "81x480x832" in r.stdout and "81x1280x720" in r.stdout and "offloaded" in r.stdout
    assert "verdict: 81x720x1280 batch 1 on RTX 4090: fits with weight streaming in bf16" in r.stdout
    r = cli("plan", "--preset", "wan2.2-i2v-a14b", "--height", "720", "--width", "1280", "--gpu-memory", "8")
    assert "does not fit" in r.stdout and "would fit: 81x480x832" in r.stdout


def test_plan_user_errors():
    r = cli("plan", "--preset", "wan2.2-i2v-a14b", "--gpu", "h100x")
    assert r.returncode == 1 and "did you mean H100 SXM" in r.stderr and "Traceback" not in r.stderr
    r = cli("plan", "--preset", "wan2.2-i2v-a14b", "--gpu", "h100", "--gpu-memory", "24")
    assert r.returncode == 1 and "not both" in r.stderr


def test_matrix_outputs():
    r = cli("matrix", "--json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert list(data) == [u.name for u in USE_CASES]
    assert data["Wan2.2 I2V 480p"]["H100 SXM"] == {"mode": "fits", "label": "fits", "precision": "bf16",
                                                   "needed_gb": pytest.approx(62.2, abs=0.1), "gpu_gb": 80}
    text = cli("matrix").stdout
    assert text.splitlines()[1].startswith("Wan2.2 I2V 480p") and "+offload" in text
    assert cli("matrix", "--markdown").stdout.startswith("| use case | H200 |")


def test_readme_carries_the_current_matrix():
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(render_markdown(compute())[:2 + len(USE_CASES)]) in readme


def test_wizard_driven_like_a_person(tmp_path):
    answers = "\n".join(["1", "4090", "480p", "both", "1", "", "", "../weights/wan22", "", str(tmp_path / "p.yaml")])
    r = cli("wizard", stdin=answers + "\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "Plan for Wan2.2 I2V 480p on RTX 4090" in r.stdout and "fits with expert offload in fp8" in r.stdout
    profile = load_profile(tmp_path / "p.yaml", check_weights=False)
    assert profile.precisions == ("fp8",) and profile.backends == ("tensorrt", "aoti")
    assert [(s.height, s.width) for s in profile.shapes] == [(480, 832), (832, 480)]
    assert profile.experts[1].weights.name == "transformer_2" and profile.boundary == 0.9
    raw = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert raw["model"]["preset"] == "wan2.2-i2v-a14b"


def test_wizard_non_interactive_and_refusals(tmp_path):
    out = tmp_path / "ti2v.yaml"
    r = cli("wizard", "--use-case", "Wan2.2 TI2V-5B 704p", "--gpu", "l4", "--orientations", "landscape", "--yes",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    profile = load_profile(out, check_weights=False)
    assert profile.config.name == "wan2.2-ti2v-5b" and [(s.frames, s.height) for s in profile.shapes] == [(121, 704)]
    r = cli("wizard", "--use-case", "2", "--gpu", "6", "--yes", "--out", str(tmp_path / "no.yaml"))
    assert r.returncode == 1 and "does not fit on 6 GB GPU in any mode" in r.stderr
    assert not (tmp_path / "no.yaml").exists()
    r = cli("wizard", "--use-case", "9", "--yes")
    assert r.returncode == 1 and "use case '9' is not one of" in r.stderr
    r = cli("wizard", "--use-case", "1", "--gpu", "a100", "--precision", "fp8", "--yes", "--out", str(tmp_path / "x.yaml"))
    assert r.returncode == 1 and "precision 'fp8' is not available on A100 80GB" in r.stderr
    # bf16 fits a 24 GB card only by streaming weights: the profile must say so, not the best fit's mode
    r = cli("wizard", "--use-case", "1", "--gpu", "rtx4090", "--precision", "bf16", "--yes", "--out", str(tmp_path / "s.yaml"))
    assert r.returncode == 0 and "memory at bf16 (fits with weight streaming)" in r.stdout, r.stdout
    trt = yaml.safe_load((tmp_path / "s.yaml").read_text())["tensorrt"]
    assert trt["weight_streaming"] is True
    # the budget is what the memory model leaves for weights: under the card, above the two resident blocks
    assert 0 < trt["weight_streaming_budget_gb"] < 24


@pytest.mark.parametrize("command", ["gpus", "matrix", "wizard"])
def test_new_commands_have_help_with_an_example(command):
    r = cli(command, "--help")
    assert r.returncode == 0 and "Example: wan-build" in r.stdout.replace("\n", " ")
