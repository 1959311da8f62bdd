"""`wan-build doctor`: what this machine has, and which backends and precisions it can build and run."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import torch

from runtime.manifest import tool_versions

TRT_INSTALL = ("not installed. On an NVIDIA GPU machine that can reach NVIDIA's package index: "
               "pip install tensorrt-cu12 (CUDA 12) or tensorrt-cu13 (CUDA 13); the PyPI packages download "
               "the libraries from pypi.nvidia.com at install time")


def report() -> list[str]:
    versions = tool_versions()
    lines = [f"python       {platform.python_version()} on {platform.machine()}",
             f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    cc = None
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}        {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
        cc = torch.cuda.get_device_capability(0)
    else:
        lines.append("GPU          none visible to torch")
    trt = versions["tensorrt"]
    trt_ok = importlib.util.find_spec("tensorrt") is not None
    lines.append(f"TensorRT     {trt if trt_ok else TRT_INSTALL}")
    providers = "not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        providers = f"{onnxruntime.__version__}: " + ", ".join(onnxruntime.get_available_providers())
    lines.append(f"ONNX Runtime {providers}")
    lines.append(f"ModelOpt     {versions['modelopt'] or 'not installed (pip install nvidia-modelopt; needed for FP8/NVFP4 TensorRT engines)'}")
    lines.append(f"C++ compiler {shutil.which('g++') or shutil.which('c++') or 'none (AOTInductor builds need one)'}")
    lines.append("")
    lines.append(f"{'backend':12s} {'build here':34s} {'run here'}")
    for backend, build, run in capabilities(cc, trt_ok, providers):
        lines.append(f"{backend:12s} {build:34s} {run}")
    return lines


def capabilities(cc: tuple[int, int] | None, trt_ok: bool, providers: str) -> list[tuple[str, str, str]]:
    """(backend, precisions it can build here, precisions it can run here) for each backend."""
    fp8 = cc is not None and cc >= (8, 9)
    gpu = cc is not None
    ort = "not installed" not in providers
    ort_cuda = "CUDAExecutionProvider" in providers
    aoti = shutil.which("g++") or shutil.which("c++")
    rows = []
    ort_prec = "fp32, fp16" + (", bf16" if ort_cuda and gpu else "")
    rows.append(("onnxruntime", ort_prec if ort else "no (onnxruntime missing)",
                 (ort_prec + (" (CUDA)" if ort_cuda and gpu else " (CPU)")) if ort else "no"))
    aoti_prec = "fp32, fp16, bf16" + (", fp8" if fp8 else "")
    rows.append(("aoti", aoti_prec if aoti else "no (needs a C++ compiler)",
                 aoti_prec + (" (CUDA)" if gpu else " (CPU)")))
    if trt_ok and gpu:
        trt_prec = "fp32, fp16, bf16" + (", fp8" if fp8 else "") + (", nvfp4" if cc >= (10, 0) else "")
        rows.append(("tensorrt", trt_prec, trt_prec))
    else:
        why = "no (TensorRT not installed)" if not trt_ok else "no (no CUDA GPU)"
        rows.append(("tensorrt", why, why))
    return rows
