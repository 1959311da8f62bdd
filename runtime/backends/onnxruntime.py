"""ONNX Runtime sessions over `model.onnx` (+ `model.onnx.data`).

On the CPU, tensors cross as numpy views (no copy: the `Engine` base has made them contiguous). On a
CUDA device with onnxruntime-gpu, inputs and the output are bound in place with IOBinding, so
nothing moves through the host. (The CUDA path is written from ONNX Runtime's documented API and
has not been run here: the test machines have the CPU package only.)

Weights: entries built with named weights (`options.weights == "front"`) run on the model's own
tensors, handed to the session by name (`SessionOptions.add_initializer`, zero-copy through DLPack),
so they serve any weights of the recorded layout (a fine-tune, merged LoRAs) and hold no second copy
from the file. ONNX Runtime's own constant folding is off for them: it folds from the initializers
stored in the file, not from the ones handed in (measured with onnxruntime 1.32: folded Transposes
kept the file's weights), so it would mix the two. Its Transpose-into-Gemm fusions do not copy, and
the speed was measured equal. Older entries read their weights from `model.onnx.data`.

An ONNX graph runs no code of its own (no custom-op libraries are registered), so the file is read
by ONNX Runtime from the entry folder after its sha256 check.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Mapping

import torch

from ..manifest import ONNX_DATA, ONNX_FILE, WEIGHT_PREFIX, Entry, entry_file
from ..precision import ONNX_ELEMENT_TYPES, Precision
from ..static import SHAPE_TABLES
from . import Backend, Engine


def cuda_provider_problem() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)"
    return None


X86 = ("x86_64", "amd64", "i386", "i686", "x86")  # CPUs whose ONNX Runtime provider has no fp16 matmul


def ort_value(tensor: torch.Tensor):
    """An OrtValue over contiguous `tensor`'s memory (no copy); the caller keeps `tensor` alive."""
    import onnxruntime as ort

    if hasattr(ort.OrtValue, "from_dlpack"):
        return ort.OrtValue.from_dlpack(tensor)
    if tensor.device.type != "cpu":
        raise RuntimeError("this onnxruntime cannot take GPU tensors by pointer (OrtValue.from_dlpack); "
                           "upgrade onnxruntime-gpu")
    if tensor.dtype == torch.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(tensor.view(torch.int16).numpy(),
                                                               ONNX_ELEMENT_TYPES[torch.bfloat16])
    return ort.OrtValue.ortvalue_from_numpy(tensor.numpy())


class OnnxRuntimeEngine(Engine):
    """A session over an ONNX file. `entry` gives the call's inputs; inputs of the graph beyond them
    are the shape tables, fed from `constants`."""

    def __init__(self, entry: Entry, path: Path, device: torch.device, constants: Mapping[str, torch.Tensor],
                 prepack: bool = True, arena: bool = True):
        """`prepack=False` keeps ONNX Runtime from repacking the weights into a second copy (slower
        matmuls, one copy less); `arena=False` returns what a run allocated when it ends (on the CPU,
        where fp16 graphs cast their weights to fp32 at run time, the arena would keep those casts:
        two more copies). The build's parity session uses both; served sessions neither."""
        import onnxruntime as ort

        super().__init__(entry, device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if not arena:
            options.enable_cpu_mem_arena = False
            options.enable_mem_pattern = False
        if self.device.type == "cuda":
            problem = cuda_provider_problem()
            if problem:
                raise RuntimeError(problem)
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        extra = {}
        self._handed: list = []  # the OrtValues handed in; the session reads their memory
        if entry.options.get("weights") == "front":
            for name, tensor in constants.items():
                if name not in SHAPE_TABLES:
                    tensor = tensor.detach().to(self.device).contiguous()
                    value = ort_value(tensor)
                    self._handed.append((tensor, value))
                    options.add_initializer(WEIGHT_PREFIX + name, value)
            extra["disabled_optimizers"] = ["ConstantFolding"]
        self._session = ort.InferenceSession(str(path), options, providers=providers, **extra)
        names = [i.name for i in self._session.get_inputs()]
        call = [i.name for i in entry.inputs]
        self._tables = [n for n in names if n not in call]
        missing = [n for n in self._tables if n not in constants]
        if missing or [n for n in names if n in call] != call:
            raise RuntimeError(f"{path}: graph inputs {names} do not match the entry's {call} plus tables")
        self._names = call + self._tables
        self._table_values = [constants[n].to(self.device).contiguous() for n in self._tables]
        self._outputs = [o.name for o in self._session.get_outputs()]
        if [o.name for o in entry.outputs] != self._outputs:
            raise RuntimeError(f"{path}: graph outputs {self._outputs} do not match the entry's "
                               f"{[o.name for o in entry.outputs]}")
        self._output_specs = [(tuple(o.shape), getattr(torch, o.dtype)) for o in entry.outputs]

    def run(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output; a tuple of them for an entry of several (a stage)."""
        inputs = tuple(inputs) + tuple(self._table_values)
        if self.device.type != "cuda":
            feeds = {name: t.detach().numpy() for name, t in zip(self._names, inputs)}
            outs = tuple(torch.from_numpy(o) for o in self._session.run(self._outputs, feeds))
            return outs[0] if len(outs) == 1 else outs
        binding = self._session.io_binding()
        index = self.device.index or 0
        for name, t in zip(self._names, inputs):  # contiguous tensors the caller keeps alive until we return
            binding.bind_input(name, "cuda", index, ONNX_ELEMENT_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        outs = tuple(torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self._output_specs)
        for name, out in zip(self._outputs, outs):
            binding.bind_output(name, "cuda", index, ONNX_ELEMENT_TYPES[out.dtype], tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        self._session.run_with_iobinding(binding)
        return outs[0] if len(outs) == 1 else outs


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    library = "onnxruntime"
    install_hint = "pip install onnxruntime (or onnxruntime-gpu)"

    def required_files(self, entry: Entry) -> tuple[str, ...]:
        return (ONNX_FILE, ONNX_DATA)

    def runs(self, precision: Precision, device: torch.device, capability: tuple[int, int] | None) -> str | None:
        if precision.quantized:
            return (f"{precision.value} engines are built by the tensorrt backend"
                    + (" and aoti" if precision in (Precision.FP8, Precision.INT8) else "") + "; onnxruntime builds fp32, fp16 and bf16")
        if torch.device(device).type == "cuda":
            return cuda_provider_problem() if self.missing_library() is None else None
        if precision == Precision.BF16:
            return "ONNX Runtime's CPU provider has no bf16 kernels; build and run it on a GPU machine"
        if precision == Precision.FP16 and platform.machine().lower() in X86:
            return ("ONNX Runtime's x86 CPU provider runs fp16 graphs in fp32 (it casts every weight: more memory "
                    "than the fp32 entry, no speed gained); build fp32 for the CPU, fp16 for a GPU")
        return None

    def load(self, entry: Entry, folder: Path, device: torch.device, model, options: Mapping | None = None) -> Engine:
        constants = model.constants()
        return OnnxRuntimeEngine(entry, entry_file(folder, entry, ONNX_FILE), device, constants)
