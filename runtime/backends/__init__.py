"""Engine backends: each loads one artifact and runs it on torch tensors.

Every backend module imports its library inside the functions that need it, so `import runtime`
works on a machine that has none of them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..manifest import AOTI_FILE, ONNX_FILE, PLAN_FILE, Entry

BACKENDS = ("tensorrt", "aoti", "onnxruntime")  # the runtime's default preference, fastest first

Engine = Callable[..., torch.Tensor]


def missing_library(backend: str) -> str | None:
    """Why `backend` cannot run on this machine at all, or None."""
    module = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "aoti": "torch._inductor"}[backend]
    if importlib.util.find_spec(module) is None:
        hint = {"onnxruntime": "pip install onnxruntime (or onnxruntime-gpu)",
                "tensorrt": "pip install tensorrt on an NVIDIA GPU machine"}.get(backend, "")
        return f"{module} is not installed" + (f" ({hint})" if hint else "")
    return None


def load_engine(entry: Entry, folder: Path, device: torch.device,
                constants: Mapping[str, torch.Tensor]) -> Engine:
    """Load `entry` from `folder/<id>/`. `constants` are the model's tensors (parameters and
    shape tables), for backends whose artifacts keep weights outside the engine."""
    path = Path(folder) / entry.id
    if entry.backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path / ONNX_FILE, device, constants)
    if entry.backend == "aoti":
        from .aoti import AOTIEngine

        return AOTIEngine(path / AOTI_FILE, constants)
    if entry.backend == "tensorrt":
        from .tensorrt import TensorRTEngine

        return TensorRTEngine(path / PLAN_FILE, device, constants, built_with=entry.versions.get("tensorrt"),
                              built_for=entry.device.get("compute_capability"),
                              options=entry.raw.get("tensorrt_options", {}))
    raise ValueError(f"unknown backend {entry.backend!r}")
