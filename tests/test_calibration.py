"""Calibration on recorded calls: capture during a pipeline run, load and route to experts, match
entries by shape, and a calibrated FP8 TensorRT entry through `build` (TensorRT's calls replaced)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from builder.quantize.calibration import CalibrationError, calls_for, load_calls
from builder.profiles import load_profile
from runtime import StaticShape, get_preset
from runtime.capture import capture_calls

from .conftest import make_inputs, reference_model


def _record(model, folder: Path, config, latents, timesteps) -> list[Path]:
    with capture_calls(model, folder) as written, torch.no_grad():
        for latent, t in zip(latents, timesteps):
            x, _, ctx, image = make_inputs(config, 1, latent, seed=len(written))
            kwargs = {"encoder_hidden_states_image": image} if image is not None else {}
            model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=ctx, return_dict=False,
                  **kwargs)
    return written


def test_capture_from_diffusers_and_route_to_experts(checkpoints, tmp_path):
    """diffusers' own model records its calls; each loads as a static call of the right expert."""
    config = get_preset("tiny-i2v-a14b")
    ref = reference_model(checkpoints["tiny-i2v-a14b"])
    files = _record(ref, tmp_path / "calib", config, [(3, 8, 12), (3, 8, 12), (2, 4, 6)], [950.0, 300.0, 980.0])
    assert [f.name for f in files] == ["call-0000.safetensors", "call-0001.safetensors", "call-0002.safetensors"]
    calls = load_calls(tmp_path / "calib", config, ("high_noise", "low_noise"), 0.9)
    assert [c.expert for c in calls] == ["high_noise", "low_noise", "high_noise"]
    shape = StaticShape(1, 3, 8, 12, 512)
    assert [c.file.name for c in calls_for(calls, "high_noise", shape, "x")] == ["call-0000.safetensors"]
    assert calls[0].inputs[0].shape == (1, config.in_channels, 3, 8, 12) and calls[0].inputs[1].item() == 950.0
    with pytest.raises(CalibrationError, match=r"no calibration call for hn 9x64x96 .*has: high_noise batch 1, "
                                               r"latent 2x4x6.*; high_noise batch 1, latent 3x8x12"):
        calls_for(calls, "high_noise", StaticShape(1, 3, 8, 8, 512), "hn 9x64x96")


def test_bad_calibration_files_are_named(tmp_path):
    from safetensors.torch import save_file

    config = get_preset("tiny-t2v")
    (tmp_path / "a").mkdir()
    save_file({"hidden_states": torch.randn(1, 16, 2, 4, 6)}, str(tmp_path / "a" / "c.safetensors"))
    with pytest.raises(CalibrationError, match=r"c.safetensors: lacks timestep, encoder_hidden_states"):
        load_calls(tmp_path / "a", config, ("main",), None)
    save_file({"hidden_states": torch.randn(1, 36, 2, 4, 6), "timestep": torch.tensor([1.0]),
               "encoder_hidden_states": torch.randn(1, 8, config.text_dim)}, str(tmp_path / "a" / "c.safetensors"))
    with pytest.raises(CalibrationError, match=r"c.safetensors: not a call of tiny-t2v: hidden_states has 36 "
                                               r"channels; tiny-t2v takes 16"):
        load_calls(tmp_path / "a", config, ("main",), None)
    (tmp_path / "a" / "c.safetensors").write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match="not a readable safetensors file"):
        load_calls(tmp_path / "a", config, ("main",), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .safetensors calibration calls there"):
        load_calls(tmp_path / "empty", config, ("main",), None)


def test_calibrated_fp8_entry_through_the_build(tmp_path, monkeypatch):
    """An fp8 TensorRT entry calibrates with Model Optimizer on the recorded calls (not the fixed-seed
    inputs), its id depends on them, and a profile whose calls miss a shape stops before building."""
    pytest.importorskip("modelopt")
    import builder.backends.tensorrt as trt_builder
    import builder.quantize.fp8 as fp8_module
    from builder.build import build
    from builder.init_weights import init_weights
    from runtime import WanTransformer

    config = get_preset("tiny-t2v").replace(num_layers=4)
    init_weights(config, tmp_path / "w", seed=2)
    front = WanTransformer.from_pretrained(tmp_path / "w")
    _record(front, tmp_path / "calib", config, [(2, 4, 6)] * 3, [900.0, 500.0, 100.0])

    seen_batches = []
    real_calibrate = fp8_module.calibrate_fp8

    def spy(model, batches, held_out):
        batches = list(batches)
        seen_batches.extend(batches)
        return real_calibrate(model, batches, held_out)

    monkeypatch.setattr(trt_builder, "calibrate_fp8", spy)
    monkeypatch.setattr(trt_builder.TensorRTBuilder, "unavailable", lambda self, precision, device: None)

    def tensorrt_entry(self, job):
        path, reference = trt_builder.prepare_tensorrt_onnx(job)
        return reference, reference  # what a perfect engine returns: the parity gate is not under test

    monkeypatch.setattr(trt_builder.TensorRTBuilder, "build", tensorrt_entry)
    profile_text = ("name: t\nmodel: {weights: w}\nprecision: fp8\nbackends: [tensorrt]\n"
                    "shapes:\n  - {frames: 5, height: 32, width: 48}\n")
    (tmp_path / "p.yaml").write_text(profile_text + "calibration: calib\n")
    (tmp_path / "plain.yaml").write_text(profile_text)
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"], report.table()
    assert len(seen_batches) == 3
    assert sorted(float(b[1][0]) for b in seen_batches) == [100.0, 500.0, 900.0]  # the recorded timesteps
    entry = next(iter(json.loads((tmp_path / "out" / "manifest.json").read_text())["entries"].values()))
    assert entry["build"]["calibration_calls"] == ["call-0000.safetensors", "call-0001.safetensors", "call-0002.safetensors"]
    assert entry["quantization_error"]["batches"] == 3

    seen_batches.clear()
    plain = build(load_profile(tmp_path / "plain.yaml"), tmp_path / "out2", echo=lambda s: None)
    assert plain.results[0].entry.id != report.results[0].entry.id  # calibration data is part of the id
    assert len(seen_batches) == 4 and sorted(float(b[1][0]) for b in seen_batches) != [100.0, 500.0, 900.0]

    (tmp_path / "wrong.yaml").write_text(profile_text.replace("height: 32", "height: 48") + "calibration: calib\n")
    with pytest.raises(CalibrationError, match=r"no calibration call for main 5x48x48 b1 fp8 tensorrt \(expert main, batch 1, latent 2x6x6"):
        build(load_profile(tmp_path / "wrong.yaml"), tmp_path / "out3", echo=lambda s: None)
    assert not (tmp_path / "out3" / "manifest.json").exists() or \
        not json.loads((tmp_path / "out3" / "manifest.json").read_text())["entries"]


def test_an_entry_id_depends_only_on_its_own_calls(tmp_path):
    from builder.build import plan_entries
    from builder.init_weights import init_weights
    from runtime import WanTransformer

    config = get_preset("tiny-t2v")
    init_weights(config, tmp_path / "w", seed=2)
    front = WanTransformer.from_pretrained(tmp_path / "w")
    _record(front, tmp_path / "calib", config, [(2, 4, 6)], [500.0])
    (tmp_path / "p.yaml").write_text("name: t\nmodel: {weights: w}\nprecision: [bf16, fp8]\nbackends: [tensorrt]\n"
                                     "shapes:\n  - {frames: 5, height: 32, width: 48}\ncalibration: calib\n")
    profile = load_profile(tmp_path / "p.yaml")

    def ids():
        calls = load_calls(tmp_path / "calib", config, ("main",), None)
        return [e.id for e in plan_entries(profile, {"main": "w"}, torch.device("cpu"), calls)]

    before = ids()
    _record(front, tmp_path / "calib", config, [(3, 8, 12)], [400.0])  # another size: not this entry's
    assert ids() == before
    _record(front, tmp_path / "calib", config, [(2, 4, 6)], [300.0])  # one more of this size
    after = ids()
    assert after[0] == before[0] and after[1] != before[1]  # bf16 unchanged, fp8 recalibrates
