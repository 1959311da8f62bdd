"""ONNX Runtime entries: the static model exported to ONNX (weights in the shared store), run by an
ONNX Runtime session. Builds fp32 and fp16 on the CPU, bf16 too on a GPU with onnxruntime-gpu."""

from __future__ import annotations

import torch

from runtime.backends.onnxruntime import OnnxRuntimeEngine
from runtime.manifest import ONNX_DATA

from ..build.export import TABLE_INPUTS, export_onnx
from ..build.folder import share_weights
from . import BuilderBackend, Job


class OnnxRuntimeBuilder(BuilderBackend):
    name = "onnxruntime"

    def identity(self, profile, device, versions):
        return {"onnx_opset": profile.onnx_opset}

    def build(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        model, inputs = job.model, job.inputs
        job.echo("eager reference")
        with torch.no_grad():
            reference = model(*inputs)
        constants = model.constants()
        path = export_onnx(job.profile.config, job.entry.shape, constants, model.dtype, job.folder,
                           job.profile.onnx_opset, job.echo)
        job.echo("storing the weights file")
        share_weights(job.folder, job.store, ONNX_DATA, job.echo)
        # The session reads its own copy of the weights from the file just written: the torch copy (and
        # the checkpoint's mapping) go first, and weight prepacking (a further copy) is off for it.
        tables = {n: constants[n] for n in TABLE_INPUTS}
        del constants
        job.release_weights()
        job.echo("parity session (ONNX Runtime)")
        device = job.device if job.device.type == "cuda" else torch.device("cpu")
        engine = OnnxRuntimeEngine(job.draft, path, device, tables, prepack=False)
        return engine(*(t.to(device) for t in inputs)), reference
