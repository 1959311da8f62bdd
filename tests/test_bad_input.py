"""A user's mistake gets one line naming the input, the rule and the fix: no traceback, nothing lost.
And the command line reads as a person expects (switches, --version, the workflow in --help)."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from builder.init_weights import init_weights
from builder.profiles import ProfileError, load_profile
from runtime import WanTransformer, get_preset
from runtime.errors import InputError, WanBuildError

CONFIG = get_preset("tiny-t2v")


def wan_build(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input")
    init_weights(CONFIG, root / "w", seed=1)
    return root / "w"


# -- profiles -----------------------------------------------------------------------------------------------
def _profile(tmp_path: Path, weights: Path, extra: str = "", shape: str = "{frames: 5, height: 32, width: 48}") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: t\nmodel: {{weights: {weights}}}\nprecision: fp32\nbackends: onnxruntime\n"
                    f"shapes:\n  - {shape}\n{extra}")
    return path


@pytest.mark.parametrize("extra,shape,message", [
    ("", "{batch: 100000, frames: 5, height: 32, width: 48}", "batch: must be <= 64 (got 100000)"),
    ("text_tokens: 1000000000\n", "{frames: 5, height: 32, width: 48}", "text_tokens: must be <= 4096"),
    ("", "{frames: 81, height: 4096, width: 4096}", "video tokens per sample is over 1,048,576"),
])
def test_sizes_have_upper_bounds(tmp_path, weights, extra, shape, message):
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_profile(_profile(tmp_path, weights, extra, shape))


def test_deeply_nested_yaml_is_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: t\nmodel: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ProfileError, match="nested too deeply"):
        load_profile(path)
    one_line_error(wan_build("build", str(path)), "nested too deeply")


# -- checkpoints ---------------------------------------------------------------------------------------------
def _safetensors(path: Path, header) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    return path


@pytest.mark.parametrize("header,message", [
    ([1, 2], "header is not a JSON object"),
    ({"a": 5}, "malformed header entry (not an object)"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "shape is not a list of sizes"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets is not [start, end]"),
    ({"a": {"dtype": "F32", "shape": [1]}}, "data_offsets is not [start, end]"),
    ({"a": {"shape": [1], "data_offsets": [0, 4]}}, "no dtype"),
])
def test_a_malformed_safetensors_header_is_a_weights_error(tmp_path, header, message):
    from runtime.weights import read_safetensors

    path = _safetensors(tmp_path / "x.safetensors", header)
    with pytest.raises(WanBuildError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        read_safetensors(path)


@pytest.mark.parametrize("key,value,message", [
    ("num_layers", "forty", "num_layers must be a positive whole number, got 'forty'"),
    ("num_attention_heads", None, "num_attention_heads must be a positive whole number, got None"),
    ("patch_size", 5, "patch_size must be three positive whole numbers"),
    ("eps", "small", "eps must be a small positive number"),
    ("in_channels", True, "in_channels must be a positive whole number, got True"),
])
def test_wrong_types_in_config_json_are_named(tmp_path, weights, key, value, message):
    import shutil

    folder = tmp_path / "w"
    shutil.copytree(weights, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WanBuildError, match=message):
        WanTransformer.from_pretrained(folder)
    (tmp_path / "p.yaml").write_text(f"name: t\nmodel: {{weights: {folder}}}\nprecision: fp32\nbackends: aoti\n"
                                     "shapes:\n  - {frames: 5, height: 32, width: 48}\n")
    one_line_error(wan_build("build", str(tmp_path / "p.yaml")), message.split(",")[0])


# -- the command line --------------------------------------------------------------------------------------
def test_out_pointing_at_a_file(tmp_path, weights):
    (tmp_path / "file").write_text("mine")
    one_line_error(wan_build("build", str(_profile(tmp_path, weights)), "--out", str(tmp_path / "file")),
                   "is a file, not a folder")
    one_line_error(wan_build("init-weights", "tiny-t2v", "--out", str(tmp_path / "file")), "is a file")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("args,message", [
    (("--batch", "0"), "--batch 0 must lie in 1..64"),
    (("--batch", "100000"), "--batch 100000 must lie in 1..64"),
    (("--steps", "-1"), "--steps -1 must lie in 1..10000"),
    (("--gpu-memory", "nan"), "--gpu-memory nan must be a GPU's memory in GB"),
    (("--gpu-memory", "-3"), "--gpu-memory -3.0 must be a GPU's memory in GB"),
])
def test_plan_refuses_impossible_numbers(args, message):
    one_line_error(wan_build("plan", "--preset", "wan2.2-i2v-a14b", *args), message)


def test_switches_version_and_the_workflow_in_help():
    r = wan_build("matrix", "--help")
    assert r.returncode == 0 and "<bool>" not in r.stdout and "--json " in r.stdout and "--no-markdown" not in r.stdout
    r = wan_build("build", "--help")
    text = " ".join(r.stdout.split())
    assert "<bool>" not in text and "inside it are relative to the profile" in text and "--rebuild-manifest" in text
    r = wan_build("verify", "--help")
    assert "LOAD AND RUN" in r.stdout and "--print-digest" in r.stdout
    r = wan_build("--version")
    assert r.returncode == 0 and r.stdout.startswith("wan-build ")
    r = wan_build("--help")
    assert all(step in r.stdout for step in ("init-weights tiny-i2v-a14b --out engines/weights/tiny-i2v-a14b",
                                             "build profiles/tiny.yaml", "verify engines/tiny", "trusted="))


def test_the_init_weights_example_is_where_the_tiny_profile_looks():
    root = Path(__file__).resolve().parents[1]
    profile = load_profile(root / "profiles" / "tiny.yaml", check_weights=False)
    r = wan_build("init-weights", "--help")
    example = r.stdout.split("Example: wan-build init-weights ")[1].split()
    out = Path(example[example.index("--out") + 1])
    assert [e.weights for e in profile.experts] == [(root / out / sub).resolve() for sub in
                                                     ("transformer", "transformer_2")]


# -- the front --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def front(weights):
    return WanTransformer.from_pretrained(weights)


def _call(front, **change):
    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 16, 2, 4, 6, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 8, CONFIG.text_dim, generator=g))
    args.update(change)
    with torch.no_grad():
        return front(**args).sample


@pytest.mark.parametrize("change,message", [
    (dict(timestep="950"), "timestep must be a number or a tensor .* got str '950'"),
    (dict(timestep=None), "timestep must be a number or a tensor .* got NoneType"),
    (dict(timestep=True), "timestep must be a number or a tensor"),
    (dict(timestep=torch.tensor([True])), "timestep must hold real numbers, got torch.bool"),
    (dict(timestep=torch.empty(1, device="meta")), "timestep is on the meta device"),
    (dict(hidden_states=torch.empty(1, 16, 2, 4, 6, device="meta")), "hidden_states is on the meta device"),
    (dict(encoder_hidden_states=torch.empty(1, 8, 32, device="meta")), "encoder_hidden_states is on the meta"),
])
def test_bad_call_arguments_are_input_errors(front, change, message):
    with pytest.raises(InputError, match=message):
        _call(front, **change)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device,message", [("cuda", "torch sees no CUDA GPU here"), ("gpu", "is not a device"),
                                            ("meta", "holds no values")])
def test_an_unusable_device_is_an_input_error(weights, device, message):
    with pytest.raises(InputError, match=message):
        WanTransformer.from_pretrained(weights, device=device)


def test_non_finite_inputs_warn_once_and_still_answer(weights, caplog):
    model = WanTransformer.from_pretrained(weights)
    x = torch.randn(1, 16, 2, 4, 6)
    x[0, 0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="wan_build.runtime"):
        for _ in range(3):
            out = _call(model, hidden_states=x)
    assert caplog.text.count("hold NaN or infinite values") == 1 and "hidden_states" in caplog.text
    assert out.shape == x.shape
