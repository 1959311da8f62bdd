"""ONNX Runtime entries: the static model exported to ONNX (weights in the shared store), run by an
ONNX Runtime session. Builds fp32 and fp16 on the CPU, bf16 too on a GPU with onnxruntime-gpu."""

from __future__ import annotations

import torch

from runtime.backends.onnxruntime import OnnxRuntimeEngine
from runtime.manifest import ONNX_DATA

from ..build.export import EXPORT_FORM, export_onnx
from ..build.folder import share_weights
from . import BuilderBackend, Job


class OnnxRuntimeBuilder(BuilderBackend):
    name = "onnxruntime"

    def front_weights(self, precision, profile) -> bool:
        return True

    def identity(self, profile, device, versions):
        return {"onnx_opset": profile.onnx_opset, "onnx_export": EXPORT_FORM}

    def build(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        model, inputs = job.model, job.inputs
        job.echo("eager reference")
        with torch.no_grad():
            reference = model(*inputs)
        constants = model.constants()
        whole = getattr(model, "whole", model)  # a stage's graph reads the whole model's weights file
        path = export_onnx(job.profile.config, job.entry.shape, whole.constants(), model.dtype, job.folder,
                           job.profile.onnx_opset, job.echo, model_stage=job.entry.stage, inputs_like=inputs)
        job.echo("storing the weights file")
        share_weights(job.folder, job.store, ONNX_DATA, job.echo)
        # The parity session runs as the runtime does: on the model's own tensors, handed by name (no
        # copy), not on a copy read back from the file; prepacking and the memory arena (further
        # copies) are off for it.
        # (fp16 on x86 CPUs, whose provider would cast every weight to fp32, is refused by the backend.)
        device = job.device if job.device.type == "cuda" else torch.device("cpu")
        job.echo("parity session (ONNX Runtime, on the model's tensors)")
        engine = OnnxRuntimeEngine(job.draft, path, device, constants, prepack=False, arena=False)
        return engine(*(t.to(device) for t in inputs)), reference
