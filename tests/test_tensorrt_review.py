"""The TensorRT review's findings, pinned: each against a recording stand-in for `tensorrt` and for the
CUDA calls, since neither TensorRT nor a GPU is here to observe.

Streaming budgets set before the context; hardware-compatibility levels read per level and
precision; TF32 cleared for fp32; a private stream ordered with the caller's, on the engine's device;
I/O bound by name; refitter errors reported; a bounded logger; one version source; the timing
cache's result checked; opset 23 refused below TensorRT 10.15; no Cast between a dequantization and
its GEMM; fp32 RMSNorm in bf16 models; the plans kept loaded capped; the torch weights freed while
TensorRT builds."""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from pathlib import Path

import pytest
import torch

import runtime.backends.tensorrt as trt_runtime
from runtime import StaticShape, StaticWanTransformer, get_preset

from .conftest import make_entry

CONFIG = get_preset("tiny-t2v")
SHAPE = StaticShape(1, 2, 4, 6, 8)
VERSION = "11.4.0.106"


# -- the stand-ins ----------------------------------------------------------------------------------
class Recorder(list):
    def names(self):
        return [c[0] for c in self]


def fake_trt(calls: Recorder, io: list[tuple[str, str, tuple, str]], refit_ok: bool = True,
             refittable: tuple[str, ...] = ()) -> types.ModuleType:
    """A `tensorrt` whose engine has the I/O tensors `io` ([(name, INPUT|OUTPUT, shape, dtype)], in
    this order) and the refittable weights `refittable`, and records every call in `calls`."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec("tensorrt") must not raise
    trt.__version__ = VERSION
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    class ILogger:
        def __init__(self):
            pass

    class Context:
        def set_tensor_address(self, name, ptr):
            calls.append(("set_tensor_address", name, ptr))

        def execute_async_v3(self, stream):
            calls.append(("execute_async_v3", stream))
            return True

    class Engine:
        num_io_tensors = len(io)
        streamable_weights_size = 10_000_000_000

        def get_tensor_name(self, i):
            return io[i][0]

        def get_tensor_mode(self, name):
            return next(m for n, m, _, _ in io if n == name)

        def get_tensor_shape(self, name):
            return next(s for n, _, s, _ in io if n == name)

        def get_tensor_dtype(self, name):
            return "DataType." + next(d for n, _, _, d in io if n == name)

        def get_weight_streaming_automatic_budget(self):
            return 3_000_000_000

        def __setattr__(self, name, value):
            calls.append(("set", name, value))
            object.__setattr__(self, name, value)

        def create_execution_context(self):
            calls.append(("create_execution_context",))
            return Context()

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            calls.append(("deserialize_cuda_engine", plan))
            return Engine()

    class Refitter:
        def __init__(self, engine, logger):
            pass

        def refit_cuda_engine(self):
            calls.append(("refit_cuda_engine",))
            return True

        def get_all_weights(self):
            return list(refittable)

        def set_named_weights(self, name, weights, location):
            calls.append(("set_named_weights", name, weights.ptr, weights.count, weights.dtype, location))
            self.named = getattr(self, "named", set()) | {name}
            return True

        def get_missing_weights(self):  # TensorRT keeps what an earlier refit set
            return [n for n in refittable if n not in getattr(self, "named", set())]

    class Error:
        def node_name(self):
            return "blocks.0.attn1.to_q.weight"

        def node_operator(self):
            return "MatMul"

        def desc(self):
            return "weights of the wrong shape"

    class OnnxParserRefitter:
        num_errors = 0 if refit_ok else 1

        def __init__(self, refitter, logger):
            pass

        def refit_from_file(self, path):
            calls.append(("refit_from_file", path))
            return refit_ok

        def get_error(self, i):
            return Error()

    trt.ILogger, trt.Runtime, trt.Refitter, trt.OnnxParserRefitter = ILogger, Runtime, Refitter, OnnxParserRefitter
    trt.Weights = lambda dtype, ptr, count: types.SimpleNamespace(dtype=dtype, ptr=ptr, count=count)
    trt.TensorLocation = types.SimpleNamespace(DEVICE="DEVICE", HOST="HOST")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", BF16="BF16")
    return trt


class FakeStream:
    def __init__(self, name, calls):
        self.name, self.calls, self.cuda_stream = name, calls, hash(name) % 1000

    def wait_stream(self, other):
        self.calls.append(("wait_stream", self.name, other.name))


def fake_cuda(calls: Recorder, capability=(9, 0), gpu="NVIDIA H200") -> types.SimpleNamespace:
    caller = FakeStream("caller", calls)

    @contextlib.contextmanager
    def device(dev):
        calls.append(("device in", str(dev)))
        yield
        calls.append(("device out", str(dev)))

    return types.SimpleNamespace(
        device=device, current_device=lambda: 0, capability=lambda dev: capability, name=lambda dev: gpu,
        current_stream=lambda dev: caller, stream=lambda dev: FakeStream("private", calls),
        use_stream=lambda s: contextlib.nullcontext(), graph=lambda g, stream: contextlib.nullcontext(),
        new_graph=lambda: types.SimpleNamespace(replay=lambda: calls.append(("replay",))),
        empty=lambda shape, dtype, dev: torch.zeros(shape, dtype=dtype), to_device=lambda t, dev: t.contiguous(),
        record=lambda t, s: calls.append(("record_stream", s.name)))


def engine_io(model) -> list[tuple[str, str, tuple, str]]:
    """The plan's tensors in an order that is not the entry's: tables first, the output in the middle."""
    dtype = {torch.float32: "FLOAT", torch.bfloat16: "BF16"}
    ins = [(s.name, "INPUT", s.shape, dtype[s.dtype]) for s in model.input_specs()]
    tables = [(n, "INPUT", tuple(model.constants()[n].shape), "FLOAT") for n in ("rope_cos", "rope_sin", "time_freqs")]
    out = model.output_spec()
    return tables[:2] + [ins[2], (out.name, "OUTPUT", out.shape, dtype[out.dtype])] + ins[:2][::-1] + tables[2:]


def make_engine(monkeypatch, options, precision="fp32", built_for="9.0", capability=(9, 0), refit_ok=True,
                budget=None, gpu="NVIDIA H200", refittable=()):
    model = StaticWanTransformer(CONFIG, SHAPE).eval()
    calls = Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(calls, engine_io(model), refit_ok, refittable))
    monkeypatch.setattr(trt_runtime, "CUDA", fake_cuda(calls, capability, gpu))
    entry = make_entry(CONFIG, SHAPE, "tensorrt", precision=precision,
                       device={"type": "cuda", "name": "NVIDIA H200", "compute_capability": built_for},
                       options=options)
    engine = trt_runtime.TensorRTEngine(entry, Path("/e/engine.plan"), b"PLAN", torch.device("cuda", 0),
                                        model.constants(), built_with=VERSION, built_for=built_for,
                                        options=options, streaming_budget_gb=budget)
    return engine, calls, model


# -- 1. weight streaming ------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,expected", [(None, 3_000_000_000), (4.5, 4_500_000_000), (99.0, 10_000_000_000),
                                             (0.0, 0)])
def test_the_streaming_budget_is_set_before_the_context(monkeypatch, budget, expected):
    """Guards streaming plans running with TensorRT's default (every weight resident)."""
    _, calls, _ = make_engine(monkeypatch, {"weight_streaming": True, "strip_weights": True}, budget=budget)
    names = calls.names()
    assert ("set", "weight_streaming_budget_v2", expected) in calls
    assert names.index("refit_cuda_engine") < calls.index(("set", "weight_streaming_budget_v2", expected)) < \
        names.index("create_execution_context")


def test_no_budget_without_streaming(monkeypatch):
    _, calls, _ = make_engine(monkeypatch, {"weight_streaming": False})
    assert not any(c[:2] == ("set", "weight_streaming_budget_v2") for c in calls)


def test_cuda_graphs_and_streaming_are_refused_together(monkeypatch, tmp_path):
    with pytest.raises(trt_runtime.EngineRefused, match="cuda_graphs with weight_streaming"):
        make_engine(monkeypatch, {"weight_streaming": True, "cuda_graphs": True})
    from builder.profiles import ProfileError, load_profile

    (tmp_path / "p.yaml").write_text("name: t\nmodel: {preset: tiny-t2v, weights: w}\nprecision: bf16\n"
                                     "backends: tensorrt\nshapes:\n  - {frames: 5, height: 32, width: 48}\n"
                                     "tensorrt: {weight_streaming: true, cuda_graphs: true}\n")
    with pytest.raises(ProfileError, match="tensorrt.cuda_graphs: cannot be combined with weight_streaming"):
        load_profile(tmp_path / "p.yaml", check_weights=False)
    (tmp_path / "p.yaml").write_text("name: t\nmodel: {preset: tiny-t2v, weights: w}\nprecision: bf16\n"
                                     "backends: tensorrt\nshapes:\n  - {frames: 5, height: 32, width: 48}\n"
                                     "tensorrt: {weight_streaming_budget_gb: 4}\n")
    with pytest.raises(ProfileError, match="weight_streaming_budget_gb: is a budget for weight streaming"):
        load_profile(tmp_path / "p.yaml", check_weights=False)


# -- 2. hardware-compatibility levels -------------------------------------------------------------------
@pytest.mark.parametrize("level,built_for,here,precision,ok", [
    ("none", "9.0", (9, 0), "bf16", True), ("none", "9.0", (8, 9), "bf16", False),
    ("same_compute_capability", "9.0", (9, 0), "bf16", True), ("same_compute_capability", "8.6", (8, 9), "bf16", False),
    ("ampere_plus", "8.0", (9, 0), "bf16", True), ("ampere_plus", "9.0", (8, 6), "bf16", True),
    ("ampere_plus", "8.0", (7, 5), "bf16", False), ("ampere_plus", "9.0", (8, 6), "fp8", False),
    ("ampere_plus", "10.0", (9, 0), "nvfp4", False), ("none", "8.9", (8, 9), "fp8", True),
])
def test_hardware_compatibility_per_level_and_precision(level, built_for, here, precision, ok):
    """Guards any non-none level skipping every check (plans listed usable that TensorRT rejects)."""
    problem = trt_runtime.compatibility_problem(VERSION, built_for, level, VERSION, torch.device("cuda"), here,
                                                precision)
    assert (problem is None) == ok, problem
    if not ok and precision in ("fp8", "nvfp4") and level == "ampere_plus":
        assert "needs compute capability" in problem


def test_a_plan_on_another_gpu_model_warns(monkeypatch, caplog):
    make_engine(monkeypatch, {"hardware_compatibility": "none"}, gpu="NVIDIA H100 80GB HBM3")
    assert "built on NVIDIA H200, running on NVIDIA H100" in caplog.text


def test_plans_are_refused_for_another_tensorrt_or_the_cpu():
    cuda = torch.device("cuda")
    assert "built with TensorRT 10.16.1.11, this machine has 11.4.0.106" in trt_runtime.compatibility_problem(
        "10.16.1.11", "9.0", "none", VERSION, cuda, (9, 0))
    assert "run on CUDA devices" in trt_runtime.compatibility_problem(VERSION, "9.0", "none", VERSION,
                                                                      torch.device("cpu"), None)


# -- 4 and 7. device, private stream, binding by name ----------------------------------------------------
def test_the_engine_binds_by_name_on_its_own_stream_and_device(monkeypatch):
    engine, calls, model = make_engine(monkeypatch, {"strip_weights": True})
    assert calls.names()[:2] == ["device in", "deserialize_cuda_engine"]
    assert calls.names().index("device out") > calls.names().index("create_execution_context")
    inputs = model.example_inputs(3)
    calls.clear()
    engine(*inputs)
    bound = {name: ptr for op, name, ptr in (c for c in calls if c[0] == "set_tensor_address")}
    for spec, t in zip(model.input_specs(), inputs):  # the plan lists them in another order
        assert bound[spec.name] == t.data_ptr()
    order = calls.names()
    assert order[0] == "device in" and order[-1] == "device out"
    assert ("wait_stream", "private", "caller") in calls and ("wait_stream", "caller", "private") in calls
    assert order.index("wait_stream") < order.index("execute_async_v3") < len(order) - 1 - order[::-1].index(
        "wait_stream")
    execute = next(c for c in calls if c[0] == "execute_async_v3")
    assert execute[1] == FakeStream("private", []).cuda_stream  # not the caller's (default) stream
    assert calls.count(("record_stream", "private")) == len(inputs) + 1


# -- 8. refitter errors, the logger, one version ----------------------------------------------------------
def test_refitter_parse_errors_are_reported(monkeypatch):
    with pytest.raises(trt_runtime.EngineRefused, match=r"node blocks.0.attn1.to_q.weight \(MatMul\): weights of "
                                                         "the wrong shape"):
        make_engine(monkeypatch, {"strip_weights": True}, refit_ok=False)


def test_the_logger_keeps_only_recent_errors_and_warnings():
    trt = types.ModuleType("tensorrt")
    trt.ILogger = type("ILogger", (), {"__init__": lambda self: None})
    logger = trt_runtime.make_logger(trt, keep=5)
    for i in range(1000):
        logger.log("Severity.VERBOSE", f"v{i}")
        logger.log("Severity.INFO", f"i{i}")
    for i in range(8):
        logger.log("Severity.WARNING", f"w{i}")
    logger.log("Severity.ERROR", "e")
    assert len(logger.messages) == 5 and logger.errors() == ["e"] and logger.warnings() == ["w4", "w5", "w6", "w7"]


def test_one_version_source(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__spec__, fake.__version__ = importlib.machinery.ModuleSpec("tensorrt", None), "10.16.1.11"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    from runtime.manifest import tool_versions

    assert trt_runtime.trt_version() == "10.16.1.11" == tool_versions()["tensorrt"]


# -- 3 and 8. the builder: TF32, the timing cache, opsets ----------------------------------------------
def test_tf32_is_cleared_for_fp32_only_and_a_mismatched_timing_cache_is_not_used(monkeypatch, tmp_path):
    from builder.backends import tensorrt as trt_builder
    from builder.profiles import TensorRTOptions

    from .test_tensorrt import fake_tensorrt

    for precision, cleared in (("fp32", True), ("bf16", False), ("fp8", False), ("int8", False)):
        trt = fake_tensorrt(VERSION)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        (tmp_path / precision).mkdir()
        info = trt_builder.build_plan(tmp_path / "m.onnx", tmp_path / precision / "engine.plan", TensorRTOptions(),
                                      tmp_path / "cache", "NVIDIA H200", "9.0", precision)
        assert (("clear_flag", "BuilderFlag.TF32") in trt.calls) == cleared and info.tf32 == (not cleared)
    trt = fake_tensorrt(VERSION, cache_matches=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    (tmp_path / "x").mkdir()
    info = trt_builder.build_plan(tmp_path / "m.onnx", tmp_path / "x" / "engine.plan", TensorRTOptions(),
                                  tmp_path / "cache", "NVIDIA H200", "9.0", "bf16")
    assert not info.timing_cache_used and [c for c in trt.calls if c[0] == "timing_cache_in"][-1][1] == b""


@pytest.mark.parametrize("opset,version,ok", [(23, "10.14.1.48", False), (23, "10.15.1.29", True),
                                              (20, "10.13.0.35", True), (23, "11.4.0.106", True)])
def test_opset_23_needs_tensorrt_10_15(opset, version, ok):
    from builder.backends.tensorrt import opset_problem

    problem = opset_problem(opset, version)
    assert (problem is None) == ok
    if not ok:
        assert "use onnx_opset: 20" in problem


# -- 5. no Cast between dequantization and GEMM ------------------------------------------------------------
def test_fp8_scales_are_stored_in_the_graph_dtype(tmp_path):
    pytest.importorskip("onnx")
    import onnx

    from builder.build.export import export_onnx
    from builder.build.onnx_check import GraphCheckError, check_for_tensorrt
    from builder.quantize.fp8 import Calibration, insert_fp8_qdq
    from runtime.fp8 import fp8_layer_names

    config = CONFIG.replace(num_layers=4)
    model = StaticWanTransformer(config, SHAPE).eval().to(torch.bfloat16)
    path = export_onnx(config, SHAPE, model.constants(), torch.bfloat16, tmp_path, 23, named_weights=False)
    names = fp8_layer_names(model, config.num_layers)
    insert_fp8_qdq(path, Calibration({n: (2.0, 0.5) for n in names}, 0.0, 1, torch.zeros(1)), torch.bfloat16)
    graph = onnx.load(str(path), load_external_data=False)
    scales = [i for i in graph.graph.initializer if i.name.endswith(".fp8_scale")]
    assert len(scales) == 2 * len(names) and {i.data_type for i in scales} == {16}  # BFLOAT16
    assert not [n for n in graph.graph.node if n.op_type == "Cast" and n.output[0].endswith("fp8_scale.cast")]
    assert check_for_tensorrt(path, config)["qdq"] == 2 * len(names)
    # a scale behind a Cast (what the writer used to emit) is named by the check
    from onnx import helper

    q = next(n for n in graph.graph.node if n.op_type == "QuantizeLinear")
    graph.graph.node.insert(0, helper.make_node("Cast", [q.input[1]], ["scale.cast"], to=16, name="scale_cast"))
    q.input[1] = "scale.cast"
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    with pytest.raises(GraphCheckError, match=r"its scale comes from node scale_cast \(Cast\)"):
        check_for_tensorrt(tmp_path / "bad.onnx", config)


# -- 6. RMSNorm computed in fp32 in bf16 models --------------------------------------------------------------
def test_qk_rms_norms_compute_in_fp32_in_bf16_models():
    """A strongly typed network takes a norm's precision from its input: the export must feed the q/k
    RMSNorms fp32 in a bf16 model (guards dropping the casts around them)."""
    pytest.importorskip("onnx")
    import onnx

    from builder.build.export import export_onnx

    model = StaticWanTransformer(CONFIG, SHAPE).eval().to(torch.bfloat16)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(CONFIG, SHAPE, model.constants(), torch.bfloat16, Path(tmp), 23)
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types_of = {v.name: v.type.tensor_type.elem_type for v in list(graph.graph.value_info) + list(graph.graph.input)}
    types_of.update({i.name: i.data_type for i in graph.graph.initializer})
    norms = [n for n in graph.graph.node if n.op_type == "RMSNormalization"]
    assert len(norms) == 4 * CONFIG.num_layers  # q and k of self- and cross-attention
    assert all(types_of.get(n.input[0]) == 1 for n in norms), [types_of.get(n.input[0]) for n in norms]


# -- 9. memory: plans kept loaded, torch weights freed while TensorRT builds -------------------------------
def test_at_most_max_loaded_engines_stay_loaded(tmp_path, monkeypatch):
    """Guards every loaded per-shape plan (each with its own copy of the weights) staying resident."""
    import runtime.engines as engines_module
    from runtime.backends import Backend, Engine
    from runtime.engines import EngineSet

    released, loads = [], []

    class Loaded(Engine):
        def run(self, *inputs):
            return inputs[0]

        def release(self):
            released.append(self.entry.id)

    class Fake(Backend):
        name, library = "tensorrt", "torch"

        def required_files(self, entry):
            return ()

        def compatibility(self, entry, device, capability, versions):
            return None

        def load(self, entry, folder, device, model, options=None):
            loads.append(entry.id)
            return Loaded(entry, device)

    monkeypatch.setattr(engines_module, "backend", lambda name: Fake())
    shapes = [StaticShape(1, 2, 4, 6, 8), StaticShape(1, 2, 4, 8, 8), StaticShape(1, 2, 4, 10, 8)]
    entries = [make_entry(CONFIG, s, "tensorrt", id=f"{i:016x}") for i, s in enumerate(shapes)]
    engines = EngineSet(tmp_path, "main", entries, max_loaded=2)
    for shape in shapes[:2] + shapes[:1] + shapes[2:]:  # a, b, a again, then c: b is the least recent
        engine, _, reason = engines.route(shape, "fp32", torch.device("cpu"), lambda: None)
        assert engine is not None, reason
    assert loads == [entries[0].id, entries[1].id, entries[2].id] and released == [entries[1].id]
    assert sorted(k[0] for k in engines._loaded) == [entries[0].id, entries[2].id]


def test_the_torch_weights_are_freed_before_tensorrt_builds(tmp_path, monkeypatch):
    from builder.build import build
    from builder.init_weights import init_weights
    from builder.profiles import load_profile
    from runtime.backends.onnxruntime import OnnxRuntimeEngine

    from .conftest import stand_in_for_tensorrt

    seen = {}

    def ort_engine(entry, plan_path, constants):
        seen["constants"] = sorted(constants)
        return OnnxRuntimeEngine(entry, Path(plan_path).with_name("model.onnx"), torch.device("cpu"), constants)

    trt_builder = stand_in_for_tensorrt(monkeypatch, ort_engine)
    real = trt_builder.build_plan

    def watching(*args, **kwargs):
        seen["released before the plan"] = released[:]
        return real(*args, **kwargs)
    monkeypatch.setattr(trt_builder, "build_plan", watching)
    released = []
    import builder.build as build_module

    real_files = build_module.build_files

    def files(*args, **kwargs):
        release = args[9] if len(args) > 9 else kwargs.get("release")
        args = list(args)
        args[9] = lambda: (released.append("weights"), release())
        return real_files(*args, **kwargs)
    monkeypatch.setattr(build_module, "build_files", files)
    init_weights(CONFIG, tmp_path / "w", seed=2)
    (tmp_path / "p.yaml").write_text("name: t\nmodel: {weights: w}\nprecision: fp32\nbackends: [tensorrt]\n"
                                     "shapes:\n  - {frames: 5, height: 32, width: 48}\n"
                                     "tensorrt: {strip_weights: true}\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"], report.table()
    assert seen["released before the plan"] == ["weights"]
    assert seen["constants"] == ["rope_cos", "rope_sin", "time_freqs"]  # only the tables were kept
    assert report.results[0].relative_error < 1e-5


# -- refittable plans take the model's weights --------------------------------------------------------------
def test_a_refittable_plan_is_refitted_from_the_models_tensors_and_swaps_in_place(monkeypatch):
    """Every refittable weight is handed by device pointer from the model's own tensor (not read from
    the ONNX file); a LoRA swap refits only the tensors that changed."""
    names = tuple("model." + n for n in StaticWanTransformer(CONFIG, SHAPE).weights())
    options = {"weights": "front", "weights_layout": "0" * 64, "strip_weights": True}
    engine, calls, model = make_engine(monkeypatch, options, refittable=names)
    handed = {c[1]: c[2] for c in calls if c[0] == "set_named_weights"}
    weights = model.weights()
    assert set(handed) == set(names) and "refit_from_file" not in calls.names()
    assert all(handed["model." + n] == t.data_ptr() for n, t in weights.items())
    assert calls.names().index("refit_cuda_engine") < calls.names().index("create_execution_context")
    calls.clear()
    changed = "blocks.0.attn1.to_q.weight"
    assert engine.update_weights({**weights, changed: weights[changed] * 2})
    assert [c[1] for c in calls if c[0] == "set_named_weights"] == ["model." + changed]
    assert calls.names().count("refit_cuda_engine") == 1


def test_a_refittable_plan_refuses_a_model_without_one_of_its_weights(monkeypatch):
    options = {"weights": "front", "weights_layout": "0" * 64, "strip_weights": True}
    with pytest.raises(trt_runtime.EngineRefused, match="model.extra.weight is not a tensor of the model"):
        make_engine(monkeypatch, options, refittable=("model.blocks.0.attn1.to_q.weight", "model.extra.weight"))


def test_a_plan_holding_its_weights_is_refitted_from_its_file_and_not_in_place(monkeypatch):
    engine, calls, model = make_engine(monkeypatch, {"strip_weights": True}, refittable=("model.x",))
    assert "refit_from_file" in calls.names() and "set_named_weights" not in calls.names()
    assert not engine.update_weights(model.weights())


def test_a_refittable_profile_builds_plans_that_take_the_models_weights(tmp_path, monkeypatch):
    """tensorrt.refittable: every weight is named to the builder as refittable, and the entry is
    recorded as taking the model's weights (with their layout), so LoRAs and fine-tunes need no rebuild."""
    import json

    from builder.build import build
    from builder.init_weights import init_weights
    from builder.profiles import load_profile
    from runtime.backends.onnxruntime import OnnxRuntimeEngine

    from .conftest import stand_in_for_tensorrt

    trt_builder = stand_in_for_tensorrt(monkeypatch, lambda entry, plan_path, constants: OnnxRuntimeEngine(
        entry, Path(plan_path).with_name("model.onnx"), torch.device("cpu"), constants))
    real, seen = trt_builder.build_plan, {}

    def watching(*args, **kwargs):
        seen["refit"] = args[7] if len(args) > 7 else kwargs.get("refit_weights")
        return real(*args, **kwargs)
    monkeypatch.setattr(trt_builder, "build_plan", watching)
    init_weights(CONFIG, tmp_path / "w", seed=2)
    (tmp_path / "p.yaml").write_text("name: t\nmodel: {weights: w}\nprecision: fp32\nbackends: [tensorrt]\n"
                                     "shapes:\n  - {frames: 5, height: 32, width: 48}\n"
                                     "tensorrt: {strip_weights: true, refittable: true}\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"], report.table()
    weights = StaticWanTransformer(CONFIG, SHAPE).weights()  # the names do not depend on the shape
    assert sorted(seen["refit"]) == sorted("model." + n for n in weights)
    entry = next(iter(json.loads((tmp_path / "out" / "manifest.json").read_text())["entries"].values()))
    assert entry["options"]["weights"] == "front" and entry["options"]["refittable"] is True
    assert len(entry["options"]["weights_layout"]) == 64


# -- stage engines: a plan of several outputs ----------------------------------------------------------------
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_stage_plan_binds_every_output_by_name(monkeypatch, cuda_graphs):
    """The prologue stage has four outputs: each is bound by its name (the plan lists them in another
    order), and the call returns them in the entry's order, copies under CUDA graphs."""
    from runtime.manifest import TensorInfo
    from runtime.stages import StageModel, stage_example

    model = StaticWanTransformer(CONFIG, SHAPE).eval()
    stage = StageModel(model, "prologue")
    ins, outs = stage_example(model, "prologue", model.example_inputs())
    dtype = {torch.float32: "FLOAT"}
    io = [(n, "INPUT", tuple(t.shape), "FLOAT") for n, t in zip(stage.input_names, ins)]
    io += [("time_freqs", "INPUT", tuple(stage.constants()["time_freqs"].shape), "FLOAT")]
    plan_outputs = list(zip(stage.output_names, outs))[::-1]  # not the entry's order
    io += [(n, "OUTPUT", tuple(t.shape), dtype[t.dtype]) for n, t in plan_outputs]
    calls = Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(calls, io))
    monkeypatch.setattr(trt_runtime, "CUDA", fake_cuda(calls))
    options = {"cuda_graphs": cuda_graphs}
    entry = make_entry(CONFIG, SHAPE, "tensorrt", stage="prologue", options=options,
                       device={"type": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0"},
                       inputs=tuple(TensorInfo.of(n, tuple(t.shape), t.dtype) for n, t in zip(stage.input_names, ins)),
                       outputs=tuple(TensorInfo.of(n, tuple(t.shape), t.dtype) for n, t in zip(stage.output_names, outs)))
    engine = trt_runtime.TensorRTEngine(entry, Path("/e/engine.plan"), b"PLAN", torch.device("cuda", 0),
                                        stage.constants(), built_with=VERSION, built_for="9.0", options=options)
    got = engine.run(*ins)
    assert isinstance(got, tuple) and [tuple(t.shape) for t in got] == [tuple(t.shape) for t in outs]
    bound = {c[1] for c in calls if c[0] == "set_tensor_address"}
    assert set(stage.output_names) <= bound and "time_freqs" in bound
    if cuda_graphs:
        again = engine.run(*ins)
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(got, again))  # copies, not the static buffers
    # a plan whose outputs are not the entry's is refused before any call
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(calls, io[:-1]))
    with pytest.raises(trt_runtime.EngineRefused, match="outputs"):
        trt_runtime.TensorRTEngine(entry, Path("/e/engine.plan"), b"PLAN", torch.device("cuda", 0),
                                   stage.constants(), built_with=VERSION, built_for="9.0", options=options)
