"""AOTInductor entries: the static model exported and compiled to `engine.pt2`, without its weights.

`aot_inductor.package_constants_in_so=False` leaves the weights out of the package: it holds
compiled code only, and the runtime hands in the model's own tensors at load. Several shapes (and
both experts of a two-expert model, if they ever share a shape's code) then use one copy of the
weights. The option is marked experimental in torch; the parity gate checks every package.

The package is compiled into memory and written by `write_atomic`, so a full disk fails the entry
with a one-line reason (torch's own archive writer aborts the process when a write fails).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from runtime.backends.aoti import AOTIEngine, load_package
from runtime.fp8 import quantize_fp8
from runtime.int8 import quantize_int8
from runtime.manifest import AOTI_FILE
from runtime.precision import Precision
from runtime.static import StaticWanTransformer

from ..build.export import quiet_torch
from ..build.folder import write_atomic
from ..build.parity import compare
from . import BuilderBackend, Job, compiled_for


def compile_aoti(model: StaticWanTransformer, inputs: tuple[torch.Tensor, ...], folder: Path) -> bytes:
    """Compile `model` at its shape; writes `folder/engine.pt2` and returns its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with torch.no_grad(), quiet_torch():
        program = torch.export.export(model, inputs)
        torch._inductor.aoti_compile_and_package(
            program, package_path=buffer, inductor_configs={"aot_inductor.package_constants_in_so": False})
    data = buffer.getvalue()
    write_atomic(folder / AOTI_FILE, data)
    return data


def quantize(model: StaticWanTransformer, precision: str) -> None:
    """The quantized layers of an `fp8` or `int8` entry, in place (the same recipe as the front's)."""
    if precision == Precision.INT8.value:
        quantize_int8(model, model.config.num_layers)
    else:
        quantize_fp8(model, model.config.num_layers)


class AOTIBuilder(BuilderBackend):
    name = "aoti"

    def front_weights(self, precision, profile) -> bool:
        return True

    def identity(self, profile, device, versions):
        return {"device": compiled_for(device)}

    def build(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        model, inputs = job.model, job.inputs
        job.echo("eager reference")
        with torch.no_grad():
            unquantized = model(*inputs)
        reference = unquantized
        if job.entry.precision in (Precision.FP8.value, Precision.INT8.value):
            quantize(model, job.entry.precision)  # FP8 through torch._scaled_mm, INT8 through torch._int_mm
            with torch.no_grad():
                reference = model(*inputs)
            job.record["quantization_error"] = compare(reference, unquantized, 1.0).to_json()
        constants = model.constants()
        job.echo("compiling with AOTInductor (minutes for a 14B model)")
        data = compile_aoti(model, inputs, job.folder)
        job.echo("parity (loading the package)")
        engine = AOTIEngine(job.draft, job.device, load_package(data, job.device), constants)
        return engine(*inputs), reference

    def verify_reference(self, entry, model) -> float:
        if entry.precision in (Precision.FP8.value, Precision.INT8.value):  # deterministic: the engine's own layers
            quantize(model, entry.precision)
        return super().verify_reference(entry, model)
