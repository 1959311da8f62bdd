"""ONNX Runtime entries: the static model exported to ONNX (weights in the shared store), run by an
ONNX Runtime session. Builds fp32 and fp16 on the CPU, bf16 too on a GPU with onnxruntime-gpu."""

from __future__ import annotations

import torch

from runtime.backends.onnxruntime import OnnxRuntimeEngine
from runtime.manifest import ONNX_DATA

from ..build.export import export_onnx
from ..build.folder import share_weights
from . import BuilderBackend, Job


class OnnxRuntimeBuilder(BuilderBackend):
    name = "onnxruntime"

    def identity(self, profile, device, versions):
        return {"onnx_opset": profile.onnx_opset}

    def build(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        model, inputs = job.model, job.inputs
        with torch.no_grad():
            reference = model(*inputs)
        constants = model.constants()
        path = export_onnx(job.profile.config, job.entry.shape, constants, model.dtype, job.folder,
                           job.profile.onnx_opset)
        share_weights(job.folder, job.store, ONNX_DATA, job.echo)
        device = job.device if job.device.type == "cuda" else torch.device("cpu")
        engine = OnnxRuntimeEngine(job.draft, path, device, constants)
        return engine(*(t.to(device) for t in inputs)), reference
