"""`wan-build doctor`: what this machine has, and which backends and precisions it can build and run.

The last table loops over the backend registries: each backend says why it cannot build
(`builder.backends`) or run (`runtime.backends`) a precision here, so doctor and the build agree.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil

import torch

from runtime.backends import registry as runtime_backends
from runtime.manifest import capability_of, tool_versions
from runtime.precision import Precision

from .backends import registry as build_backends

TRT_INSTALL = ("not installed. On an NVIDIA GPU machine that can reach NVIDIA's package index: "
               "pip install tensorrt-cu12 (CUDA 12) or tensorrt-cu13 (CUDA 13); the PyPI packages download "
               "the libraries from pypi.nvidia.com at install time")


def report() -> list[str]:
    versions = tool_versions()
    lines = [f"python       {platform.python_version()} on {platform.machine()}",
             f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}        {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
    else:
        lines.append("GPU          none visible to torch")
    trt_ok = importlib.util.find_spec("tensorrt") is not None
    lines.append(f"TensorRT     {versions['tensorrt'] if trt_ok else TRT_INSTALL}")
    providers = "not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        providers = f"{onnxruntime.__version__}: " + ", ".join(onnxruntime.get_available_providers())
    lines.append(f"ONNX Runtime {providers}")
    lines.append(f"ModelOpt     {versions['modelopt'] or 'not installed (pip install nvidia-modelopt; needed for FP8/NVFP4 TensorRT engines)'}")
    compiler = shutil.which('g++') or shutil.which('c++')
    lines.append(f"C++ compiler {compiler or 'none (AOTInductor builds need one)'}")
    lines.append("")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines.append(f"{'backend':12s} {'build here':40s} {'run here'} ({device.type})")
    for name, build, run in capabilities(device, compiler is not None):
        lines.append(f"{name:12s} {build:40s} {run}")
    lines.append("")
    lines.append("memory       every loaded tensorrt or onnxruntime engine holds its own copy of the weights on the "
                 "device (a 14B bf16 expert: 28.6 GB each; from_pretrained(max_loaded_engines=N) caps them, default "
                 "2); aoti and inductor engines run on the model's own tensors")
    return lines


def _summary(reasons: dict[str, str | None]) -> str:
    ok = [p for p, why in reasons.items() if why is None]
    if ok:
        return ", ".join(ok)
    first = next(iter(reasons.values()))
    return f"no ({first})" if len(set(reasons.values())) == 1 else "no"


def capabilities(device: torch.device, compiler: bool = True) -> list[tuple[str, str, str]]:
    """(backend, precisions it can build here, precisions it can run here) for each backend."""
    rows = []
    capability = capability_of(device)
    for name, b in build_backends().items():
        run_side = runtime_backends()[name]
        build = {p.value: b.unavailable(p, device) for p in Precision}
        if name == "aoti" and not compiler:
            build = dict.fromkeys(build, "needs a C++ compiler")
        run = {p.value: run_side.missing_library() or run_side.runs(p, device, capability) for p in Precision}
        rows.append((name, _summary(build), _summary(run)))
    return rows
