"""`inductor` entries: the transformer block compiled ahead of time by torch.compile (see
`runtime.backends.inductor` for the two artifact forms and what each saves at load)."""

from __future__ import annotations

import io

import torch

from runtime.backends.inductor import InductorEngine, available_form
from runtime.manifest import COMPILE_CACHE_FILE, INDUCTOR_FILE
from runtime.static import StaticWanTransformer, call_block

from ..build.compile_cache import capture
from ..build.export import quiet_torch
from ..build.folder import write_atomic
from . import BuilderBackend, Job, compiled_for


def block_inputs(model: StaticWanTransformer, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """What the first block is called with on `inputs` (the example every block's compile uses)."""
    seen: list[tuple] = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        hook.remove()
    return seen[0]


def compile_block(model: StaticWanTransformer, inputs: tuple[torch.Tensor, ...], form: str) -> bytes:
    """The compiled block at `model`'s shape, as the artifact's bytes. Compiled outside inference mode,
    where the runtime engine runs it (its guards include the tensors' dispatch keys)."""
    with torch.inference_mode(False):
        inputs = tuple(t.clone() if t.is_inference() else t for t in inputs)
        args = block_inputs(model, inputs)
    with torch.inference_mode(False), torch.no_grad(), quiet_torch():
        if form == "aot_compile":
            compiled = torch.compile(call_block, fullgraph=True, dynamic=False).aot_compile(
                ((model.blocks[0], *args), {}))
            buffer = io.BytesIO()
            buffer.write(type(compiled).serialize(compiled).serialized_data)
            return buffer.getvalue()
        block = model.blocks[0]
        torch.compile(call_block, fullgraph=True, dynamic=False)(block, *args)
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing for the compiled block")
        return artifacts[0]


class InductorBuilder(BuilderBackend):
    name = "inductor"

    def front_weights(self, precision, profile) -> bool:
        return True

    def identity(self, profile, device, versions):
        return {"device": compiled_for(device),
                "triton": versions.get("triton"), "python": versions.get("python"), "form": available_form()}

    def options(self, profile):
        return {"form": available_form()}

    def build(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        model, inputs = job.model, job.inputs
        job.echo("eager reference")
        with torch.no_grad():
            reference = model(*inputs)
        form = available_form()
        job.echo(f"compiling one block with torch.compile ({form})")
        job.folder.mkdir(parents=True, exist_ok=True)
        data = compile_block(model, inputs, form)
        write_atomic(job.folder / INDUCTOR_FILE, data)
        job.echo("loading it in a fresh process with an empty compile cache (what it compiles is kept)")
        bundle, info = capture(str(job.device), job.folder / INDUCTOR_FILE, form)
        write_atomic(job.folder / COMPILE_CACHE_FILE, bundle)
        job.record.setdefault("build", {})["compile_cache"] = info
        job.echo("parity (loading the artifact)")
        engine = InductorEngine(job.draft, job.device, model, form, data)
        return engine(*inputs), reference
