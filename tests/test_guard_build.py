"""What makes two entries the same engine (their id), and the bounds and fingerprints the builder
computes, checked without building: every field that changes an engine changes its id, and only
those. Each test names the bug it guards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from builder.backends import builder
from builder.build import plan_entries
from builder.profiles import load_profile
from runtime import get_preset
from runtime.manifest import device_info, tool_versions
from runtime.static import StaticShape

from .conftest import make_entry


def _profile(tmp_path: Path, name: str = "p", backends: str = "[onnxruntime, aoti]", precision: str = "fp32",
             extra: str = "", shape: str = "{frames: 5, height: 32, width: 48}"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: t\nmodel: {{weights: w, preset: tiny-t2v}}\nprecision: {precision}\n"
                    f"backends: {backends}\nshapes:\n  - {shape}\n{extra}")
    return load_profile(path, check_weights=False)


def _ids(profile, device="cpu") -> dict[tuple[str, str], str]:
    return {(e.backend, e.precision): e.id for e in plan_entries(profile, {"main": "f" * 64}, torch.device(device))}


def test_the_text_length_is_part_of_an_entry_id(tmp_path):
    """Guards `text_tokens` dropped from the shape identity: an engine built for 512 text tokens would
    then be "kept" for a profile asking 256, and every call of that length refused (or worse)."""
    a = _ids(_profile(tmp_path, "a", extra="text_tokens: 16\n"))
    b = _ids(_profile(tmp_path, "b", extra="text_tokens: 32\n"))
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)
    assert _ids(_profile(tmp_path, "c", extra="text_tokens: 16\n")) == a  # deterministic


def test_every_dimension_of_the_shape_is_part_of_an_entry_id(tmp_path):
    base = _ids(_profile(tmp_path, "a"))
    for i, shape in enumerate(["{batch: 2, frames: 5, height: 32, width: 48}", "{frames: 9, height: 32, width: 48}",
                               "{frames: 5, height: 48, width: 48}", "{frames: 5, height: 32, width: 32}"]):
        other = _ids(_profile(tmp_path, f"s{i}", shape=shape))
        assert all(other[k] != base[k] for k in base), shape


def test_the_torch_version_is_part_of_an_entry_id(tmp_path, monkeypatch):
    """Guards torch's version dropped from the identity: after a torch upgrade the old entries (whose
    packages the runtime refuses) would be kept instead of rebuilt."""
    import builder.build.entries as entries_module

    profile = _profile(tmp_path)
    before = _ids(profile)
    real = entries_module.tool_versions
    monkeypatch.setattr(entries_module, "tool_versions", lambda: {**real(), "torch": "9.9.9"})
    after = _ids(profile)
    assert all(after[k] != before[k] for k in before)


def test_the_onnx_opset_is_part_of_an_onnxruntime_entry_id(tmp_path):
    """Guards the opset dropped from ONNX Runtime's identity: opset 20 and 23 graphs differ (Attention
    and RMSNormalization ops), so one must not be kept for the other."""
    a = _ids(_profile(tmp_path, "a", backends="onnxruntime", extra="onnx_opset: 20\n"))
    b = _ids(_profile(tmp_path, "b", backends="onnxruntime", extra="onnx_opset: 23\n"))
    assert a[("onnxruntime", "fp32")] != b[("onnxruntime", "fp32")]


def test_aoti_packages_of_other_gpus_are_other_entries(tmp_path):
    """Guards AOTInductor's identity reduced to the device type: Triton kernels are compiled per
    compute capability, so a package for 9.0 is not the entry for 8.9."""
    profile = _profile(tmp_path, backends="aoti")
    versions = tool_versions()
    aoti = builder("aoti")
    h100 = aoti.identity(profile, {"type": "cuda", "name": "H100", "compute_capability": "9.0"}, versions)
    l40 = aoti.identity(profile, {"type": "cuda", "name": "L40", "compute_capability": "8.9"}, versions)
    other_h100 = aoti.identity(profile, {"type": "cuda", "name": "H100 NVL", "compute_capability": "9.0"}, versions)
    cpu = aoti.identity(profile, device_info("cpu"), versions)
    assert h100 != l40 and h100 == other_h100 and cpu not in (h100, l40)
    # on the CPU, the vector instruction sets (AMX, AVX-512 or AVX2 kernels fault on CPUs without them)
    avx2 = aoti.identity(profile, {**device_info("cpu"), "cpu_isa": "avx2"}, versions)
    amx = aoti.identity(profile, {**device_info("cpu"), "cpu_isa": "avx512+amx+vnni+avx512_bf16"}, versions)
    assert avx2 != amx
    assert builder("inductor").identity(profile, {**device_info("cpu"), "cpu_isa": "avx2"}, versions) != \
        builder("inductor").identity(profile, {**device_info("cpu"), "cpu_isa": "avx512"}, versions)


@pytest.mark.parametrize("option,value,changes", [
    ("optimization_level", 5, True), ("strip_weights", False, True), ("hardware_compatibility", "ampere_plus", True),
    ("workspace_gb", 8, True), ("weight_streaming", True, True),
    ("cuda_graphs", True, False), ("timing_cache", "t.cache", False),
])
def test_tensorrt_options_that_change_the_plan_change_the_id(tmp_path, option, value, changes):
    """Guards a plan-changing TensorRT option (strip_weights above all: a stripped plan needs its
    weights refitted at load) left out of the identity, and runtime-only options put in it (a
    rebuild for nothing)."""
    trt = builder("tensorrt")
    versions = {**tool_versions(), "tensorrt": "11.4.0.106"}
    gpu = {"type": "cuda", "name": "H200", "compute_capability": "9.0"}
    flag = str(value).lower() if isinstance(value, bool) else value
    base = trt.identity(_profile(tmp_path, "a", backends="tensorrt", precision="bf16"), gpu, versions)
    other = trt.identity(_profile(tmp_path, "b", backends="tensorrt", precision="bf16",
                                  extra=f"tensorrt: {{{option}: {flag}}}\n"), gpu, versions)
    assert (base != other) == changes


def test_the_smoothquant_choice_is_part_of_int8_entry_ids_only(tmp_path):
    """Guards `tensorrt.smoothquant` (which changes the calibration of int8 plans) left out of their
    ids, or put into every TensorRT entry's id (a rebuild of fp16/bf16/fp8 plans for nothing)."""
    from runtime.errors import WanBuildError
    from runtime.precision import Precision

    trt = builder("tensorrt")
    versions = {**tool_versions(), "tensorrt": "11.4.0.106"}
    gpu = {"type": "cuda", "name": "H200", "compute_capability": "9.0"}
    profiles = [_profile(tmp_path, name, backends="tensorrt", precision="bf16",
                         extra=f"tensorrt: {{smoothquant: {value}}}\n") for name, value in (("a", "auto"), ("b", "off"))]
    assert trt.identity(profiles[0], gpu, versions) == trt.identity(profiles[1], gpu, versions)
    for precision in ("bf16", "fp8"):
        assert trt.precision_identity(profiles[0], Precision(precision)) == {}
    assert [trt.precision_identity(p, Precision.INT8) for p in profiles] == [{"smoothquant": "auto"},
                                                                              {"smoothquant": "off"}]
    assert _profile(tmp_path, "c", backends="tensorrt", precision="bf16").tensorrt.smoothquant == "auto"
    # YAML reads on/off/true as booleans: they mean what they say
    assert _profile(tmp_path, "d", backends="tensorrt", extra="tensorrt: {smoothquant: true}\n").tensorrt.smoothquant == "on"
    with pytest.raises(WanBuildError, match="tensorrt.smoothquant: 'maybe' is not allowed; allowed: auto, on, off"):
        _profile(tmp_path, "e", backends="tensorrt", precision="bf16", extra="tensorrt: {smoothquant: maybe}\n")


def test_verify_bounds_a_quantized_plan_by_the_triangle_inequality():
    """Guards the bound `wan-build verify` allows a quantized TensorRT entry narrowed to tol + q: the
    engine is within tol of its fake-quantized model q (relative to it), which is within q of the
    unquantized u, so ||e - u|| <= tol ||q|| + q ||u|| <= (tol (1 + q) + q) ||u||."""
    from runtime.precision import Precision

    config = get_preset("tiny-t2v")
    shape = StaticShape(1, 2, 4, 6, 8)
    trt = builder("tensorrt")
    for precision in ("fp8", "nvfp4"):
        tol = Precision(precision).parity_tolerance
        for q in (0.0, 0.03, 0.5, 1.0):
            entry = make_entry(config, shape, "tensorrt", precision, quantization_error={"relative": q})
            allowed = trt.verify_reference(entry, None)
            worst = tol * (1 + q) + q  # ||q|| <= (1 + q) ||u|| by the triangle inequality
            assert allowed == pytest.approx(worst, rel=1e-12), (precision, q)
    assert trt.verify_reference(make_entry(config, shape, "tensorrt", "bf16"), None) == Precision.BF16.parity_tolerance
    with pytest.raises(Exception, match="records no quantization error"):
        trt.verify_reference(make_entry(config, shape, "tensorrt", "fp8"), None)


def test_the_calibration_fingerprint_covers_names_and_bytes(tmp_path):
    """Guards the file names dropped from the calibration fingerprint: the build records which calls
    an entry calibrated on by name, so a renamed set of calls is another calibration record."""
    from builder.quantize.calibration import fingerprint

    (tmp_path / "call-0000.safetensors").write_bytes(b"first call")
    (tmp_path / "call-0001.safetensors").write_bytes(b"second call")
    a, b = tmp_path / "call-0000.safetensors", tmp_path / "call-0001.safetensors"
    base = fingerprint([a, b])
    assert fingerprint([b, a]) == base  # the order given does not matter
    renamed = tmp_path / "call-0007.safetensors"
    shutil.copy(a, renamed)
    assert fingerprint([renamed, b]) != base
    a.write_bytes(b"first call, recorded again")
    assert fingerprint([a, b]) != base
