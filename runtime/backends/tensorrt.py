"""TensorRT plans (`engine.plan`) at run time, with torch tensors.

Before deserializing, the manifest's TensorRT version and compute capability are compared with this
machine's and a mismatch is refused with the reason (the front then falls back). A plan TensorRT
will not deserialize (`None`) is refused with the logger's text. Weight-stripped plans are refitted
at load from the entry's ONNX weights (`OnnxParserRefitter`). Inputs and the output are bound by
name to torch tensors and the engine runs with `execute_async_v3` on the current torch stream; with
`cuda_graphs` the enqueue is captured once into a CUDA graph over static buffers and replayed.
`release()` frees the engine's device memory (for two-expert models short of memory).

Written from NVIDIA's documented API; TensorRT cannot be installed on the machines this project is
built and tested on, so this path has not run on hardware (README, TensorRT section).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..integrity import read_verified
from ..manifest import FP4_DATA, ONNX_DATA, ONNX_FILE, PLAN_FILE, Entry, entry_file
from ..precision import Precision
from . import Backend, Engine

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8}


class EngineRefused(RuntimeError):
    """This machine cannot use the plan; the message says why."""


def compatibility_problem(built_with: str | None, built_for: str | None, portable: bool, trt_version: str | None,
                          device: torch.device, capability: tuple[int, int] | None) -> str | None:
    """Why this TensorRT and GPU cannot run a plan built with TensorRT `built_with` for compute
    capability `built_for` (checked before deserializing), or None."""
    if built_with != trt_version:
        return (f"built with TensorRT {built_with}, this machine has {trt_version or 'none'} "
                "(plans need the exact version)")
    if torch.device(device).type != "cuda" or capability is None:
        return f"TensorRT plans run on CUDA devices, the model is on {torch.device(device).type}"
    here = f"{capability[0]}.{capability[1]}"
    if built_for != here and not portable:
        return f"built for compute capability {built_for}, this GPU is {here}"
    return None


def make_logger(trt):
    """A TensorRT ILogger that keeps every message (the only place TensorRT says why it failed)."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):
            self.messages.append((str(severity).rsplit(".", 1)[-1], msg))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR")]

        def warnings(self) -> list[str]:
            return [m for s, m in self.messages if s == "WARNING"]

    return Logger()


class TensorRTEngine(Engine):
    """A plan from `plan` (its bytes, already checked); `plan_path` names it in messages and locates
    the ONNX weights a stripped plan is refitted from."""

    def __init__(self, entry: Entry, plan_path: Path, plan: bytes, device: torch.device,
                 constants: Mapping[str, torch.Tensor] | None, *, built_with: str | None, built_for: str | None,
                 options: Mapping[str, object]):
        import tensorrt as trt

        super().__init__(entry, device)
        capability = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None
        portable = options.get("hardware_compatibility", "none") != "none"
        problem = compatibility_problem(built_with, built_for, portable, trt.__version__, self.device, capability)
        if problem:
            raise EngineRefused(problem)
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineRefused(f"TensorRT could not deserialize {plan_path}: "
                                + ("; ".join(self._logger.errors()) or "no reason logged"))
        if options.get("strip_weights", False):
            self._refit(trt, Path(plan_path).with_name(ONNX_FILE))
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        # Inputs beyond the call's own are the shape tables, fed from the model's tensors.
        self._inputs = [i.name for i in entry.inputs]
        tables = [n for n in inputs if n not in self._inputs]
        missing = [n for n in tables if constants is None or n not in constants]
        if missing or sorted(set(inputs) - set(tables)) != sorted(self._inputs):
            raise EngineRefused(f"{plan_path}: plan inputs {inputs} do not match the entry's {self._inputs} "
                                "plus shape tables")
        self._tables = {n: constants[n].to(self.device).contiguous() for n in tables}
        self._out_shape = tuple(self.engine.get_tensor_shape(self._output))
        self._out_dtype = TORCH_DTYPES[str(self.engine.get_tensor_dtype(self._output)).rsplit(".", 1)[-1]]
        for name, t in self._tables.items():
            self.context.set_tensor_address(name, t.data_ptr())
        self._cuda_graphs = bool(options.get("cuda_graphs", False))
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: list[torch.Tensor] = []
        self._static_out: torch.Tensor | None = None

    def _refit(self, trt, onnx_path: Path) -> None:
        """Put the weights back into a weight-stripped plan, from the entry's ONNX weights file."""
        refitter = trt.Refitter(self.engine, self._logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self._logger)
        if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            raise EngineRefused(f"refitting the weight-stripped plan from {onnx_path} failed: "
                                + ("; ".join(self._logger.errors()) or "no reason logged"))

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed: " + "; ".join(self._logger.errors()[-3:]))

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self._cuda_graphs:
            return self._replay(inputs)
        stream = torch.cuda.current_stream(self.device)
        # Keep the inputs alive until the stream has consumed them (some are the base class's copies).
        self._keep = list(inputs)
        for name, t in zip(self._inputs, self._keep):
            self.context.set_tensor_address(name, t.data_ptr())
        out = torch.empty(self._out_shape, dtype=self._out_dtype, device=self.device)
        self.context.set_tensor_address(self._output, out.data_ptr())
        self._enqueue(stream)
        return out

    def _replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self._graph is None:
            self._static_in = [t.clone() for t in inputs]
            self._static_out = torch.empty(self._out_shape, dtype=self._out_dtype, device=self.device)
            for name, t in zip(self._inputs, self._static_in):
                self.context.set_tensor_address(name, t.data_ptr())
            self.context.set_tensor_address(self._output, self._static_out.data_ptr())
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._enqueue(side)  # the first enqueue does TensorRT's lazy setup outside the capture
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, stream=side):
                self._enqueue(side)
        for buffer, t in zip(self._static_in, inputs):
            buffer.copy_(t)
        self._graph.replay()
        # A copy: diffusers keeps the cond output while the uncond call reuses the static buffer.
        return self._static_out.clone()

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
        fp4 = (FP4_DATA,) if entry.options.get("strip_weights", False) and entry.precision == "nvfp4" else ()
        return (PLAN_FILE, *refit, *fp4)

    def runs(self, precision: Precision, device: torch.device, capability: tuple[int, int] | None) -> str | None:
        if torch.device(device).type != "cuda":
            return f"TensorRT plans run on CUDA devices, the model is on {torch.device(device).type}"
        return super().runs(precision, device, capability)

    def compatibility(self, entry: Entry, device: torch.device, capability: tuple[int, int] | None,
                      versions: Mapping[str, str | None]) -> str | None:
        portable = entry.options.get("hardware_compatibility", "none") != "none"
        return compatibility_problem(entry.versions.get("tensorrt"), entry.device.get("compute_capability"), portable,
                                     versions.get("tensorrt"), device, capability) \
            or self.runs(Precision(entry.precision), device, capability)

    def load(self, entry: Entry, folder: Path, device: torch.device, model) -> Engine:
        constants = model.constants()
        path = entry_file(folder, entry, PLAN_FILE)
        info = entry.files[PLAN_FILE]
        plan = read_verified(path, info.sha256, info.bytes)
        return TensorRTEngine(entry, path, plan, device, constants, built_with=entry.versions.get("tensorrt"),
                              built_for=entry.device.get("compute_capability"), options=entry.options)
