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

from ..manifest import ONNX_FILE, compatibility_problem

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8}


class EngineRefused(RuntimeError):
    """This machine cannot use the plan; the message says why."""


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


class TensorRTEngine:
    def __init__(self, plan_path: Path, device: torch.device, constants: Mapping[str, torch.Tensor] | None,
                 *, built_with: str | None, built_for: str | None, options: Mapping[str, object]):
        import tensorrt as trt

        self.device = torch.device(device)
        capability = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None
        portable = options.get("hardware_compatibility", "none") != "none"
        problem = compatibility_problem(built_with, built_for, portable, trt.__version__, self.device, capability)
        if problem:
            raise EngineRefused(problem)
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
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
        self._tables = {n: constants[n].to(self.device).contiguous() for n in inputs
                        if constants is not None and n in constants}
        self._inputs = [n for n in inputs if n not in self._tables]
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

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self._cuda_graphs:
            return self._replay(inputs)
        stream = torch.cuda.current_stream(self.device)
        # Keep contiguous copies alive until the stream has consumed them.
        self._keep = [t.contiguous() for t in inputs]
        for name, t in zip(self._inputs, self._keep):
            self.context.set_tensor_address(name, t.data_ptr())
        out = torch.empty(self._out_shape, dtype=self._out_dtype, device=self.device)
        self.context.set_tensor_address(self._output, out.data_ptr())
        self._enqueue(stream)
        return out

    def _replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self._graph is None:
            self._static_in = [t.contiguous().clone() for t in inputs]
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
