"""TensorRT plans (`engine.plan`) at run time, with torch tensors.

Before deserializing, the manifest's TensorRT version, compute capability, hardware-compatibility
level and precision are compared with this machine's (`compatibility_problem`) and a mismatch is
refused with the reason (the front then falls back). A plan TensorRT will not deserialize (`None`) is
refused with the logger's text. Then, all on the engine's own device (`torch.cuda.device`):
- weight-stripped plans are refitted from the entry's ONNX weights (`OnnxParserRefitter`; its own
  parse errors are reported); refittable plans (`tensorrt.refittable`, REFIT_INDIVIDUAL on every
  weight) are refitted from the model's own tensors instead (`Refitter.set_named_weights` with
  device pointers), so they serve any weights of their layout, and `update_weights` refits only
  the tensors that changed (a LoRA swap) in place;
- plans built for weight streaming get their budget (`weight_streaming_budget_v2`) before the
  execution context exists: TensorRT's automatic budget, or one from the profile or the call
  (`weight_streaming_budget_gb`); TensorRT's default would keep every weight resident;
- inputs and the output are bound by name, from the manifest's input names;
- `execute_async_v3` runs on a private stream ordered after the caller's stream and before it
  again (the legacy default stream costs TensorRT extra synchronisations); tensors used on it are
  recorded on it, so torch's allocator does not reuse them early;
- with `cuda_graphs` the enqueue is captured once into a CUDA graph over static buffers and replayed
  (refused together with weight streaming, which makes enqueueV3 synchronous and uncapturable).
`release()` frees the engine's device memory.

Written from NVIDIA's documented API; TensorRT cannot be installed on the machines this project is
built and tested on, so this path has not run on hardware (README, TensorRT section).
"""

from __future__ import annotations

import logging
from collections import deque
from importlib import metadata
from pathlib import Path
from typing import Mapping

import torch

from ..integrity import read_verified
from ..manifest import FP4_DATA, INT8_DATA, ONNX_DATA, ONNX_FILE, PLAN_FILE, WEIGHT_PREFIX, Entry, entry_file
from ..precision import Precision
from . import Backend, Engine

log = logging.getLogger("wan_build.runtime")

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8}
TRT_DTYPES_BY_NAME = {torch.float32: "FLOAT", torch.float16: "HALF", torch.bfloat16: "BF16"}
HARDWARE_LEVELS = ("none", "same_compute_capability", "ampere_plus")
LOGGED = ("INTERNAL_ERROR", "ERROR", "WARNING")  # what the logger keeps (not the verbose build chatter)


class EngineRefused(RuntimeError):
    """This machine cannot use the plan; the message says why."""


class CudaCalls:
    """Every CUDA call the engine makes, in one place (tests replace it with a recording stand-in,
    since no GPU is there to observe)."""

    device = staticmethod(torch.cuda.device)
    current_device = staticmethod(torch.cuda.current_device)
    capability = staticmethod(torch.cuda.get_device_capability)
    name = staticmethod(torch.cuda.get_device_name)
    current_stream = staticmethod(torch.cuda.current_stream)
    stream = staticmethod(torch.cuda.Stream)
    use_stream = staticmethod(torch.cuda.stream)
    graph = staticmethod(torch.cuda.graph)
    new_graph = staticmethod(torch.cuda.CUDAGraph)

    @staticmethod
    def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
        return tensor.to(device).contiguous()

    @staticmethod
    def empty(shape, dtype, device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def record(tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)


CUDA = CudaCalls()


def trt_version() -> str | None:
    """The installed TensorRT's version, from the module when it imports, else its package metadata
    (one source for the build, the manifest and the check at load)."""
    try:
        import tensorrt as trt

        return trt.__version__
    except ImportError:
        pass
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def compatibility_problem(built_with: str | None, built_for: str | None, level: str, trt_version: str | None,
                          device: torch.device, capability: tuple[int, int] | None,
                          precision: str = "bf16") -> str | None:
    """Why this TensorRT and GPU cannot run a plan built with TensorRT `built_with` for compute
    capability `built_for` at hardware-compatibility `level` (checked before deserializing), or None.

    none and same_compute_capability: the compute capability must be the one built for (same_compute
    _capability lets the plan move between GPU models of it); ampere_plus: 8.0 or newer. FP8 (8.9) and
    FP4 (10.0) kernels keep their own minimums at every level."""
    if built_with != trt_version:
        return (f"built with TensorRT {built_with}, this machine has {trt_version or 'none'} "
                "(plans need the exact version)")
    if torch.device(device).type != "cuda" or capability is None:
        return f"TensorRT plans run on CUDA devices, the model is on {torch.device(device).type}"
    if level not in HARDWARE_LEVELS:
        return f"hardware_compatibility {level!r} is not one of {', '.join(HARDWARE_LEVELS)}"
    here = f"{capability[0]}.{capability[1]}"
    if level == "ampere_plus":
        if tuple(capability) < (8, 0):
            return f"built for Ampere and newer (compute capability 8.0+), this GPU is {here}"
    elif built_for != here:
        return f"built for compute capability {built_for} ({level}), this GPU is {here}"
    return Precision(precision).hardware_problem(device, capability)


def gpu_model_warning(built_on: str | None, here: str | None, level: str) -> str | None:
    """At level none a plan is tuned for the GPU model it was built on; another model of the same
    compute capability runs it, possibly slower (TensorRT warns too)."""
    if level == "none" and built_on and here and built_on != here:
        return (f"built on {built_on}, running on {here} (same compute capability): it runs, but its kernels "
                "were chosen for the other GPU; rebuild here for full speed")
    return None


def make_logger(trt, keep: int = 200):
    """A TensorRT ILogger keeping the last `keep` errors and warnings (the only place TensorRT says why
    it failed); info and verbose messages are dropped, not accumulated."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: deque[tuple[str, str]] = deque(maxlen=keep)

        def log(self, severity, msg):
            level = str(severity).rsplit(".", 1)[-1]
            if level in LOGGED:
                self.messages.append((level, msg))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR")]

        def warnings(self) -> list[str]:
            return [m for s, m in self.messages if s == "WARNING"]

    return Logger()


def parser_errors(parser) -> list[str]:
    """An ONNX parser's or parser refitter's own errors, with node and operator."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        out.append(f"node {e.node_name() or '?'} ({e.node_operator() or '?'}): {e.desc()}")
    return out


class TensorRTEngine(Engine):
    """A plan from `plan` (its bytes, already checked); `plan_path` names it in messages and locates
    the ONNX weights a stripped plan is refitted from."""

    def __init__(self, entry: Entry, plan_path: Path, plan: bytes, device: torch.device,
                 constants: Mapping[str, torch.Tensor] | None, *, built_with: str | None, built_for: str | None,
                 options: Mapping[str, object], streaming_budget_gb: float | None = None,
                 refit_from: str = "model"):
        """`refit_from`: where a refittable plan takes its weights, "model" (`constants`, what the
        runtime does) or "file" (the entry's ONNX weights, what the build's parity run does)."""
        import tensorrt as trt

        super().__init__(entry, device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", CUDA.current_device())
        capability = tuple(CUDA.capability(self.device)) if self.device.type == "cuda" else None
        level = str(options.get("hardware_compatibility", "none"))
        problem = compatibility_problem(built_with, built_for, level, trt.__version__, self.device, capability,
                                        entry.precision)
        streaming = bool(options.get("weight_streaming", False))
        self._cuda_graphs = bool(options.get("cuda_graphs", False))
        if not problem and streaming and self._cuda_graphs:
            problem = ("cuda_graphs with weight_streaming: TensorRT makes enqueueV3 synchronous and uncapturable "
                       "while it streams weights; build it with one of the two")
        if problem:
            raise EngineRefused(problem)
        warning = gpu_model_warning(entry.device.get("name"), CUDA.name(self.device), level)
        if warning:
            log.warning("engine %s: %s", entry.id, warning)
        self._logger = make_logger(trt)
        with CUDA.device(self.device):  # deserialize, refit, context and enqueue bind to the current device
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise EngineRefused(f"TensorRT could not deserialize {plan_path}: "
                                    + ("; ".join(self._logger.errors()) or "no reason logged"))
            self._refitter = None
            self._handed: dict[str, torch.Tensor] = {}
            if entry.front_weights and refit_from == "model":
                self._refit_from_model(trt, constants or {})
            elif options.get("strip_weights", False):
                self._refit(trt, Path(plan_path).with_name(ONNX_FILE))
            if streaming:
                self.streaming_budget = self._set_streaming_budget(
                    streaming_budget_gb if streaming_budget_gb is not None else options.get("weight_streaming_budget_gb"))
            self.context = self.engine.create_execution_context()
            self._stream = CUDA.stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # Bound by name, never by position: TensorRT documents no order of its I/O tensors. Inputs
        # beyond the call's own are the shape tables, fed from the model's tensors.
        self._inputs = [i.name for i in entry.inputs]
        # Outputs in the entry's order (a stage engine has several); a plan of one output serves an entry
        # that names it otherwise.
        wanted = [o.name for o in entry.outputs]
        if wanted and sorted(wanted) == sorted(outputs):
            self._outputs = wanted
        elif len(outputs) == 1 and len(wanted) <= 1:
            self._outputs = outputs
        else:
            self._outputs = []
        tables = [n for n in inputs if n not in self._inputs]
        missing = [n for n in tables if constants is None or n not in constants]
        if missing or sorted(set(inputs) - set(tables)) != sorted(self._inputs) or not self._outputs:
            raise EngineRefused(f"{plan_path}: plan inputs {inputs} and outputs {outputs} do not match the entry's "
                                f"{self._inputs} plus shape tables and outputs {wanted}")
        self._tables = {n: CUDA.to_device(constants[n], self.device) for n in tables}
        self._out_specs = [(tuple(self.engine.get_tensor_shape(n)),
                            TORCH_DTYPES[str(self.engine.get_tensor_dtype(n)).rsplit(".", 1)[-1]]) for n in self._outputs]
        for name, t in self._tables.items():
            self.context.set_tensor_address(name, t.data_ptr())
        self._graph = None
        self._static_in: list[torch.Tensor] = []
        self._static_out: list[torch.Tensor] = []

    def _refit(self, trt, onnx_path: Path) -> None:
        """Put the weights back into a weight-stripped plan, from the entry's ONNX weights file."""
        refitter = trt.Refitter(self.engine, self._logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self._logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            raise EngineRefused(f"refitting the weight-stripped plan from {onnx_path} failed: "
                                + ("; ".join(parser_errors(parser_refitter) or self._logger.errors())
                                   or "no reason logged"))
        if not refitter.refit_cuda_engine():
            raise EngineRefused(f"refitting the weight-stripped plan from {onnx_path} failed: "
                                + ("; ".join(self._logger.errors()) or "no reason logged"))

    def _refit_from_model(self, trt, weights: Mapping[str, torch.Tensor], only: set[str] | None = None) -> None:
        """Refit the plan's refittable weights from the model's tensors (all of them, or `only`)."""
        if self._refitter is None:
            self._refitter = trt.Refitter(self.engine, self._logger)
        names = [n for n in self._refitter.get_all_weights() if only is None or n in only]
        kept = {}
        for name in names:
            tensor = weights.get(name[len(WEIGHT_PREFIX):]) if name.startswith(WEIGHT_PREFIX) else None
            if tensor is None:
                raise EngineRefused(f"the plan's refittable weight {name} is not a tensor of the model")
            if tensor.dtype not in TRT_DTYPES_BY_NAME:
                raise EngineRefused(f"the model's {name} is {tensor.dtype}; refittable plans take "
                                    f"{', '.join(map(str, TRT_DTYPES_BY_NAME))} weights")
            tensor = CUDA.to_device(tensor.detach(), self.device).contiguous()
            kept[name] = tensor
            dtype = getattr(trt.DataType, TRT_DTYPES_BY_NAME[tensor.dtype])
            ok = self._refitter.set_named_weights(name, trt.Weights(dtype, tensor.data_ptr(), tensor.numel()),
                                                  trt.TensorLocation.DEVICE)
            if ok is False:
                raise EngineRefused(f"TensorRT refused the model's {name} {list(tensor.shape)} {tensor.dtype}: "
                                    + ("; ".join(self._logger.errors()) or "no reason logged"))
        missing = list(self._refitter.get_missing_weights())
        if missing:
            raise EngineRefused(f"refitting from the model: TensorRT still misses {', '.join(missing[:4])}")
        if not self._refitter.refit_cuda_engine():
            raise EngineRefused("refitting from the model's tensors failed: "
                                + ("; ".join(self._logger.errors()) or "no reason logged"))
        self._handed.update(kept)  # TensorRT has read them; kept until the next refit as a precaution

    def update_weights(self, weights: Mapping[str, torch.Tensor]) -> bool:
        """A refittable plan refits the tensors that changed (by identity) in place; others reload."""
        if self._refitter is None:
            return False
        import tensorrt as trt

        changed = {WEIGHT_PREFIX + n for n, t in weights.items()
                   if WEIGHT_PREFIX + n in self._handed and t.data_ptr() != self._handed[WEIGHT_PREFIX + n].data_ptr()}
        if changed:
            with CUDA.device(self.device):
                self._refit_from_model(trt, weights, changed)
        return True

    def _set_streaming_budget(self, budget_gb) -> int:
        """Bytes of weights kept on the GPU: TensorRT's automatic budget unless one is given."""
        if budget_gb is None or budget_gb == "auto":
            budget = int(self.engine.get_weight_streaming_automatic_budget())
        else:
            budget = max(0, min(int(float(budget_gb) * 1e9), int(self.engine.streamable_weights_size)))
        self.engine.weight_streaming_budget_v2 = budget
        log.info("engine %s streams weights: %.2f of %.2f GB resident", self.entry.id, budget / 1e9,
                 self.engine.streamable_weights_size / 1e9)
        return budget

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed: " + "; ".join(self._logger.errors()[-3:]))

    def run(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output; a tuple of them for an entry of several (a stage)."""
        caller = CUDA.current_stream(self.device)
        with CUDA.device(self.device):
            if self._cuda_graphs:
                return self._replay(inputs, caller)
            self._stream.wait_stream(caller)  # the inputs are ready on the caller's stream
            for name, t in zip(self._inputs, inputs):
                self.context.set_tensor_address(name, t.data_ptr())
                CUDA.record(t, self._stream)  # not reused before our stream is done with it
            outs = [CUDA.empty(shape, dtype, self.device) for shape, dtype in self._out_specs]
            for name, out in zip(self._outputs, outs):
                CUDA.record(out, self._stream)
                self.context.set_tensor_address(name, out.data_ptr())
            self._enqueue(self._stream)
            caller.wait_stream(self._stream)  # the caller sees the outputs only when they are written
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _replay(self, inputs: tuple[torch.Tensor, ...], caller: torch.cuda.Stream) -> torch.Tensor:
        if self._graph is None:
            self._static_in = [t.clone() for t in inputs]
            self._static_out = [CUDA.empty(shape, dtype, self.device) for shape, dtype in self._out_specs]
            for name, t in zip(self._inputs, self._static_in):
                self.context.set_tensor_address(name, t.data_ptr())
            for name, out in zip(self._outputs, self._static_out):
                self.context.set_tensor_address(name, out.data_ptr())
            self._stream.wait_stream(caller)
            with CUDA.use_stream(self._stream):
                self._enqueue(self._stream)  # the first enqueue does TensorRT's lazy setup outside the capture
            self._graph = CUDA.new_graph()
            with CUDA.graph(self._graph, stream=self._stream):
                self._enqueue(self._stream)
            caller.wait_stream(self._stream)
        for buffer, t in zip(self._static_in, inputs):
            buffer.copy_(t)
        self._graph.replay()
        # Copies: diffusers keeps the cond output while the uncond call reuses the static buffers.
        outs = [out.clone() for out in self._static_out]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def release(self) -> None:
        """Free the execution context and engine (device memory) now."""
        self._graph = None
        self.context = None
        self.engine = None


class TensorRTBackend(Backend):
    name = "tensorrt"
    library = "tensorrt"
    install_hint = "pip install tensorrt on an NVIDIA GPU machine"
    version_keys = ("tensorrt",)

    def required_files(self, entry: Entry) -> tuple[str, ...]:
        refit = (ONNX_FILE, ONNX_DATA) if entry.options.get("strip_weights", False) else ()
        # the quantized weights a refit reads: NVFP4's, and SmoothQuant int8's where the entry has them
        quantized = tuple(f for f in (FP4_DATA, INT8_DATA) if refit and (f in entry.files or
                                                                         (f == FP4_DATA and entry.precision == "nvfp4")))
        return (PLAN_FILE, *refit, *quantized)

    def runs(self, precision: Precision, device: torch.device, capability: tuple[int, int] | None) -> str | None:
        if torch.device(device).type != "cuda":
            return f"TensorRT plans run on CUDA devices, the model is on {torch.device(device).type}"
        if precision == Precision.INT8 and capability is not None and tuple(capability) < (7, 5):
            return "int8 plans need int8 tensor cores: compute capability 7.5 (Turing) or newer"
        return super().runs(precision, device, capability)

    def compatibility(self, entry: Entry, device: torch.device, capability: tuple[int, int] | None,
                      versions: Mapping[str, str | None]) -> str | None:
        return compatibility_problem(entry.versions.get("tensorrt"), entry.device.get("compute_capability"),
                                     str(entry.options.get("hardware_compatibility", "none")), trt_version(), device,
                                     capability, entry.precision)

    def load(self, entry: Entry, folder: Path, device: torch.device, model, options: Mapping | None = None) -> Engine:
        constants = model.constants()
        path = entry_file(folder, entry, PLAN_FILE)
        info = entry.files[PLAN_FILE]
        plan = read_verified(path, info.sha256, info.bytes)
        return TensorRTEngine(entry, path, plan, device, constants, built_with=entry.versions.get("tensorrt"),
                              built_for=entry.device.get("compute_capability"), options=entry.options,
                              streaming_budget_gb=(options or {}).get("weight_streaming_budget_gb"))
