"""TensorRT without TensorRT: everything around the library, checked here.

TensorRT cannot be installed on these machines (its PyPI packages download from NVIDIA's index), so:
the names our code uses are checked against the name lists of the official 10.x and 11.x bindings;
the builder's calls are checked against a recording stand-in for the `tensorrt` module; the ONNX
made for TensorRT, FP8 calibration with Model Optimizer, the timing-cache lock, manifest entries
and refusals run for real. Tests that need TensorRT itself skip, saying so.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
import multiprocessing
import sys
import types
from pathlib import Path

import pytest
import torch

from builder.backends import tensorrt as trt_builder
from builder.build.export import export_onnx
from builder.build.onnx_check import GraphCheckError, check_for_tensorrt
from builder.profiles import TensorRTOptions
from runtime import StaticShape, StaticWanTransformer, get_preset
ROOT = Path(__file__).resolve().parents[1]
NAMES = ROOT / "tests" / "data" / "tensorrt"
TRT_OBJECTS = {"trt", "builder", "network", "parser", "config", "cache", "merged", "e", "engine", "context",
               "refitter", "parser_refitter", "_runtime"}
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def names_used(path: Path) -> set[str]:
    """Attribute names our code reads off TensorRT objects, plus enum members named in strings."""
    tree = ast.parse(path.read_text())
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            root = base.id if isinstance(base, ast.Name) else None
            if root == "self" and chain[-1] in ("engine", "context", "_runtime"):
                chain = chain[:-1]
                root = "engine"
            if root in TRT_OBJECTS and not any(c.startswith("__") for c in chain):  # trt.__version__.split
                used.update(chain)
    module = {n.targets[0].id: n.value for n in tree.body if isinstance(n, ast.Assign)
              and isinstance(n.targets[0], ast.Name)}
    for table in ("HARDWARE_LEVELS", "TORCH_DTYPES"):
        if table in module and isinstance(module[table], ast.Dict):
            values = module[table].values if table == "HARDWARE_LEVELS" else module[table].keys
            used.update(v.value for v in values if isinstance(v, ast.Constant))
    # Our own helpers and torch attributes reached through these names are not TensorRT's.
    return used - {"errors", "warnings", "messages", "cuda_stream", "to", "contiguous", "data_ptr", "release"}


def missing_names(used: set[str], version: str) -> list[str]:
    return sorted(used - set((NAMES / f"names-{version}.txt").read_text().split()))


@pytest.mark.parametrize("version", ["10.16.1.11", "11.4.0.106"])
def test_every_tensorrt_name_we_use_exists_in_the_official_bindings(version):
    used = names_used(ROOT / "builder" / "backends" / "tensorrt.py") | names_used(ROOT / "runtime" / "backends" / "tensorrt.py")
    assert {"build_serialized_network", "STRIP_PLAN", "execute_async_v3", "OnnxParserRefitter"} <= used
    assert len(used) > 40
    missing = missing_names(used, version)
    assert not missing, f"not in TensorRT {version}'s bindings: {missing}"


def test_name_check_catches_a_removed_name(tmp_path):
    """Code using a flag TensorRT 11 removed passes the 10.x check and fails the 11.x one."""
    (tmp_path / "old.py").write_text("def f(trt, builder):\n"
                                     "    return builder.create_network(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)\n")
    used = names_used(tmp_path / "old.py")
    assert "EXPLICIT_BATCH" in used
    assert missing_names(used, "10.16.1.11") == []
    assert missing_names(used, "11.4.0.106") == ["EXPLICIT_BATCH"]


# -- the builder against a recording stand-in for `tensorrt` -------------------------------------
def fake_tensorrt(version: str, parse_ok: bool = True, plan: bytes | None = b"PLAN",
                  cache_matches: bool = True) -> types.ModuleType:
    calls: list[tuple] = []
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec("tensorrt") must not raise
    trt.__version__ = version
    trt.calls = calls

    class Enum:
        def __init__(self, kind):
            self.kind = kind

        def __getattr__(self, name):
            return f"{self.kind}.{name}"

    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=3)
    trt.BuilderFlag, trt.MemoryPoolType = Enum("BuilderFlag"), Enum("MemoryPoolType")
    trt.HardwareCompatibilityLevel = Enum("HardwareCompatibilityLevel")

    class ILogger:
        def __init__(self):
            pass

    class Cache:
        def __init__(self, data):
            self.data = data

        def combine(self, other, ignore_mismatch):
            calls.append(("combine", other.data))
            self.data = self.data + b"+" + other.data
            return True

        def serialize(self):
            return self.data

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", pool, size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def create_timing_cache(self, data):
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("timing_cache_in", cache.data))
            self.cache = Cache(cache.data + b"|new")
            return cache_matches or cache.data == b""

        def get_timing_cache(self):
            return self.cache

        def __setattr__(self, name, value):
            calls.append(("set", name, value))
            object.__setattr__(self, name, value)

    class Error:
        def node_name(self):
            return "node_MatMul_7"

        def node_operator(self):
            return "MatMul"

        def desc(self):
            return "unsupported datatype"

    class Parser:
        num_errors = 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return parse_ok

        def get_error(self, i):
            return Error()

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            if plan is None:
                self.logger.log("Severity.ERROR", "out of memory while building")
            return plan

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, Parser
    return trt


def test_build_plan_calls(monkeypatch, tmp_path):
    for version, network_flags in (("10.16.1.11", 1 << 3), ("11.4.0.106", 0)):
        trt = fake_tensorrt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        options = TensorRTOptions(workspace_gb=2, optimization_level=4, hardware_compatibility="ampere_plus",
                                  strip_weights=True, weight_streaming=True)
        (tmp_path / "e").mkdir(exist_ok=True)
        info = trt_builder.build_plan(tmp_path / "model.onnx", tmp_path / "e" / "engine.plan", options,
                                      tmp_path / "cache", "NVIDIA H200", "9.0")
        calls = trt.calls
        assert ("create_network", network_flags) in calls  # strongly typed on 10.x, default on 11.x
        assert ("parse_from_file", str(tmp_path / "model.onnx")) in calls
        assert ("workspace", "MemoryPoolType.WORKSPACE", 2 * 2**30) in calls
        assert ("set", "builder_optimization_level", 4) in calls
        assert ("set", "hardware_compatibility_level", "HardwareCompatibilityLevel.AMPERE_PLUS") in calls
        flags = [c[1] for c in calls if c[0] == "flag"]
        assert flags == ["BuilderFlag.REFIT_IDENTICAL", "BuilderFlag.STRIP_PLAN", "BuilderFlag.WEIGHT_STREAMING"]
        assert not any("FP16" in str(c) or "BF16" in str(c) or "FP8" in str(c) for c in calls)
        assert (tmp_path / "e" / "engine.plan").read_bytes() == b"PLAN"
        log = json.loads((tmp_path / "e" / "build.log").read_text())
        assert log["tensorrt"] == version and log["strip_weights"] is True and "H200" in log["timing_cache"]
        assert info.timing_cache_bytes_after > 0
        # each version starts from an empty cache of its own (the other version's file is not read)
        assert [c for c in calls if c[0] == "timing_cache_in"] == [("timing_cache_in", b"")]
    caches = sorted(p.name for p in (tmp_path / "cache").glob("*.cache"))
    assert caches == ["timing-NVIDIA-H200-sm9.0-trt10.16.1.11.cache", "timing-NVIDIA-H200-sm9.0-trt11.4.0.106.cache"]


def test_build_plan_errors_name_node_and_reason(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0.106", parse_ok=False))
    with pytest.raises(trt_builder.TensorRTBuildError, match=r"node node_MatMul_7 \(MatMul\): unsupported datatype"):
        trt_builder.build_plan(tmp_path / "m.onnx", tmp_path / "p.plan", TensorRTOptions(), tmp_path, "G", "9.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0.106", plan=None))
    with pytest.raises(trt_builder.TensorRTBuildError, match="out of memory while building"):
        trt_builder.build_plan(tmp_path / "m.onnx", tmp_path / "p.plan", TensorRTOptions(), tmp_path, "G", "9.0")
    assert not (tmp_path / "p.plan").exists()


# -- timing cache: merged under a lock by concurrent builds ----------------------------------------
def _merge_many(path: str, tag: str, n: int) -> None:
    def combine(on_disk: bytes, ours: bytes) -> bytes:
        return json.dumps(sorted(set(json.loads(on_disk)) | set(json.loads(ours)))).encode()

    for i in range(n):
        trt_builder.merge_cache(Path(path), json.dumps([f"{tag}-{i}"]).encode(), combine)


def test_timing_cache_merges_under_a_lock(tmp_path):
    path = tmp_path / "timing.cache"
    procs = [multiprocessing.Process(target=_merge_many, args=(str(path), f"p{k}", 25)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(json.loads(path.read_bytes())) == 100  # no build's entries were lost


# -- the ONNX made for TensorRT --------------------------------------------------------------------
def test_graph_check_passes_our_exports_and_names_bad_nodes(tmp_path):
    import onnx
    from onnx import helper

    for preset, opset in (("tiny-i2v", 23), ("tiny-t2v", 20)):
        config = get_preset(preset)
        model = StaticWanTransformer(config, StaticShape(1, 2, 4, 6, 512, config.image_tokens)).eval()
        tensors = model.constants()
        path = export_onnx(config, model.shape, tensors, torch.float32, tmp_path / preset, opset)
        counts = check_for_tensorrt(path, config)
        assert counts["opset"] == opset and counts["attention" if opset >= 23 else "softmax"] == \
            config.num_layers * (3 if config.image_dim else 2)
    graph = onnx.load(str(path), load_external_data=False)
    graph.graph.node.append(helper.make_node("Cast", [graph.graph.input[0].name], ["bad"], to=11, name="to_double"))
    graph.graph.node.append(helper.make_node("ScatterND", ["bad", "bad", "bad"], ["bad2"], name="rope_write"))
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    with pytest.raises(GraphCheckError) as e:
        check_for_tensorrt(tmp_path / "bad.onnx", get_preset("tiny-t2v"))
    assert "node to_double (Cast): casts to float64" in str(e.value)
    assert "node rope_write (ScatterND)" in str(e.value)


def test_diffusers_own_export_would_be_refused(tmp_path):
    """diffusers' RoPE writes strided slices, which export as ScatterND: the check says so."""
    diffusers = pytest.importorskip("diffusers")
    config = get_preset("tiny-t2v")
    ref = diffusers.WanTransformer3DModel(**{k: v for k, v in config.to_diffusers().items()
                                             if not k.startswith("_")}).eval()
    args = (torch.randn(1, 16, 2, 4, 6), torch.tensor([500.0]), torch.randn(1, 8, config.text_dim))
    from builder.build.export import quiet_torch

    with quiet_torch():
        program = torch.onnx.export(ref, args, dynamo=True, opset_version=23)
    program.save(str(tmp_path / "d.onnx"))
    with pytest.raises(GraphCheckError, match=r"\(ScatterND\): ScatterND"):
        check_for_tensorrt(tmp_path / "d.onnx", config)


@pytest.mark.slow
def test_fp8_calibration_and_qdq_on_the_cpu(tmp_path):
    """Model Optimizer calibrates on the CPU; our Q/DQ graph computes what its fake quantization does."""
    pytest.importorskip("modelopt")
    from builder.quantize.fp8 import calibrate_fp8, insert_fp8_qdq
    from runtime.backends.onnxruntime import OnnxRuntimeEngine

    from .conftest import make_entry

    config = get_preset("tiny-t2v").replace(num_layers=8)
    torch.manual_seed(0)
    model = StaticWanTransformer(config, StaticShape(1, 3, 8, 12, 64)).eval()
    tensors = {k: v.clone() for k, v in model.constants().items()}
    path = export_onnx(config, model.shape, tensors, torch.float32, tmp_path, 23)
    held_out = model.example_inputs(99)
    calibration = calibrate_fp8(model, [model.example_inputs(s) for s in range(3)], held_out)
    assert sorted({n.split(".")[1] for n in calibration.amax}) == ["3", "4"]  # the recipe's middle blocks
    assert 1e-3 < calibration.relative_error < 0.1
    assert insert_fp8_qdq(path, calibration, torch.float32) == 40
    counts = check_for_tensorrt(path, config)
    assert counts["qdq"] == 40
    entry = make_entry(config, model.shape, "onnxruntime")
    out = OnnxRuntimeEngine(entry, path, torch.device("cpu"), tensors)(*held_out)
    with torch.no_grad():
        fake_quantized = model(*held_out)
    assert ((out - fake_quantized).norm() / fake_quantized.norm()).item() < 1e-5


@pytest.mark.slow
def test_int8_calibration_and_qdq_on_the_cpu(tmp_path):
    """INT8 for TensorRT: Model Optimizer's INT8 recipe calibrates on the CPU, and our INT8 Q/DQ graph
    (per-tensor activations, per-channel weights) computes what its fake quantization does."""
    pytest.importorskip("modelopt")
    from builder.quantize.int8 import calibrate_int8, insert_int8_qdq

    config = get_preset("tiny-t2v").replace(num_layers=8)
    torch.manual_seed(0)
    model = StaticWanTransformer(config, StaticShape(1, 3, 8, 12, 64)).eval()
    tensors = {k: v.clone() for k, v in model.constants().items()}
    path = export_onnx(config, model.shape, tensors, torch.float32, tmp_path, 23, named_weights=False)
    held_out = model.example_inputs(99)
    with torch.no_grad():
        unquantized = model(*held_out)
    calibration = calibrate_int8(model, [model.example_inputs(s) for s in range(3)], held_out)
    assert sorted({n.split(".")[1] for n in calibration.input_amax}) == ["3", "4"]  # the recipe's middle blocks
    assert all(w.numel() == model.get_submodule(n).weight.shape[0] for n, w in calibration.weight_amax.items())
    assert 1e-4 < calibration.relative_error < 0.05
    assert insert_int8_qdq(path, calibration, torch.float32) == 20
    assert check_for_tensorrt(path, config)["qdq"] == 40
    # The graph's arithmetic, run as written: ONNX Runtime's own QDQ rewrites (which fuse int8 Q/DQ into
    # its integer kernels, and in 1.32 fail on these graphs) are no part of what TensorRT receives.
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in session.get_inputs()],
                     [t.numpy() for t in held_out] + [tensors[n].numpy() for n in ("rope_cos", "rope_sin", "time_freqs")]))
    out = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        fake_quantized = model(*held_out)
    assert ((out - fake_quantized).norm() / fake_quantized.norm()).item() < 1e-5
    assert ((out - unquantized).norm() / unquantized.norm()).item() > 1e-4  # the Q/DQ nodes do quantize


def _run_graph_unoptimized(path: Path, inputs, tensors) -> torch.Tensor:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in session.get_inputs()],
                     [t.numpy() for t in inputs] + [tensors[n].numpy() for n in ("rope_cos", "rope_sin", "time_freqs")]))
    return torch.from_numpy(session.run(None, feeds)[0])


def _with_outlier_channels(model: StaticWanTransformer) -> None:
    """Give the quantized blocks' linear inputs a few channels 30x larger than the rest, as trained
    transformers have (and random weights do not): the modulation's scale rows feed the attention and
    FFN inputs, a few FFN up-projection rows feed the down projection."""
    with torch.no_grad():
        for block in model.blocks[3:5]:
            for row in (1, 4):  # scale_msa, c_scale_msa: (1 + scale) multiplies the normalized input
                block.scale_shift_table[0, row, [5, 17, 30]] = 30.0
            block.ffn.net[0].proj.weight[[2, 40, 77]] *= 30.0


@pytest.mark.slow
@pytest.mark.parametrize("outliers", [True, False], ids=["outlier-channels", "random-weights"])
def test_int8_smoothquant_where_it_helps(tmp_path, outliers):
    """SmoothQuant for TensorRT int8: with outlier activation channels Model Optimizer's SmoothQuant
    recipe has a lower error than the plain one and "auto" keeps it; our graph (per-channel multiplier
    on the activation, the smoothed weight stored as int8 behind a DequantizeLinear, the shared 16-bit
    weights file untouched) computes what Model Optimizer's fake quantization does. "auto" keeps the
    recipe with the lower error either way."""
    pytest.importorskip("modelopt")
    import onnx

    from builder.quantize.int8 import calibrate_int8, insert_int8_qdq
    from runtime.manifest import INT8_DATA, ONNX_DATA

    config = get_preset("tiny-t2v").replace(num_layers=8)
    torch.manual_seed(0)
    model = StaticWanTransformer(config, StaticShape(1, 3, 8, 12, 64)).eval()
    if outliers:
        _with_outlier_channels(model)
    tensors = {k: v.clone() for k, v in model.constants().items()}
    path = export_onnx(config, model.shape, tensors, torch.float32, tmp_path, 23, named_weights=False)
    shared = (tmp_path / ONNX_DATA).read_bytes()
    held_out = model.example_inputs(99)
    batches = [model.example_inputs(s) for s in range(3)]
    calibration = calibrate_int8(model, batches, held_out, smoothquant="auto")
    errors = calibration.errors
    assert set(errors) == {"INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG"}
    assert calibration.relative_error == min(errors.values())
    if outliers:
        assert errors["INT8_SMOOTHQUANT_CFG"] < 0.7 * errors["INT8_DEFAULT_CFG"], errors
    assert calibration.to_json()["smoothquant"] == calibration.smoothquant
    assert insert_int8_qdq(path, calibration, torch.float32) == 20
    assert check_for_tensorrt(path, config)["qdq"] == 40 - 20 * calibration.smoothquant
    assert (tmp_path / ONNX_DATA).read_bytes() == shared
    assert (tmp_path / INT8_DATA).exists() == calibration.smoothquant
    if calibration.smoothquant:
        graph = onnx.load(str(path), load_external_data=False).graph
        assert sum(n.op_type == "Mul" and n.name.endswith(".SmoothQuant") for n in graph.node) == 20
        assert (tmp_path / INT8_DATA).stat().st_size >= sum(
            model.get_submodule(n).weight.numel() for n in calibration.input_amax)
    out = _run_graph_unoptimized(path, held_out, tensors)
    fake_quantized = calibration.output  # the kept recipe's model (auto ran one of them on a copy)
    assert ((out - fake_quantized).norm() / fake_quantized.norm()).item() < 1e-5


# -- refusals before deserializing -----------------------------------------------------------------
def test_plans_are_refused_before_deserializing():
    from runtime.backends.tensorrt import compatibility_problem

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "built with TensorRT 10.16.1.11, this machine has 11.4.0.106" in compatibility_problem(
        "10.16.1.11", "9.0", "none", "11.4.0.106", cuda, (9, 0))
    assert "built for compute capability 9.0 (none), this GPU is 8.9" in compatibility_problem(
        "11.4.0.106", "9.0", "none", "11.4.0.106", cuda, (8, 9))
    assert compatibility_problem("11.4.0.106", "9.0", "ampere_plus", "11.4.0.106", cuda, (8, 9)) is None
    assert "run on CUDA devices" in compatibility_problem("11.4.0.106", "9.0", "none", "11.4.0.106", cpu, None)
    assert compatibility_problem("11.4.0.106", "9.0", "none", "11.4.0.106", cuda, (9, 0)) is None


@pytest.mark.skipif(HAS_TRT, reason="checks the refusal when TensorRT is absent")
def test_a_tensorrt_entry_is_refused_without_tensorrt_and_calls_fall_back(tmp_path):
    from builder.init_weights import init_weights
    from runtime import WanTransformer
    from runtime.integrity import weights_fingerprint
    from runtime.manifest import ExpertRecord, FileInfo, Manifest
    from runtime.weights import load_checkpoint

    from .conftest import make_entry

    config = get_preset("tiny-t2v")
    init_weights(config, tmp_path / "w", seed=1)
    ckpt = load_checkpoint(tmp_path / "w")
    fp = weights_fingerprint(ckpt.tensors, ckpt.files)
    shape = StaticShape(1, 1, 2, 2, 8)
    entry = make_entry(config, shape, "tensorrt", id="abcdef0123456789", weights_fingerprint=fp,
                       versions={"tensorrt": "11.4.0.106"},
                       device={"type": "cuda", "name": "H200", "compute_capability": "9.0"},
                       files={"engine.plan": FileInfo("0" * 64, 4)})
    (tmp_path / "e").mkdir()
    manifest = Manifest("t", {"main": ExpertRecord(str(tmp_path / "w"), fp, "diffusers", {})}, {entry.id: entry})
    (tmp_path / "e" / "manifest.json").write_bytes(manifest.to_bytes())
    model = WanTransformer.from_pretrained(tmp_path / "w", engines=tmp_path / "e")
    with torch.no_grad():
        model(torch.randn(1, 16, 1, 2, 2), torch.tensor([1.0]), torch.randn(1, 8, config.text_dim))
    assert model.last_route.backend == "eager" and "tensorrt is not installed" in model.last_route.reason
    [(refused_shape, reasons)] = model.engines.refused_shapes.items()
    assert refused_shape == shape and reasons == ["abcdef0123456789 (tensorrt): tensorrt is not installed "
                                                  "(pip install tensorrt on an NVIDIA GPU machine)"]


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT or not torch.cuda.is_available(), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_engine_end_to_end(tmp_path):
    from builder.build import build
    from builder.init_weights import init_weights
    from builder.profiles import load_profile
    from runtime import WanTransformer

    config = get_preset("tiny-t2v").replace(num_layers=8)
    init_weights(config, tmp_path / "w", seed=3)
    (tmp_path / "p.yaml").write_text("name: trt\nmodel: {weights: w}\nprecision: [bf16, fp8]\nbackends: [tensorrt]\n"
                                     "shapes:\n  - {frames: 9, height: 64, width: 96}\ntext_tokens: 64\n"
                                     "tensorrt: {strip_weights: true}\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=print)
    assert all(r.status == "built" for r in report.results), report.table()
    model = WanTransformer.from_pretrained(tmp_path / "w", torch.bfloat16, device="cuda", engines=tmp_path / "out")
    x = torch.randn(1, 16, 3, 8, 12, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model(x, torch.tensor([500.0], device="cuda"), torch.randn(1, 64, 32, device="cuda", dtype=torch.bfloat16))
    assert model.last_route.backend == "tensorrt"


def test_doctor_reports_this_machine():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "builder.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("python") and "torch        " in out and "ONNX Runtime" in out
    assert "its own copy of the weights" in out
    if not HAS_TRT:
        assert "TensorRT     not installed. On an NVIDIA GPU machine" in out and "pip install tensorrt-cu12" in out
        assert "tensorrt     no (tensorrt is not installed" in out
    if not torch.cuda.is_available():
        # from the backends' own rules: ONNX Runtime's CPU provider has no bf16, AOTInductor no FP8 on the CPU
        table = out.split("run here")[1].split("\n", 1)[1].split("\n\n")[0].strip().splitlines()
        rows = {line.split()[0]: line for line in table}
        assert set(rows) == {"tensorrt", "aoti", "inductor", "onnxruntime"}
        from .conftest import cpu_fp16_onnxruntime

        expected = ["fp32,", "fp16"] if cpu_fp16_onnxruntime() else ["fp32"]
        assert rows["onnxruntime"].split()[1:1 + len(expected)] == expected and "bf16" not in rows["onnxruntime"]
        assert "fp32, fp16, bf16" in rows["aoti"] and "fp8" not in rows["aoti"]


def test_tensorrt_entries_are_skipped_with_the_reason(tmp_path):
    from builder.build import build
    from builder.init_weights import init_weights
    from builder.profiles import load_profile

    init_weights(get_preset("tiny-t2v"), tmp_path / "w", seed=1)
    (tmp_path / "p.yaml").write_text("name: t\nmodel: {weights: w}\nprecision: [bf16, nvfp4]\nbackends: [tensorrt]\n"
                                     "shapes:\n  - {frames: 5, height: 32, width: 48}\n")
    if HAS_TRT and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are here: the bf16 entry would build")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == ["skipped", "skipped"]
    expected = "tensorrt is not installed" if not HAS_TRT else "TensorRT builds need an NVIDIA GPU"
    assert all(expected in r.message for r in report.results), [r.message for r in report.results]


def test_tensorrt_build_path_around_the_library(tmp_path, monkeypatch):
    """The whole tensorrt entry (export, graph check, plan, load, parity, manifest) with TensorRT's two
    calls replaced: the plan writer records its inputs, the 'engine' runs the entry's ONNX in ONNX
    Runtime. FP32, so ONNX Runtime can run it on the CPU."""
    from builder.build import build
    from builder.init_weights import init_weights
    from builder.profiles import load_profile
    from runtime.backends.onnxruntime import OnnxRuntimeEngine

    from .conftest import stand_in_for_tensorrt

    seen = {}

    def ort_engine(entry, plan_path, constants):
        seen.update(onnx=Path(plan_path).with_name("model.onnx"))
        return OnnxRuntimeEngine(entry, Path(plan_path).with_name("model.onnx"), torch.device("cpu"), constants)

    stand_in_for_tensorrt(monkeypatch, ort_engine)
    init_weights(get_preset("tiny-i2v"), tmp_path / "w", seed=2)
    (tmp_path / "p.yaml").write_text("name: t\nmodel: {weights: w}\nprecision: fp32\nbackends: [tensorrt]\n"
                                     "shapes:\n  - {frames: 5, height: 32, width: 48}\n"
                                     "tensorrt: {optimization_level: 5, strip_weights: true}\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"], report.table()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entry = next(iter(manifest["entries"].values()))
    assert entry["backend"] == "tensorrt" and entry["versions"]["tensorrt"] == "11.4.0.106"
    assert entry["options"]["optimization_level"] == 5 and entry["options"]["strip_weights"] is True
    assert entry["build"]["tensorrt"]["plan_bytes"] == 13
    assert entry["build"]["onnx_check"]["attention"] == 6  # 2 layers x (self + text cross + image cross)
    assert set(entry["files"]) == {"engine.plan", "model.onnx", "model.onnx.data", "parity.json"}
    assert entry["parity"]["passed"] and entry["parity"]["relative"] < 1e-5
    assert seen["onnx"].name == "model.onnx"


def test_quantized_onnxruntime_entries_are_refused_everywhere():
    """ONNX Runtime has no FP8/NVFP4 path here: such entries are skipped on any device, not built as
    unquantized engines under a quantized label."""
    from builder.backends import builder
    from runtime.precision import Precision

    for precision, also in ((Precision.FP8, " and aoti"), (Precision.NVFP4, "")):
        for device in ("cpu", "cuda"):
            assert builder("onnxruntime").unavailable(precision, torch.device(device)) == (
                f"{precision.value} engines are built by the tensorrt backend{also}; onnxruntime builds fp32, fp16 "
                "and bf16")


@pytest.mark.parametrize("scale_error,recorded,status", [(0.07, 0.03, "ok"), (0.09, 0.03, "failed"),
                                                         (0.07, 0.0, "failed")])
def test_verify_bounds_quantized_tensorrt_entries_by_their_recorded_error(monkeypatch, scale_error, recorded,
                                                                          status):
    """verify compares a TensorRT fp8 engine with the unquantized model: allowed is the build's parity
    tolerance (5%) widened by the quantization error the build recorded, no more."""
    from builder import catalog
    from runtime.backends import backend

    from .conftest import make_entry

    config = get_preset("tiny-t2v")
    shape = StaticShape(1, 2, 4, 6, 16)
    model = StaticWanTransformer(config, shape).eval().to(torch.bfloat16)
    entry = make_entry(config, shape, "tensorrt", precision="fp8", quantization_error={"relative": recorded})

    def engine(entry, folder, device, model_at_shape):
        reference = StaticWanTransformer.from_parameters(config, shape, dict(model.named_parameters())).eval()
        return lambda *inputs: reference(*inputs) * (1 + scale_error)

    monkeypatch.setattr(backend("tensorrt"), "load", engine)
    result = catalog.rerun_parity(entry, Path("."), config, dict(model.named_parameters()), torch.device("cpu"))
    assert result.status == status, result.detail
