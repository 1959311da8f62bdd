"""ONNX Runtime sessions over `model.onnx` (+ `model.onnx.data`).

On the CPU, tensors cross as numpy views (no copy for contiguous fp32/fp16). On a CUDA device
with onnxruntime-gpu, inputs and the output are bound in place with IOBinding, so nothing moves
through the host. (The CUDA path is written from ONNX Runtime's documented API and has not been
run here: the test machines have the CPU package only.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

_ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}  # TensorProto element types


class OnnxRuntimeEngine:
    def __init__(self, path: Path, device: torch.device, constants: Mapping[str, torch.Tensor] | None = None):
        import onnxruntime as ort

        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        names = [i.name for i in self._session.get_inputs()]
        # Inputs beyond the call's own are the shape tables, fed from the model's tensors.
        self._tables = [n for n in names if constants is not None and n in constants]
        self._inputs = [n for n in names if n not in self._tables]
        self._names = self._inputs + self._tables
        self._table_values = [constants[n].to(self.device) for n in self._tables] if constants else []
        self._output = self._session.get_outputs()[0]
        self._output_shape = tuple(int(d) for d in self._output.shape)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        inputs = tuple(inputs) + tuple(self._table_values)
        if self.device.type != "cuda":
            feeds = {name: t.detach().contiguous().numpy() for name, t in zip(self._names, inputs)}
            return torch.from_numpy(self._session.run([self._output.name], feeds)[0])
        binding = self._session.io_binding()
        # contiguous copies (an expanded timestep is not) must outlive the run: ONNX Runtime reads
        # them through raw pointers, and a freed block goes straight back to torch's allocator
        bound = [t.contiguous() for t in inputs]
        for name, t in zip(self._names, bound):
            binding.bind_input(name, "cuda", self.device.index or 0, _ONNX_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        out = torch.empty(self._output_shape, dtype=inputs[0].dtype, device=self.device)
        binding.bind_output(self._output.name, "cuda", self.device.index or 0, _ONNX_TYPES[out.dtype],
                            tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        self._session.run_with_iobinding(binding)
        return out
