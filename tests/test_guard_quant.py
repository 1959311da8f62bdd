"""NVFP4 arithmetic and the Q/DQ rewrite, on hand-made numbers and a hand-made graph (no model, no
Model Optimizer): the scale of an all-zero tensor, the smallest FP8 block scale, and a weight that a
quantized and an unquantized layer share. Each test names the bug it guards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builder.quantize.nvfp4 import dequantize, fake_quantize, global_scale, insert_nvfp4_qdq, quantize
from runtime import get_preset


def test_an_all_zero_tensor_has_scale_one_and_stays_zero():
    """Guards the zero-amax scale changed from 1 to 0: an all-zero weight (or an activation that
    never fired in calibration) would then quantize to NaN instead of to zeros."""
    assert global_scale(0.0).item() == 1.0
    assert global_scale(torch.tensor([0.0, 2688.0])).tolist() == [1.0, 1.0]
    zeros = torch.zeros(4, 32)
    codes, block = quantize(zeros, global_scale(zeros.abs().amax()))
    out = dequantize(codes, block, global_scale(zeros.abs().amax()))
    assert torch.isfinite(out).all() and torch.equal(out, zeros)
    assert torch.equal(fake_quantize(zeros, global_scale(0.0)), zeros)


def test_the_smallest_block_scale_is_fp8s_smallest_subnormal():
    """Guards the block-scale floor lowered from 2**-9 (E4M3's smallest subnormal) to 2**-10, which
    rounds to an FP8 scale of 0: a block far below the tensor's amax then dequantizes to zeros (and
    its codes are computed by dividing by zero) instead of keeping its values."""
    big = torch.full((16,), 2688.0)  # amax 6 * 448: global scale 1, block scale 448
    tiny = torch.full((16,), 6 * 0.9 * 2.0 ** -10)  # block amax / 6 is under the floor
    x = torch.cat([big, tiny])
    scale = global_scale(x.abs().amax())
    assert scale.item() == 1.0
    codes, block = quantize(x, scale)
    assert block.float().tolist() == [448.0, 2.0 ** -9]
    out = dequantize(codes, block, scale)
    assert torch.equal(out[:16], big)
    assert torch.isfinite(out).all() and (out[16:] > 0).all()
    assert ((out[16:] - tiny).abs() / tiny).max().item() < 0.15  # 2.7 codes as 3: within E2M1's step


def _shared_weight_graph(path, weight: np.ndarray) -> None:
    """x @ W (layer "a") + x @ W (layer "b"): one stored [in, out] matrix, two MatMuls."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    nodes = [helper.make_node("MatMul", ["x", "W"], ["ya"], name="a"),
             helper.make_node("MatMul", ["x", "W"], ["yb"], name="b"),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
                              [numpy_helper.from_array(weight, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(path))


@pytest.mark.parametrize("layers,kept", [(("a",), True), (("a", "b"), False)])
def test_a_weight_another_layer_still_reads_is_kept(tmp_path, layers, kept):
    """Guards the 16-bit weight dropped from the graph whenever one of its MatMuls is rewritten
    (consumer count ignored): the other, unquantized MatMul would be left reading a tensor the graph
    no longer has. Dropped only when no node reads it any more."""
    import onnx

    pytest.importorskip("onnx")
    rng = np.random.default_rng(0)
    w_in_out = rng.standard_normal((32, 16)).astype(np.float32)
    path = tmp_path / "model.onnx"
    _shared_weight_graph(path, w_in_out)
    weights = {name: torch.from_numpy(w_in_out.T.copy()) for name in layers}  # [out, in], as nn.Linear stores it
    scope = lambda node: node.name if node.op_type == "MatMul" else None  # noqa: E731
    done = insert_nvfp4_qdq(path, dict.fromkeys(layers, 3.0), weights, torch.float32, scope_of=scope,
                            module_name=lambda s: s)
    assert done == len(layers)
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    readers = [n.name for n in model.graph.node if "W" in n.input]
    assert ("W" in initializers) == kept
    assert readers == ([] if not kept else ["b"])
    for name in layers:
        assert f"{name}.weight.fp4" in initializers


def test_the_graph_check_names_an_fp4_quantizer_with_non_fp8_block_scales(tmp_path):
    """Guards the FLOAT8E4M3FN check of `TRT_FP4DynamicQuantize`'s block scales removed: TensorRT's FP4
    GEMMs take E4M3 block scales only."""
    import onnx

    from builder.build.onnx_check import GraphCheckError, check_for_tensorrt
    from builder.quantize.nvfp4 import DYNAMIC_QUANTIZE

    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    path = tmp_path / "model.onnx"
    _shared_weight_graph(path, w)
    scope = lambda node: node.name if node.op_type == "MatMul" else None  # noqa: E731
    insert_nvfp4_qdq(path, {"a": 3.0, "b": 3.0}, {n: torch.from_numpy(w.T.copy()) for n in "ab"}, torch.float32,
                     scope_of=scope, module_name=lambda s: s)
    config = get_preset("tiny-t2v")

    def problems(p) -> str:
        with pytest.raises(GraphCheckError) as e:  # a hand-made graph has no attention: always refused
            check_for_tensorrt(p, config)
        return str(e.value)

    assert "FLOAT8E4M3FN" not in problems(path)
    model = onnx.load(str(path), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == DYNAMIC_QUANTIZE and n.name.startswith("b."))
    next(a for a in node.attribute if a.name == "scale_type").i = 1  # FLOAT block scales
    onnx.save(model, str(tmp_path / "bad.onnx"))
    assert f"node {node.name} ({DYNAMIC_QUANTIZE}): NVFP4 block scales must be FLOAT8E4M3FN" in problems(
        tmp_path / "bad.onnx")
