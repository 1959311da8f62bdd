"""Profiles: valid files load; every kind of bad input is a ProfileError naming file, line and key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.init_weights import init_weights
from builder.profiles import ProfileError, TensorRTOptions, load_profile
from runtime.backends import BACKENDS
from runtime.config import MAX_BATCH, MAX_TEXT_TOKENS, get_preset
from runtime.precision import PRECISIONS

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
    (VALID.replace("precision: [fp32, fp16]", "precision: [fp32, int4]"),
     r"p.yaml:8: precision: 'int4' is not allowed; allowed: fp32, fp16, bf16, fp8, nvfp4, int8"),
    (VALID.replace("backends: [onnxruntime, aoti]", "backends: [onnx]"),
     r"p.yaml:9: backends: 'onnx' is not allowed; allowed: tensorrt, aoti, inductor, onnxruntime"),
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


# -- two experts must share one structure -------------------------------------------------------
TWO_EXPERTS = """\
name: mixed
model:
  experts:
    high_noise: {high}
    low_noise: {low}
    boundary: 0.9
precision: fp32
backends: [onnxruntime]
shapes:
  - {{batch: 1, frames: 9, height: 64, width: 96}}
"""

DIFFERENT_EXPERTS = {
    # a T2V checkpoint (16 input channels) next to an I2V-A14B expert (36)
    "t2v-next-to-i2v": lambda c: get_preset("tiny-t2v"),
    # the same preset, one expert with another FFN width
    "ffn-width": lambda c: c.replace(ffn_dim=64),
    # the very same tensors, another LayerNorm eps: the engines of one config would run it wrongly
    "eps-only": lambda c: c.replace(eps=1e-5),
}


@pytest.mark.parametrize("odd_one", ["high_noise", "low_noise"])
@pytest.mark.parametrize("kind", DIFFERENT_EXPERTS)
def test_experts_of_different_structures_are_refused(folder, tmp_path, kind, odd_one):
    """Guards against `_config` dropping its same_structure check: the profile would load with the
    first expert's config and build the second expert's engines for the wrong structure."""
    base = get_preset("tiny-i2v-a14b")
    other = DIFFERENT_EXPERTS[kind](base).replace(experts=1, boundary=None)
    init_weights(other, tmp_path / "other", seed=3)
    paths = {"high_noise": folder / "w" / "transformer", "low_noise": folder / "w" / "transformer_2"}
    paths[odd_one] = tmp_path / "other"
    profile = tmp_path / "p.yaml"
    profile.write_text(TWO_EXPERTS.format(high=paths["high_noise"], low=paths["low_noise"]))
    with pytest.raises(ProfileError, match=rf"^{re.escape(str(profile))}:3: model.experts: the two experts have "
                                           r"different structures"):
        load_profile(profile)
    # the same file with the matching pair loads
    profile.write_text(TWO_EXPERTS.format(high=folder / "w" / "transformer", low=folder / "w" / "transformer_2"))
    assert load_profile(profile).config.same_structure(base)


# -- what the README documents loads -----------------------------------------------------------------
def readme_profiles() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) if re.search(r"(?m)^shapes:", b)]


def load_example(tmp_path: Path, text: str):
    """An example as written, loaded without weights (the examples name their preset); folders it
    names (calibration) are made, relative to the profile as the README says."""
    doc = yaml.safe_load(text)
    if "calibration" in doc:
        (tmp_path / doc["calibration"]).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return load_profile(path, check_weights=False), doc


def test_readme_has_profile_examples():
    """Guards against the example tests below passing on nothing (a README reworded so the pattern
    finds no block)."""
    assert len(readme_profiles()) >= 2


@pytest.mark.parametrize("index", range(len(readme_profiles())))
def test_readme_profile_examples_load(tmp_path, index):
    """Every ```yaml profile in README.md loads and means what it says. Guards against the loader
    dropping an option the README documents (e.g. tensorrt.cuda_graphs) or reading one wrongly."""
    text = readme_profiles()[index]
    profile, doc = load_example(tmp_path, text)
    assert profile.name == doc["name"] and profile.preset == doc["model"]["preset"]
    precisions = doc["precision"] if isinstance(doc["precision"], list) else [doc["precision"]]
    assert list(profile.precisions) == precisions and list(profile.backends) == doc["backends"]
    assert [dataclasses.asdict(s) for s in profile.shapes] == [{"batch": 1, **s} for s in doc["shapes"]]
    for key, value in (doc.get("tensorrt") or {}).items():
        assert getattr(profile.tensorrt, key) == value, key
    for key in ("text_tokens", "device", "onnx_opset"):
        if key in doc:
            assert getattr(profile, key) == doc[key], key
    if "calibration" in doc:
        assert profile.calibration == tmp_path / doc["calibration"].rstrip("/")


def test_readme_timing_cache_null_means_the_default(tmp_path):
    """README's `timing_cache: null` loads as the default (None) (guards refusing a documented value)."""
    text = next(b for b in readme_profiles() if "timing_cache: null" in b)
    profile, _ = load_example(tmp_path, text)
    assert profile.tensorrt.timing_cache is None


def documented_tensorrt_keys() -> set[str]:
    keys = set()
    for text in readme_profiles():
        keys |= set(yaml.safe_load(text).get("tensorrt") or {})
    return keys


# A value other than the default for each option, and what the loaded profile must hold for it.
NON_DEFAULT = {"workspace_gb": ("16", 16.0), "optimization_level": ("5", 5), "timing_cache": ("cache/t.cache", "cache/t.cache"),
               "hardware_compatibility": ("ampere_plus", "ampere_plus"), "strip_weights": ("false", False),
               "weight_streaming": ("true", True), "cuda_graphs": ("true", True), "refittable": ("true", True),
               "smoothquant": ("on", "on"),
               # a budget is refused without streaming, so the line turns streaming on too
               "weight_streaming_budget_gb": ("8, weight_streaming: true", 8.0)}
MINIMAL = """\
name: trt
model: {{weights: w, preset: wan2.2-ti2v-5b}}
precision: bf16
backends: [tensorrt]
shapes:
  - {{batch: 1, frames: 121, height: 704, width: 1280}}
tensorrt: {{{options}}}
"""


def test_every_documented_tensorrt_option_is_accepted_and_read(tmp_path):
    """Each key the README shows under `tensorrt:`, and each TensorRTOptions field (the profiles
    docstring points there), loads alone with a non-default value that reaches the options. Guards
    against an option removed from the allowed keys (unknown key) or accepted but ignored."""
    fields = {f.name for f in dataclasses.fields(TensorRTOptions)}
    documented = documented_tensorrt_keys()
    assert "cuda_graphs" in documented and documented <= fields and set(NON_DEFAULT) == fields
    path = tmp_path / "p.yaml"
    for key, (text, value) in NON_DEFAULT.items():
        path.write_text(MINIMAL.format(options=f"{key}: {text}"))
        options = load_profile(path, check_weights=False).tensorrt
        expected = tmp_path / value if key == "timing_cache" else value  # paths: relative to the profile
        assert getattr(options, key) == expected != getattr(TensorRTOptions(), key), key
    for choice in ("none", "ampere_plus", "same_compute_capability"):  # README: "none  # or ampere_plus / ..."
        path.write_text(MINIMAL.format(options=f"hardware_compatibility: {choice}"))
        assert load_profile(path, check_weights=False).tensorrt.hardware_compatibility == choice


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "profiles").glob("*.yaml")))
def test_shipped_profiles_obey_the_documented_rules(name):
    """Guards against a shipped profile that loads only because a rule was loosened."""
    assert_obeys_documented_rules(load_profile(ROOT / "profiles" / name, check_weights=False))


# -- properties: what loads obeys every documented rule; what does not names file and key -------
NAME_RULE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # README / profiles docstring: it names the engine folder


def assert_obeys_documented_rules(p) -> None:
    """The rules README.md and builder/profiles.py state, checked on a loaded Profile."""
    c = p.config
    assert isinstance(p.name, str) and NAME_RULE.fullmatch(p.name), p.name
    for values, allowed in ((p.precisions, PRECISIONS), (p.backends, BACKENDS)):
        assert values and set(values) <= set(allowed) and len(set(values)) == len(values), values
    assert 1 <= p.text_tokens <= MAX_TEXT_TOKENS and not isinstance(p.text_tokens, bool)
    if c.image_dim is not None:
        assert p.text_tokens == 512  # Wan2.1 I2V/FLF2V split image and text at len - 512
    assert p.device in ("auto", "cpu", "cuda") and p.onnx_opset in (20, 23)
    if "nvfp4" in p.precisions and "tensorrt" in p.backends:
        assert p.onnx_opset == 23
    assert p.shapes and len(set(p.shapes)) == len(p.shapes)
    multiple = c.vae_spatial_stride * c.patch_size[1]
    for s in p.shapes:
        assert all(type(v) is int for v in (s.batch, s.frames, s.height, s.width)), s
        assert 1 <= s.batch <= MAX_BATCH, s
        assert s.frames >= 1 and s.frames % c.vae_temporal_stride == 1, s
        assert s.height >= multiple and s.width >= multiple and s.height % multiple == 0 == s.width % multiple, s
    assert (len(p.experts), p.boundary is None) in ((1, True), (2, False))
    assert p.boundary is None or 0 < p.boundary < 1


KEY_PATH = re.compile(r"(\(top level\)|name|model(\.[a-z_]+)*|precision|backends|shapes(\[\d+\](\.[a-z_]+)?)?|text_tokens"
                      r"|device|onnx_opset|tensorrt(\.[a-z_]+)?|calibration): ")
FILE_PROBLEMS = ("not valid YAML", "the profile is empty", "nested too deeply", "cannot read the profile")


def assert_names_file_and_key(error: ProfileError, path: Path) -> None:
    """`FILE:LINE: KEY: problem` (README: "an error naming the file, line, key and what is allowed"),
    or, for a file that is no profile at all, `FILE[:LINE]: what is wrong with the file`."""
    message = str(error)
    assert message.startswith(f"{path}:"), message
    rest = re.sub(r"^:\d+", "", message[len(str(path)):]).removeprefix(": ")
    assert KEY_PATH.match(rest) or "unknown key; allowed here" in rest or rest.startswith(FILE_PROBLEMS), message


def check_outcome(path: Path, **kwargs) -> None:
    """Loads and obeys every rule, or is refused with a ProfileError naming file and key."""
    try:
        profile = load_profile(path, **kwargs)
    except ProfileError as e:
        assert_names_file_and_key(e, path)
    else:
        assert_obeys_documented_rules(profile)


PRESETS = {"tiny-t2v": {"weights": "w"}, "tiny-i2v": {"weights": "w"}, "tiny-ti2v": {"weights": "w"},
           "tiny-i2v-a14b": {"experts": {"high_noise": "w/transformer", "low_noise": "w/transformer_2",
                                         "boundary": 0.9}}}
# Valid profiles, boundaries included (batch 64, text_tokens 1 and 4096, 64-character names) ...
valid_shapes = st.lists(
    st.fixed_dictionaries({"frames": st.integers(0, 6).map(lambda k: 4 * k + 1),
                           "height": st.integers(1, 8).map(lambda k: 32 * k),
                           "width": st.integers(1, 8).map(lambda k: 32 * k)},
                          optional={"batch": st.sampled_from([1, 2, 3, MAX_BATCH - 1, MAX_BATCH])}),
    min_size=1, max_size=3, unique_by=lambda s: (s.get("batch", 1), s["frames"], s["height"], s["width"]))


def one_or_list(values):
    return st.sampled_from(values) | st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True)


valid_profiles = st.fixed_dictionaries(
    {"name": st.from_regex(NAME_RULE, fullmatch=True) | st.sampled_from(["x" * 64, "0", "a.b_c-d", "wan2.2-14b"]),
     "preset": st.sampled_from(sorted(PRESETS)),
     "precision": one_or_list(PRECISIONS),
     "backends": one_or_list(BACKENDS),
     "shapes": valid_shapes},
    optional={"text_tokens": st.sampled_from([512, 512, 1, 77, MAX_TEXT_TOKENS]),
              "device": st.sampled_from(["auto", "cpu", "cuda"]),
              "onnx_opset": st.sampled_from([20, 23])})


# ... and edits that break one rule (or, for text_tokens, one rule of image models only).
def _set(key, value):
    return lambda d, draw: {**d, key: value}


def _shape(field, value):
    def edit(d, draw):
        if not d["shapes"]:
            return d
        shapes = [dict(s) for s in d["shapes"]]
        shapes[draw(st.integers(0, len(shapes) - 1))][field] = value
        return {**d, "shapes": shapes}
    return edit


def _repeat_a_shape(d, draw):
    return {**d, "shapes": d["shapes"] and [*d["shapes"], dict(draw(st.sampled_from(d["shapes"])))]}


EDITS = {
    **{f"name={v!r}": _set("name", v) for v in ["_x", ".x", "-x", "Tiny", "a b", "x" * 65, "\u00e9", "", 7, "a/b"]},
    **{f"precision={v!r}": _set("precision", v) for v in ["int8", "FP32", [], ["bf16", "bf16"], ["fp32", "fp16", "fp32"]]},
    **{f"backends={v!r}": _set("backends", v) for v in ["onnx", "TensorRT", [], ["aoti", "aoti"]]},
    **{f"text_tokens={v!r}": _set("text_tokens", v) for v in [0, -1, MAX_TEXT_TOKENS + 1, True, 512.0, "512", 256]},
    **{f"device={v!r}": _set("device", v) for v in ["tpu", "GPU"]},
    **{f"onnx_opset={v!r}": _set("onnx_opset", v) for v in [17, 22, 24, "23"]},
    "nvfp4-tensorrt-opset-20": lambda d, draw: {**d, "precision": ["bf16", "nvfp4"], "backends": ["tensorrt"],
                                                "onnx_opset": 20},
    "shapes=[]": _set("shapes", []),
    "repeated-shape": _repeat_a_shape,
    **{f"frames={v!r}": _shape("frames", v) for v in [0, -3, 2, 4, 8, 80, "nine", 9.0]},
    **{f"height={v!r}": _shape("height", v) for v in [0, -32, 8, 16, 48, 100, 64.0]},
    **{f"width={v!r}": _shape("width", v) for v in [0, 8, 16, 40, 96, 2]},
    **{f"batch={v!r}": _shape("batch", v) for v in [0, -1, MAX_BATCH + 1, 1000, True, "1", 1.0]},
}


@st.composite
def profiles(draw, edits=()):
    """A valid profile with `edits` applied, then up to two random edits more."""
    d = draw(valid_profiles)
    for edit in edits:
        d = edit(d, draw)
    for _ in range(draw(st.sampled_from([0, 1, 2]))):
        d = EDITS[draw(st.sampled_from(sorted(EDITS)))](d, draw)
    return d


def violated_keys(d: dict) -> set[str]:
    """The keys an error may name for this profile, by the documented rules (empty: it must load)."""
    bad = set()
    c = get_preset(d["preset"])
    if not (isinstance(d["name"], str) and NAME_RULE.fullmatch(d["name"])):
        bad.add("name")
    lists = {}
    for key, allowed in (("precision", PRECISIONS), ("backends", BACKENDS)):
        values = d[key] if isinstance(d[key], list) else [d[key]]
        lists[key] = values
        if not values or not set(values) <= set(allowed) or len(set(values)) != len(values):
            bad.add(key)
    tokens = d.get("text_tokens", 512)
    if type(tokens) is not int or not 1 <= tokens <= MAX_TEXT_TOKENS:
        bad.add("text_tokens")
    if d.get("device", "auto") not in ("auto", "cpu", "cuda"):
        bad.add("device")
    opset = d.get("onnx_opset", 23)
    if opset not in (20, 23) or ("nvfp4" in lists["precision"] and "tensorrt" in lists["backends"] and opset < 23):
        bad.add("onnx_opset")
    if not d["shapes"]:
        bad.add("shapes")
    multiple = c.vae_spatial_stride * c.patch_size[1]
    seen = []
    for i, s in enumerate(d["shapes"]):
        key = f"shapes[{i}]"
        fields_ok = True
        for f in ("batch", "frames", "height", "width"):
            v = s.get(f, 1)
            if type(v) is not int or v < 1 or (f == "batch" and v > MAX_BATCH):
                bad.add(f"{key}.{f}")
                fields_ok = False
        if not fields_ok:
            continue
        spec = (s.get("batch", 1), s["frames"], s["height"], s["width"])
        if (spec in seen or s["frames"] % 4 != 1 or s["height"] % multiple or s["width"] % multiple
                or (c.image_dim is not None and tokens != 512)):
            bad.add(key)
        seen.append(spec)
    if c.image_dim is not None and tokens != 512 and "text_tokens" not in bad and not d["shapes"]:
        bad.add("shapes")
    return bad


@pytest.mark.parametrize("edit", [None, *EDITS])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_profiles_load_exactly_when_every_rule_holds(tmp_path, edit, data):
    """Property: a profile loads iff it obeys every documented rule (name pattern, frames 4k+1,
    height/width multiples, batch and text_tokens bounds, precisions and backends from their lists
    and unique, no repeated shape, nvfp4 TensorRT at opset 23, 512 text tokens for image models);
    what loads holds exactly what the file says; a refusal names the file, the line and one of the
    keys that break a rule. Guards against any rule loosened or dropped (then a bad profile loads)
    or tightened (then a good one is refused), and errors that blame the wrong key. Each edit that
    breaks a rule is one case, so every rule and boundary is tried on every run."""
    d = data.draw(profiles([EDITS[edit]] if edit else []))
    doc = {"name": d["name"], "model": {**PRESETS[d["preset"]], "preset": d["preset"]},
           **{k: d[k] for k in ("precision", "backends", "shapes", "text_tokens", "device", "onnx_opset") if k in d}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    bad = violated_keys(d)
    try:
        p = load_profile(path, check_weights=False)
    except ProfileError as e:
        m = re.match(rf"{re.escape(str(path))}:\d+: (\S+): ", str(e))
        assert m and bad, (str(e), bad)
        assert m.group(1) in bad, (str(e), bad)
        return
    assert not bad, (bad, doc)
    assert_obeys_documented_rules(p)
    assert p.name == d["name"] and p.preset == d["preset"]
    assert list(p.precisions) == (d["precision"] if isinstance(d["precision"], list) else [d["precision"]])
    assert list(p.backends) == (d["backends"] if isinstance(d["backends"], list) else [d["backends"]])
    assert [(s.batch, s.frames, s.height, s.width) for s in p.shapes] == [
        (s.get("batch", 1), s["frames"], s["height"], s["width"]) for s in d["shapes"]]
    assert (p.text_tokens, p.device, p.onnx_opset) == (d.get("text_tokens", 512), d.get("device", "auto"),
                                                       d.get("onnx_opset", 23))


# -- fuzzing: never a traceback; what loads obeys the rules, what does not names file and key ----
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
    """Property: any YAML document either loads into a profile obeying every documented rule or
    raises a ProfileError naming the file and a key. Guards against tracebacks (KeyError, TypeError)
    from unexpected types and errors that do not say where."""
    path = write(folder, yaml.safe_dump(doc))
    check_outcome(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_edits_of_a_valid_profile(folder, data):
    """Property: one line of the valid profile replaced by anything: it loads obeying every rule,
    or the ProfileError names the file and a key. Guards against an edit that breaks a rule
    loading anyway (a check skipped for some layouts) and against unnamed errors."""
    lines = VALID.splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    replacement = data.draw(st.one_of(st.text(max_size=30), st.sampled_from(
        ["  - {batch: 1, frames: 9}", "precision:", "  preset: 3", "shapes: {a: 1}", "model: []", "  :", "\t",
         "  - {batch: 1, frames: 8, height: 64, width: 96}", "  - {batch: 65, frames: 9, height: 64, width: 96}",
         "  - {batch: 1, frames: 5, height: 96, width: 64}", "  - {batch: 1, frames: 9, height: 72, width: 96}",
         "text_tokens: 4097", "text_tokens: 100", "name: Tiny", "precision: [fp32, fp32]", "backends: []",
         "onnx_opset: 23", "device: gpu", "precision: nvfp4"])))
    lines[i] = replacement
    check_outcome(write(folder, "\n".join(lines) + "\n"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzzed_bytes(folder, raw):
    """Property: arbitrary bytes never crash the loader: a ProfileError naming the file (and the
    key or the file-level problem: unreadable, not YAML, empty), or a profile obeying the rules."""
    path = folder / "p.yaml"
    path.write_bytes(raw)
    check_outcome(path)
