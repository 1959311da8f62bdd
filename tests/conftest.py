"""Shared fixtures: tiny checkpoints written once per session, and diffusers as the reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist each worker gets its share of the cores: torch's default (every core in every
# worker) would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from builder.init_weights import init_weights
from runtime.config import get_preset

STRUCTURAL_PRESETS = ("tiny-t2v", "tiny-i2v", "tiny-flf2v", "tiny-i2v-a14b", "tiny-ti2v")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """preset name -> a diffusers-layout transformer folder with seeded random weights."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name in STRUCTURAL_PRESETS:
        folders = init_weights(get_preset(name), root / name, seed=7)
        out[name] = folders[0]
    return out


def reference_model(folder: Path, dtype: torch.dtype = torch.float32):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).eval()


def make_inputs(config, batch: int, latent: tuple[int, int, int], seed: int = 0, per_token: bool = False,
                text_tokens: int = 512):
    """Random inputs shaped as a diffusers pipeline passes them."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = latent
    x = torch.randn(batch, config.in_channels, f, h, w, generator=g)
    ctx = torch.randn(batch, text_tokens, config.text_dim, generator=g)
    ctx[:, text_tokens * 3 // 4:] = 0  # prompt padding rows are zeros, as pipelines pass them
    tokens = f * (h // 2) * (w // 2)
    if per_token:
        t = (torch.rand(batch, 1, generator=g) * 1000).expand(batch, tokens).clone()
        t[:, : (h // 2) * (w // 2)] = 0  # TI2V: first latent frame's tokens at t = 0
    else:
        t = torch.rand(batch, generator=g) * 1000
    image = None
    if config.image_dim is not None:
        # FLF2V pipelines pass first- and last-frame CLIP tokens as [2B, 257, d].
        rows = batch * (2 if config.image_pos_embed else 1)
        image = torch.randn(rows, 257, config.image_dim, generator=g)
    return x, t, ctx, image


def stand_in_for_tensorrt(monkeypatch, engine, version: str = "11.4.0.106", gpu: dict | None = None):
    """Build tensorrt entries here: TensorRT's two calls replaced. The plan writer writes a few bytes
    and returns a BuildInfo; `engine(entry, plan_path, constants)` returns the callable that plays
    the plan (e.g. the entry's ONNX in ONNX Runtime). `gpu` replaces the build device's description."""
    import builder.backends.tensorrt as trt_builder

    def build_plan(onnx_path, plan_path, options, cache_dir, gpu_name, cc, precision="bf16", refit_weights=None):
        plan_path.write_bytes(b"stripped plan")
        return trt_builder.BuildInfo(version, "always (TensorRT 11)", options.optimization_level, None,
                                     options.hardware_compatibility, options.strip_weights, False,
                                     str(cache_dir / "t.cache"), 0, 10, 0.1, 13, [])

    class Played:
        def __init__(self, entry, plan_path, plan, device, constants, *, built_with, built_for, options,
                     refit_from="model"):
            assert built_with == version and plan == b"stripped plan"
            self.options = options
            self.play = engine(entry, plan_path, constants)

        def __call__(self, *inputs):
            return self.play(*inputs)

    monkeypatch.setattr(trt_builder, "build_plan", build_plan)
    monkeypatch.setattr(trt_builder.TensorRTBuilder, "unavailable", lambda self, precision, device: None)
    monkeypatch.setattr(trt_builder, "TensorRTEngine", Played)
    if gpu is not None:
        monkeypatch.setattr(trt_builder, "device_info", lambda device: gpu)
    return trt_builder


def make_entry(config, shape, backend: str = "aoti", precision: str = "fp32", **fields):
    """A valid manifest entry of `config` at `shape`, for tests that write manifests by hand."""
    from runtime.backends import input_infos
    from runtime.manifest import Entry, ParityInfo
    from runtime.precision import Precision
    from runtime.static import StaticWanTransformer

    with torch.device("meta"):
        model = StaticWanTransformer(config, shape)
    dtype = Precision(precision).dtype
    values = dict(id="0123456789abcdef", backend=backend, precision=precision, expert="main", shape=shape, video=None,
                  tokens=shape.tokens(config), inputs=input_infos(model.input_specs(dtype)),
                  outputs=input_infos([model.output_spec(dtype)]), files={}, versions={}, device={"type": "cpu"},
                  weights_fingerprint="0" * 64, parity=ParityInfo(0.0, 0.0, 1.0, 1e-5))
    values.update(fields)
    return Entry(**values)


# The longest files first: pytest-xdist hands whole files (--dist loadfile) to workers in collection
# order, so a long file collected last would run alone at the end while the other worker idles.
LONGEST_FIRST = ("test_trust.py", "test_stages.py", "test_fleet.py", "test_serve.py", "test_engines.py", "test_bench.py", "test_nvfp4.py", "test_tensorrt.py",
                 "test_lora.py", "test_planning_cli.py", "test_calibration.py", "test_bench_tools.py", "test_cli.py",
                 "test_tensorrt_review.py", "test_build_memory.py", "test_bad_input.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


def cpu_fp16_onnxruntime() -> bool:
    """Whether ONNX Runtime builds fp16 entries on this CPU (not on x86: its provider runs them in fp32)."""
    from runtime.backends import backend
    from runtime.precision import Precision

    return backend("onnxruntime").runs(Precision.FP16, torch.device("cpu"), None) is None


def cpu_statuses(report, built: str = "built") -> list[str]:
    """The statuses a CPU build of the tests' profiles gives: `built` for every entry, except fp16
    ONNX Runtime entries on x86 CPUs, which are skipped with the reason."""
    skip = not cpu_fp16_onnxruntime()
    return ["skipped" if skip and r.entry.precision == "fp16" and r.entry.backend == "onnxruntime" else built
            for r in report.results]
