"""NVFP4 without a Blackwell GPU: the arithmetic against Model Optimizer's, the Q/DQ graph run by
ONNX's reference evaluator against the emulation, the graph check, and the refusals.

Model Optimizer's NVFP4 calibration runs only on CUDA; its GPU test is in tests/test_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builder.build.export import export_onnx
from builder.quantize.nvfp4 import (BLOCK, DYNAMIC_QUANTIZE, FP4_DATA, TRT_DOMAIN, Nvfp4Error, dequantize, e2m1_decode,
                           emulate, global_scale, insert_nvfp4_qdq, observe_input_amax, pack, quantize)
from builder.build.onnx_check import GraphCheckError, check_for_tensorrt
from builder.quantize.nvfp4 import QuantizeError, calibrate_nvfp4
from runtime import StaticShape, StaticWanTransformer, get_preset
from runtime.fp8 import fp8_layer_names

from .conftest import stand_in_for_tensorrt


def test_e2m1_rounding_by_hand():
    """A block whose amax is 6 with scale 1/448 gets block scale 448 (exact in FP8), so values are
    rounded as they are: to the E2M1 grid, nearest, ties to the even code."""
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.75, 0.3, -2.9, 0.0, -6.0, 1.0, 0.5, 4.4])
    scale = global_scale(6.0)
    assert scale.item() == pytest.approx(1 / 448)
    codes, block = quantize(x, scale)
    assert block.float().item() == 448.0
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -1.0, 0.5, -3.0, 0.0, -6.0, 1.0, 0.5, 4.0])
    assert torch.equal(e2m1_decode(codes), want)
    assert torch.equal(dequantize(codes, block, scale), want)
    assert torch.equal(quantize(x * 2, scale)[1].float(), torch.tensor([448.0]))  # FP8 saturates at 448
    assert torch.equal(e2m1_decode(quantize(x * 2, scale)[0]).abs().max(), torch.tensor(6.0))


def test_quantization_matches_model_optimizer():
    """Codes, packing and FP8 block scales equal Model Optimizer's NVFP4QTensor on the same weight."""
    qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 96)  # blocks of very different magnitudes
    w[3, :16] = 0  # an all-zero block
    scale = global_scale(w.abs().amax())
    theirs, their_block, their_scale = qtensor.NVFP4QTensor.quantize(w.clone(), BLOCK)
    codes, block = quantize(w, scale)
    assert torch.equal(their_scale.float().reshape(()), scale)
    assert torch.equal(their_block.view(torch.uint8), block.view(torch.uint8))
    assert pack(codes) == theirs._quantized_data.numpy().tobytes()
    err = ((dequantize(codes, block, scale) - w).norm() / w.norm()).item()
    assert 0.02 < err < 0.15, err  # 4-bit values: a few percent, not zero and not garbage


def test_odd_sizes_are_refused_by_name():
    with pytest.raises(Nvfp4Error, match=r"blocks.2.ffn: the last dimension \(40\) is not a multiple"):
        quantize(torch.randn(4, 40), torch.tensor(1.0), "blocks.2.ffn")


def _numpy(t: torch.Tensor) -> np.ndarray:
    import ml_dtypes

    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


class _Fp4DynamicQuantize:
    """TensorRT's TRT_FP4DynamicQuantize for ONNX's reference evaluator: (x, global scale) ->
    (E2M1 values, FP8 block scales), blocks of 16 on the last axis."""

    @staticmethod
    def op():
        import ml_dtypes
        from onnx.reference.op_run import OpRun

        class TRT_FP4DynamicQuantize(OpRun):
            op_domain = TRT_DOMAIN

            def _run(self, x, scale, axis=-1, block_size=16, scale_type=17):
                assert axis == -1 and block_size == BLOCK and scale_type == 17
                codes, block = quantize(torch.from_numpy(np.asarray(x).astype(np.float32)),
                                        torch.tensor(float(scale)))
                return (codes.numpy().view(ml_dtypes.float4_e2m1fn),
                        block.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn))

        return TRT_FP4DynamicQuantize


def _tiny(tmp_path):
    config = get_preset("tiny-t2v").replace(num_layers=8)
    torch.manual_seed(0)
    model = StaticWanTransformer(config, StaticShape(1, 3, 8, 12, 64)).eval()
    tensors = {k: v.clone() for k, v in model.constants().items()}
    path = export_onnx(config, model.shape, tensors, torch.float32, tmp_path, 23, named_weights=False)
    return config, model, tensors, path


def test_nvfp4_graph_computes_the_emulation(tmp_path):
    """The Q/DQ graph, run by ONNX's reference evaluator (its own FP4 and FP8 decoding of our packed
    weights), equals the torch emulation of the engine; both are a few percent off the unquantized model."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    config, model, tensors, path = _tiny(tmp_path)
    names = fp8_layer_names(model, config.num_layers)
    amax = observe_input_amax(model, names, [model.example_inputs(s) for s in range(3)])
    held_out = model.example_inputs(99)
    weights = {n: model.get_submodule(n).weight for n in names}
    data_before = (tmp_path / "model.onnx.data").read_bytes()
    assert insert_nvfp4_qdq(path, amax, weights, torch.float32) == len(names) == 20
    assert (tmp_path / "model.onnx.data").read_bytes() == data_before  # the shared 16-bit file untouched
    counts = check_for_tensorrt(path, config)
    assert counts["fp4"] == 20 and counts["attention"] == 16
    graph = onnx.load(str(path), load_external_data=False).graph
    held = {i.name for i in graph.initializer}
    fp4 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT4E2M1]
    assert len(fp4) == 20 and all(i.external_data[0].value == FP4_DATA for i in fp4)
    assert not any(f"blocks.{b}." in n and n.endswith("weight") and "fp4" not in n for n in held for b in (3, 4))

    full = onnx.load(str(path))
    feeds = dict(zip([i.name for i in full.graph.input],
                     [t.numpy() for t in held_out] + [tensors[n].numpy() for n in
                                                      [i.name for i in full.graph.input][len(held_out):]]))
    out = torch.from_numpy(ReferenceEvaluator(full, new_ops=[_Fp4DynamicQuantize.op()]).run(None, feeds)[0])
    with torch.no_grad():
        unquantized = model(*held_out)
        with emulate(model, amax):
            emulated = model(*held_out)
        restored = model(*held_out)
    assert torch.equal(restored, unquantized)  # emulate() put the layers back
    assert ((out - emulated).norm() / emulated.norm()).item() < 1e-5
    error = ((emulated - unquantized).norm() / unquantized.norm()).item()
    assert 0.01 < error < 0.2, error


def test_graph_check_names_bad_fp4_nodes(tmp_path):
    import onnx
    from onnx import helper

    config, model, tensors, path = _tiny(tmp_path)
    names = fp8_layer_names(model, config.num_layers)
    insert_nvfp4_qdq(path, dict.fromkeys(names, 3.0), {n: model.get_submodule(n).weight for n in names},
                     torch.float32)
    graph = onnx.load(str(path), load_external_data=False)
    for node in graph.graph.node:
        if node.op_type == DYNAMIC_QUANTIZE and node.name.startswith("blocks.3.attn1.to_q"):
            next(a for a in node.attribute if a.name == "block_size").i = 32
    graph.graph.node.append(helper.make_node("Fancy", [graph.graph.input[0].name], ["x"], domain="vendor",
                                             name="fancy"))
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    with pytest.raises(GraphCheckError) as e:
        check_for_tensorrt(tmp_path / "bad.onnx", config)
    assert f"node blocks.3.attn1.to_q.input.{DYNAMIC_QUANTIZE} ({DYNAMIC_QUANTIZE}): FP4 needs blocks of 16" \
        in str(e.value)
    assert "node fancy (Fancy): operator of domain 'vendor'" in str(e.value)


def test_a_layer_the_graph_lacks_leaves_nothing_behind(tmp_path):
    config, model, tensors, path = _tiny(tmp_path)
    before = path.read_bytes()
    with pytest.raises(Nvfp4Error, match="no MatMul found for blocks.99.ffn"):
        insert_nvfp4_qdq(path, {"blocks.99.ffn": 1.0}, {"blocks.99.ffn": torch.randn(48, 48)}, torch.float32)
    assert path.read_bytes() == before and not (tmp_path / FP4_DATA).exists()


def test_nvfp4_calibration_says_it_needs_cuda():
    config = get_preset("tiny-t2v")
    model = StaticWanTransformer(config, StaticShape(1, 2, 4, 6, 8)).eval()
    with pytest.raises(QuantizeError, match="NVFP4 calibration needs CUDA"):
        calibrate_nvfp4(model, [model.example_inputs(0)], model.example_inputs(1))


def test_nvfp4_entries_through_the_build(tmp_path, monkeypatch):
    """Two NVFP4 tensorrt entries through `build` with what cannot run here replaced: Model
    Optimizer's CUDA-only calibration by max calibration, TensorRT's two calls by a plan recorder and
    ONNX's reference evaluator. The entries' parity is against the emulation, the error is in the
    manifest, and the FP4 weights file is stored once for both shapes."""
    import json

    import shutil
    from pathlib import Path

    import onnx
    from onnx.reference import ReferenceEvaluator

    from builder.build import build
    from builder.init_weights import init_weights
    from builder.profiles import load_profile
    from builder.quantize.nvfp4 import Nvfp4Calibration

    def max_calibration(model, batches, held_out):
        names = fp8_layer_names(model, model.config.num_layers)
        amax = observe_input_amax(model, names, list(batches))
        with torch.no_grad(), emulate(model, amax):
            ours = model(*held_out)
        ref = model(*held_out)
        return Nvfp4Calibration(amax, ((ours - ref).norm() / ref.norm()).item(), float("nan"), 4, ours)

    def reference_engine(entry, plan_path, constants):
        # onnx.load refuses external-data files with several hard links; read private copies
        private = tmp_path / "private"
        shutil.rmtree(private, ignore_errors=True)
        shutil.copytree(Path(plan_path).parent, private)
        graph = onnx.load(str(private / "model.onnx"))
        names = [i.name for i in graph.graph.input]
        run = ReferenceEvaluator(graph, new_ops=[_Fp4DynamicQuantize.op()]).run

        def play(*inputs):
            values = list(inputs) + [constants[n] for n in names[len(inputs):]]
            feeds = {n: _numpy(v) for n, v in zip(names, values)}
            return torch.from_numpy(run(None, feeds)[0].astype(np.float32)).to(inputs[0].dtype)
        return play

    trt_builder = stand_in_for_tensorrt(monkeypatch, reference_engine,
                                        gpu={"type": "cuda", "name": "B200", "compute_capability": "10.0"})
    monkeypatch.setattr(trt_builder, "calibrate_nvfp4", max_calibration)
    init_weights(get_preset("tiny-t2v").replace(num_layers=4), tmp_path / "w", seed=2)
    (tmp_path / "p.yaml").write_text("name: t\nmodel: {weights: w}\nprecision: nvfp4\nbackends: [tensorrt]\n"
                                     "shapes:\n  - {frames: 5, height: 32, width: 48}\n"
                                     "  - {frames: 5, height: 48, width: 32}\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built", "built"], report.table()
    entries = json.loads((tmp_path / "out" / "manifest.json").read_text())["entries"].values()
    for entry in entries:
        assert set(entry["files"]) == {"engine.plan", "model.onnx", "model.onnx.data", FP4_DATA, "parity.json"}
        assert entry["build"]["onnx_check"]["fp4"] == 20  # blocks 1 and 2 of 4 (0 and 3 stay 16-bit), 10 linears each
        # bf16: rounding differences upstream flip some FP4 codes, so engine and emulation differ by a
        # few percent (measured 7.9-8.1% here, on 48 tokens); the nvfp4 parity tolerance is 10%
        assert entry["parity"]["passed"] and entry["parity"]["cosine"] > 0.99
        assert 0.005 < entry["quantization_error"]["relative"] < 0.2
    folders = [tmp_path / "out" / e["id"] for e in entries]
    inodes = {(f / FP4_DATA).stat().st_ino for f in folders}
    assert len(inodes) == 1  # one FP4 weights file, hard-linked into both entries


def test_graph_check_catches_a_dtype_left_behind(tmp_path):
    """bf16 graph: the values' DequantizeLinear writes bf16 itself (output_dtype). If it wrote fp32 into
    a bf16 MatMul, a strongly typed TensorRT network would refuse it; the graph check's type inference
    names it first. And a Cast put between a DequantizeLinear and its MatMul (which can block the FP4
    GEMM fusion) is named too."""
    import onnx
    from onnx import helper

    config = get_preset("tiny-t2v").replace(num_layers=4)
    model = StaticWanTransformer(config, StaticShape(1, 2, 4, 6, 64)).eval().to(torch.bfloat16)
    tensors = model.constants()
    path = export_onnx(config, model.shape, tensors, torch.bfloat16, tmp_path, 23, named_weights=False)
    names = fp8_layer_names(model, config.num_layers)
    insert_nvfp4_qdq(path, dict.fromkeys(names, 3.0), {n: model.get_submodule(n).weight for n in names},
                     torch.bfloat16)
    assert check_for_tensorrt(path, config)["fp4"] == 20
    graph = onnx.load(str(path), load_external_data=False)
    assert not [n for n in graph.graph.node if n.op_type == "Cast" and ".input." in n.name]
    dq = next(n for n in graph.graph.node if n.name == "blocks.1.ffn.net.2.input.DequantizeLinear")
    assert [a.i for a in dq.attribute if a.name == "output_dtype"] == [16]  # BFLOAT16
    kept = [a for a in dq.attribute if a.name != "output_dtype"]
    del dq.attribute[:]
    dq.attribute.extend(kept)
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    with pytest.raises(GraphCheckError, match="types do not line up: .*inconsistent type"):
        check_for_tensorrt(tmp_path / "bad.onnx", config)
    graph = onnx.load(str(path), load_external_data=False)
    matmul = next(n for n in graph.graph.node if n.op_type == "MatMul" and n.input[0].startswith("blocks.1.ffn.net.2"))
    cast = helper.make_node("Cast", [matmul.input[0]], ["recast"], to=16, name="recast")
    graph.graph.node.insert(list(graph.graph.node).index(matmul), cast)
    matmul.input[0] = "recast"
    onnx.save(graph, str(tmp_path / "cast.onnx"))
    with pytest.raises(GraphCheckError, match=r"node recast \(Cast\) lies between a DequantizeLinear and this MatMul"):
        check_for_tensorrt(tmp_path / "cast.onnx", config)
