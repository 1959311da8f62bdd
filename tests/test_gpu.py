"""GPU-only checks: FP8 on real tensor cores, AOTInductor engines built and routed on CUDA, and no
host synchronisation inside the static forward. Skipped cleanly without a CUDA GPU; every skip says
why. What of this can run on a CPU runs there in other files: the FP8 math (torch emulates the FP8
matmul) and the compiled quantizer in test_fp8.py, AOTInductor engines in test_engines.py and
bench/gpu.py's compiled variants in test_bench.py; NVFP4 calibration refuses the CPU by design
(test_nvfp4.py checks that it says so)."""

from __future__ import annotations

import pytest
import torch

from builder.build import build
from builder.init_weights import init_weights
from builder.profiles import load_profile
from runtime import WanTransformer, get_preset
from runtime.fp8 import Fp8Linear, fp8_reference

from .conftest import make_inputs, relative_error
from .test_fp8 import fp8_by_the_book

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


FP8_SKIP = ("needs FP8 tensor cores (compute capability >= 8.9); "
            + (f"this GPU is {'.'.join(map(str, torch.cuda.get_device_capability()))}" if torch.cuda.is_available()
               else "no CUDA GPU here"))


@pytest.mark.skipif(not fp8_capable(), reason=FP8_SKIP)
@pytest.mark.parametrize("scaling", ["rowwise", "tensor"])
def test_fp8_linear_on_tensor_cores(scaling):
    """cuBLASLt's FP8 matmul against the FP8 arithmetic written out in test_fp8.py (float64) and
    against the layer's own dequantized math. Guards against scales the tensor-core path applies
    differently from the CPU emulation (e.g. a transposed or misplaced scale)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 1024, device="cuda").to(torch.bfloat16)
    layer = Fp8Linear.from_linear(linear, scaling)
    x = torch.randn(4, 300, 512, device="cuda").to(torch.bfloat16)
    out = layer(x)
    assert relative_error(out, fp8_by_the_book(x, linear.weight, linear.bias, scaling)) < 1e-2
    assert relative_error(out, fp8_reference(layer, x)) < 1e-2
    assert relative_error(out, linear(x)) < 0.08


@pytest.mark.skipif(not fp8_capable(), reason=FP8_SKIP)
def test_fp8_quantizer_is_compiled_on_cuda_and_equals_the_plain_one():
    from runtime import fp8

    fp8._compiled.clear()
    fp8._failed.clear()
    x = torch.randn(4096, 5120, device="cuda").to(torch.bfloat16)
    q, scale = fp8.quantize_rows(x)
    # the eager CUDA path went through the compiled quantizer, and compiling did not fall back
    assert fp8._rows in fp8._compiled and fp8._rows not in fp8._failed
    q_ref, scale_ref = fp8._rows(x)
    assert torch.equal(scale, scale_ref)
    assert (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item() > 0.999


def test_static_forward_has_no_host_sync(tmp_path):
    config = get_preset("tiny-ti2v")
    init_weights(config, tmp_path, seed=1)
    model = WanTransformer.from_pretrained(tmp_path, torch.bfloat16, device="cuda")
    x, t, ctx, _ = make_inputs(config, 1, (3, 8, 12), per_token=True, text_tokens=64)
    x, t, ctx = x.cuda().bfloat16(), t.cuda(), ctx.cuda().bfloat16()
    with torch.no_grad():
        shape, inputs = model.prepare_inputs(x, t, ctx, None)
        static, _ = model._eager_model(shape)
        static(*inputs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            static(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def aoti_loads_here() -> str | None:
    """None if an AOTInductor package loads on this machine, else why not (probed in a subprocess:
    torch 2.11+cu130 was seen to crash at load)."""
    import subprocess
    import sys
    from pathlib import Path

    probe = Path(__file__).resolve().parents[1] / "bench" / "aoti_probe.py"
    r = subprocess.run([sys.executable, str(probe), "--forms", "user-managed"], capture_output=True, text=True,
                       timeout=600)
    return None if " ok " in r.stdout else f"AOTInductor packages do not load here: {r.stdout.strip()[-200:]}"


def test_aoti_engines_on_cuda(tmp_path):
    reason = aoti_loads_here()
    if reason:
        pytest.skip(reason)
    config = get_preset("tiny-t2v").replace(num_layers=8)
    init_weights(config, tmp_path / "w", seed=3)
    precisions = "[bf16, fp8]" if fp8_capable() else "[bf16]"
    (tmp_path / "p.yaml").write_text(f"name: gpu\nmodel: {{weights: w}}\nprecision: {precisions}\nbackends: [aoti]\n"
                                     "shapes:\n  - {batch: 1, frames: 9, height: 64, width: 96}\ndevice: cuda\n"
                                     "text_tokens: 64\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=print)
    assert [r.status for r in report.results] == ["built"] * len(report.results), report.table()
    x, t, ctx, _ = make_inputs(config, 1, (3, 8, 12), text_tokens=64)
    x, t, ctx = x.cuda().bfloat16(), t.cuda(), ctx.cuda().bfloat16()
    eager = WanTransformer.from_pretrained(tmp_path / "w", torch.bfloat16, device="cuda")
    with torch.no_grad():
        ref = eager(x, t, ctx).sample
        model = WanTransformer.from_pretrained(tmp_path / "w", torch.bfloat16, device="cuda", engines=tmp_path / "out")
        out = model(x, t, ctx).sample
        assert model.last_route.backend == "aoti" and out.is_cuda
        assert relative_error(out, ref) < 2e-2
        if fp8_capable():
            fp8 = WanTransformer.from_pretrained(tmp_path / "w", torch.bfloat16, device="cuda", quantize="fp8",
                                                 engines=tmp_path / "out")
            out8 = fp8(x, t, ctx).sample
            assert fp8.last_route.backend == "aoti" and "fp8" in fp8.last_route.reason
            assert relative_error(out8, ref) < 0.1
    entry = next(r for r in report.results if r.entry.precision == "fp8") if fp8_capable() else None
    if entry is not None:
        import json

        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        recorded = manifest["entries"][entry.entry.id]["quantization_error"]
        assert 1e-3 < recorded["relative"] < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_calibration_with_model_optimizer(tmp_path, dtype):
    """Model Optimizer's NVFP4 calibration (CUDA only) on a tiny model; the Q/DQ ONNX passes the graph
    check; the emulation of the engine agrees with Model Optimizer's own fake quantization. Bounds
    are first estimates, set before this ran on a GPU (the CPU run of the same arithmetic gave a
    2.7% error against the unquantized model)."""
    pytest.importorskip("modelopt", reason="needs NVIDIA Model Optimizer (pip install nvidia-modelopt)")
    from builder.build.export import export_onnx
    from builder.quantize.nvfp4 import insert_nvfp4_qdq
    from builder.build.onnx_check import check_for_tensorrt
    from builder.quantize.nvfp4 import calibrate_nvfp4
    from runtime import StaticShape, StaticWanTransformer

    config = get_preset("tiny-t2v").replace(num_layers=8)
    torch.manual_seed(0)
    model = StaticWanTransformer(config, StaticShape(1, 3, 8, 12, 64)).eval().to("cuda", dtype)
    tensors = model.constants()
    path = export_onnx(config, model.shape, tensors, dtype, tmp_path, 23, named_weights=False)
    calibration = calibrate_nvfp4(model, [model.example_inputs(s, dtype) for s in range(3)],
                                  model.example_inputs(99, dtype))
    print(calibration.to_json())
    assert len(calibration.input_amax) == 20
    assert 0.005 < calibration.relative_error < 0.1
    assert calibration.modelopt_difference < (1e-3 if dtype == torch.float32 else 2e-2)
    weights = {n: model.get_submodule(n).weight for n in calibration.input_amax}
    insert_nvfp4_qdq(path, calibration.input_amax, weights, dtype)
    assert check_for_tensorrt(path, config)["fp4"] == 20
