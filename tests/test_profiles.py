"""Profiles: valid files load; every kind of bad input is a ProfileError naming file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.init_weights import init_weights
from builder.profiles import ProfileError, load_profile
from runtime.config import get_preset

ROOT = Path(__file__).resolve().parents[1]

VALID = """\
name: tiny-test
model:
  experts:
    high_noise: w/transformer
    low_noise: w/transformer_2
    boundary: 0.9
  preset: tiny-i2v-a14b
precision: [fp32, fp16]
backends: [onnxruntime, aoti]
shapes:
  - {batch: 1, frames: 9, height: 64, width: 96}
  - {batch: 2, frames: 5, height: 96, width: 64}
text_tokens: 512
device: cpu
onnx_opset: 20
tensorrt: {workspace_gb: 8, optimization_level: 4, strip_weights: true}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiles")
    init_weights(get_preset("tiny-i2v-a14b"), root / "w", seed=1)
    return root


def write(folder: Path, text: str) -> Path:
    path = folder / "p.yaml"
    path.write_text(text)
    return path


def test_valid_profile(folder):
    p = load_profile(write(folder, VALID))
    assert p.name == "tiny-test" and p.precisions == ("fp32", "fp16") and p.backends == ("onnxruntime", "aoti")
    assert [e.name for e in p.experts] == ["high_noise", "low_noise"] and p.boundary == 0.9
    assert p.experts[0].weights == folder / "w" / "transformer"  # relative to the profile's folder
    assert p.shapes[1].batch == 2 and p.onnx_opset == 20 and p.tensorrt.optimization_level == 4
    shape = p.static_shape(p.shapes[0])
    assert (shape.latent_frames, shape.latent_height, shape.latent_width) == (3, 8, 12)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "profiles").glob("*.yaml")))
def test_shipped_profiles_load(name):
    p = load_profile(ROOT / "profiles" / name, check_weights=False)
    assert p.shapes and p.backends and p.preset
    for spec in p.shapes:
        p.static_shape(spec)


def test_shipped_profiles_cover_the_use_cases():
    names = {p.stem for p in (ROOT / "profiles").glob("*.yaml")}
    for want in ("wan2.2-i2v-a14b-480p", "wan2.2-i2v-a14b-720p", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b-704p",
                 "wan2.1-i2v-14b-480p", "tiny"):
        assert want in names


BAD = [
    ("name: x\nfoo: 1\n", r"p.yaml:2: foo: unknown key; allowed here: name, model"),
    (VALID.replace("precision: [fp32, fp16]", "precision: [fp32, int8]"),
     r"p.yaml:8: precision: 'int8' is not allowed; allowed: fp32, fp16, bf16, fp8, nvfp4"),
    (VALID.replace("backends: [onnxruntime, aoti]", "backends: [onnx]"),
     r"p.yaml:9: backends: 'onnx' is not allowed; allowed: tensorrt, aoti, onnxruntime"),
    (VALID.replace("frames: 9,", "frames: 8,"), r"p.yaml:11: shapes\[0\]: frames=8 is not 4k\+1.*5 or 9"),
    (VALID.replace("height: 64, width: 96}", "height: 60, width: 96}"),
     r"shapes\[0\]: height=60 is not a multiple of 16.*48 or 64"),
    (VALID.replace("frames: 9,", "frames: nine,"), r"p.yaml:11: shapes\[0\].frames: must be int, got 'nine'"),
    (VALID.replace("batch: 1,", "batch: 0,"), r"shapes\[0\].batch: must be >= 1"),
    (VALID.replace("batch: 1, frames: 9", "batch: true, frames: 9"), r"shapes\[0\].batch: must be int"),
    (VALID.replace("    boundary: 0.9\n", "    boundary: 9\n"), r"p.yaml:6: model.experts.boundary: must lie in \(0, 1\)"),
    (VALID.replace("    boundary: 0.9\n", ""), r"model.experts.boundary: missing"),
    (VALID.replace("name: tiny-test", "name: Tiny Test"), r"p.yaml:1: name: must be lowercase"),
    (VALID.replace("device: cpu", "device: tpu"), r"device: 'tpu' is not allowed; allowed: auto, cpu, cuda"),
    (VALID.replace("onnx_opset: 20", "onnx_opset: 17"), r"onnx_opset: 17 is not allowed; allowed: 20, 23"),
    (VALID.replace("optimization_level: 4", "optimization_level: 9"), r"tensorrt.optimization_level: 9"),
    (VALID.replace("strip_weights: true", "strip_weight: true"), r"tensorrt.strip_weight: unknown key"),
    (VALID.replace("text_tokens: 512", "text_tokens: 0"), r"p.yaml:13: text_tokens: must be >= 1"),
    (VALID.replace("preset: tiny-i2v-a14b", "preset: tiny-t2v"), r"model.experts.high_noise: .*does not match preset "
                                                                 r"tiny-t2v: in_channels: checkpoint 36 vs preset 16"),
    (VALID.replace("preset: tiny-i2v-a14b", "preset: wan9"), r"model.preset: unknown preset 'wan9'"),
    (VALID.replace("w/transformer_2", "w/nowhere"), r"model.experts.low_noise: .*w/nowhere: no such file"),
    (VALID.split("shapes:")[0] + "shapes: []\n", r"p.yaml:10: shapes: must be a non-empty list"),
    (VALID + "name: again\n", r"p.yaml:17: name: appears twice"),
    ("name: [unclosed\n", r"p.yaml:2: not valid YAML"),
    ("", r"p.yaml: the profile is empty"),
    ("- a\n- b\n", r"\(top level\): must be a mapping"),
    ("name: x\n", r"model: missing; the profile needs name, model, precision, backends, shapes"),
    (VALID.replace("frames: 9,", "frames: !!python/object:os.system 1,"), r"shapes\[0\].frames: cannot read"),
    (VALID.replace("  preset: tiny-i2v-a14b\n", "  preset: tiny-i2v-a14b\n  weights: w/transformer\n"),
     r"model: give exactly one of weights"),
    (VALID.replace("shapes:\n", "shapes:\n  - {batch: 1, frames: 9, height: 64, width: 96}\n"),
     r"shapes\[1\]: repeats shape 9x64x96 b1"),
    (VALID + "calibration: nowhere\n", r"p.yaml:17: calibration: .*nowhere does not exist; give a folder of "
                                       r"recorded calls"),
    (VALID.replace("precision: [fp32, fp16]", "precision: [bf16, nvfp4]").replace("[onnxruntime, aoti]", "[tensorrt]"),
     r"p.yaml:15: onnx_opset: nvfp4 TensorRT engines need onnx_opset 23 \(FP4 DequantizeLinear\); got 20"),
]


@pytest.mark.parametrize("text,match", BAD, ids=range(len(BAD)))
def test_bad_profiles_name_file_line_key_and_rule(folder, text, match):
    with pytest.raises(ProfileError, match=match):
        load_profile(write(folder, text))


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="cannot read the profile"):
        load_profile(tmp_path / "nope.yaml")


# -- fuzzing: never a traceback, always a ProfileError -------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 2000), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["fp32", "bf16", "aoti", "tensorrt", "tiny-t2v", "w"]))
keys = st.sampled_from(["name", "model", "precision", "backends", "shapes", "weights", "experts", "preset",
                        "batch", "frames", "height", "width", "boundary", "high_noise", "low_noise", "tensorrt",
                        "device", "text_tokens", "onnx_opset", "junk"])
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(keys, inner, max_size=6)), max_leaves=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents)
def test_fuzzed_documents_give_named_errors(folder, doc):
    path = write(folder, yaml.safe_dump(doc))
    try:
        load_profile(path)
    except ProfileError as e:
        assert str(e).startswith(str(path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_edits_of_a_valid_profile(folder, data):
    lines = VALID.splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    replacement = data.draw(st.one_of(st.text(max_size=30), st.sampled_from(
        ["  - {batch: 1, frames: 9}", "precision:", "  preset: 3", "shapes: {a: 1}", "model: []", "  :", "\t"])))
    lines[i] = replacement
    try:
        load_profile(write(folder, "\n".join(lines) + "\n"))
    except ProfileError as e:
        assert str(e).startswith(str(folder / "p.yaml"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzzed_bytes(folder, raw):
    path = folder / "p.yaml"
    path.write_bytes(raw)
    try:
        load_profile(path)
    except ProfileError:
        pass
