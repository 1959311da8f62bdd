"""Checks an ONNX graph must pass before TensorRT sees it; each failure names the node.

- no float64 anywhere (initializers, graph inputs/outputs, value infos, Cast targets, Constants);
- no complex types;
- no ScatterND (in-place strided writes; they break TensorRT's fusions);
- attention in a form TensorRT fuses: at opset >= 23 the ONNX `Attention` op and no Softmax; at
  lower opsets the decomposed MatMul -> Softmax -> MatMul pattern with the scale applied to Q and K
  before the first MatMul (what torch's exporter writes), which TensorRT's fused-attention pass
  recognises;
- as many attention ops as the model has attention calls (self + cross, + image cross for I2V);
- types that line up: ONNX type inference over the whole graph (the exporter's own type notes
  dropped, so a Q/DQ rewrite that leaves an fp32 value where bf16 is needed is caught; a strongly
  typed TensorRT network would refuse it);
- no operator outside the standard domain except TensorRT's own `trt::TRT_FP4DynamicQuantize`
  (NVFP4 activations), which must use 16-value blocks on the last axis with FP8 scales, and every
  FP4 DequantizeLinear the same blocks (what TensorRT's FP4 GEMMs take).
- No Cast between a DequantizeLinear and the MatMul it feeds, and no Q/DQ scale made by a Cast:
  either can keep TensorRT from fusing the dequantization into the FP8/FP4 GEMM.
"""

from __future__ import annotations

from pathlib import Path

from runtime.config import WanConfig
from runtime.errors import WanBuildError
from runtime.precision import ONNX_FLOAT4E2M1 as _FLOAT4E2M1
from runtime.precision import ONNX_FLOAT8E4M3FN as _FLOAT8E4M3FN

from ..quantize.nvfp4 import BLOCK, DYNAMIC_QUANTIZE, TRT_DOMAIN

_DOUBLE, _COMPLEX64, _COMPLEX128 = 11, 14, 15
_BAD_TYPES = {_DOUBLE: "float64", _COMPLEX64: "complex64", _COMPLEX128: "complex128"}
_TRT_OPS = {(TRT_DOMAIN, DYNAMIC_QUANTIZE)}


class GraphCheckError(WanBuildError):
    """The ONNX graph has something TensorRT must not get; the message names the node."""


def expected_attention_ops(config: WanConfig) -> int:
    return config.num_layers * (3 if config.image_dim is not None else 2)


def check_for_tensorrt(path: Path, config: WanConfig, blocks: int | None = None) -> dict[str, int]:
    """Raise GraphCheckError with the offending node; return a few counts for the build log. `blocks`:
    how many transformer blocks the graph holds (a stage's; default all of them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    problems: list[str] = []

    def tensor_type(value_info) -> int:
        return value_info.type.tensor_type.elem_type

    for init in graph.initializer:
        if init.data_type in _BAD_TYPES:
            problems.append(f"initializer {init.name}: {_BAD_TYPES[init.data_type]}")
    for kind, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        for v in values:
            if tensor_type(v) in _BAD_TYPES:
                problems.append(f"{kind} {v.name}: {_BAD_TYPES[tensor_type(v)]}")
    producers = {out: node for node in graph.node for out in node.output}
    counts = {"nodes": len(graph.node), "opset": opset, "attention": 0, "softmax": 0, "qdq": 0, "fp4": 0}
    fp4_values = {i.name for i in graph.initializer if i.data_type == _FLOAT4E2M1}

    def attr(node, name):
        return next((a.i for a in node.attribute if a.name == name), None)

    def fp4_blocks(node, where: str) -> None:
        if attr(node, "block_size") != BLOCK or attr(node, "axis") != -1:
            problems.append(f"{where}: FP4 needs blocks of {BLOCK} on the last axis "
                            f"(block_size={attr(node, 'block_size')}, axis={attr(node, 'axis')})")

    for node in graph.node:
        where = f"node {node.name or '?'} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            if (node.domain, node.op_type) not in _TRT_OPS:
                problems.append(f"{where}: operator of domain '{node.domain}' that TensorRT's parser does not know")
            else:
                fp4_blocks(node, where)
                if attr(node, "scale_type") != _FLOAT8E4M3FN:
                    problems.append(f"{where}: NVFP4 block scales must be FLOAT8E4M3FN (scale_type=17)")
                fp4_values.add(node.output[0])
                counts["fp4"] += 1
        if node.op_type == "DequantizeLinear" and node.input[0] in fp4_values:
            fp4_blocks(node, where)
            if opset < 23:
                problems.append(f"{where}: FP4 DequantizeLinear needs opset 23 (this graph is opset {opset})")
        if node.op_type == "ScatterND":
            problems.append(f"{where}: ScatterND (an in-place strided write) breaks TensorRT's fusions")
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to in _BAD_TYPES:
                problems.append(f"{where}: casts to {_BAD_TYPES[to]}")
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.t is not None and a.t.data_type in _BAD_TYPES:
                    problems.append(f"{where}: {_BAD_TYPES[a.t.data_type]} constant")
        if node.op_type in ("MatMul", "Gemm"):
            for i in node.input[:2]:
                cast = _cast_after_dequantize(i, producers)
                if cast is not None:
                    problems.append(f"{where}: node {cast.name or '?'} (Cast) lies between a DequantizeLinear and "
                                    "this MatMul, which can keep TensorRT from fusing them into a quantized GEMM; "
                                    "let the DequantizeLinear write the dtype (output_dtype, or scales in it)")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 1:
            scale = producers.get(node.input[1])
            if scale is not None and scale.op_type == "Cast":
                problems.append(f"{where}: its scale comes from node {scale.name or '?'} (Cast); store the scale in "
                                "the dtype it is used in, as Model Optimizer's exporters do")
        if node.op_type == "Attention":
            counts["attention"] += 1
        if node.op_type == "QuantizeLinear":
            counts["qdq"] += 1
        if node.op_type == "Softmax":
            counts["softmax"] += 1
            first = producers.get(node.input[0])
            if first is None or first.op_type != "MatMul":
                problems.append(f"{where}: its input is not a MatMul, so TensorRT cannot fuse the attention")
            elif not all(producers.get(i) is not None and producers[i].op_type in ("Mul", "Div", "Transpose")
                         for i in first.input):
                problems.append(f"{where}: Q and K are not scaled before {first.name} (MatMul); TensorRT's fused "
                                "attention needs the scale applied before the first MatMul")
    want = expected_attention_ops(config if blocks is None else config.replace(num_layers=blocks))
    if opset >= 23:
        if counts["softmax"]:
            problems.append(f"{counts['softmax']} Softmax nodes in an opset-{opset} graph: attention should be "
                            "the ONNX Attention op")
        if counts["attention"] != want:
            problems.append(f"{counts['attention']} Attention nodes, the model has {want} attention calls")
    elif counts["softmax"] != want:
        problems.append(f"{counts['softmax']} Softmax nodes, the model has {want} attention calls")
    problems += _type_problems(model)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
        raise GraphCheckError(f"{path} is not ready for TensorRT: {shown}")
    return counts


def _cast_after_dequantize(name: str, producers: dict) -> object | None:
    """The Cast on the way from a DequantizeLinear to a MatMul input (through Transpose/Reshape), if any."""
    node, cast = producers.get(name), None
    while node is not None and node.op_type in ("Transpose", "Reshape", "Cast"):
        if node.op_type == "Cast":
            cast = node
        node = producers.get(node.input[0])
    return cast if node is not None and node.op_type == "DequantizeLinear" else None


def _type_problems(model) -> list[str]:
    import onnx

    check = onnx.ModelProto()
    check.CopyFrom(model)
    own = [v for v in check.graph.value_info if v.type.tensor_type.elem_type in (_FLOAT4E2M1, _FLOAT8E4M3FN)]
    del check.graph.value_info[:]
    check.graph.value_info.extend(own)  # kept: the custom ops' output types, which inference cannot know
    try:
        onnx.shape_inference.infer_shapes(check, check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several error types here
        return [f"types do not line up: {str(e).strip().splitlines()[0][:300]}"]
    return []
