"""`inductor` entries: one transformer block compiled ahead of time by torch.compile, per shape.

The build compiles `runtime.static.call_block` (a block as a function of the block: its tensors are
inputs, not constants) for the entry's shape and stores what torch keeps of that compile in
`block.compiled`, in one of two forms, whichever the installed torch has:
- `aot_compile`: torch's Python-side AOT artifact (`torch.compile(...).aot_compile(...)`, saved with
  `save_compiled_function`, loaded with `torch.compiler.load_compiled_function`; experimental in
  torch 2.13). Loading it skips Dynamo's tracing and Inductor's lowering.
- `cache_artifacts`: torch's portable compile caches (`torch.compiler.save_cache_artifacts`); at
  load they are installed and the blocks are compiled again, hitting those caches.
At run time every block of the model goes through the one compiled block, on the front's own
tensors (so other weights of the same structure work too); the embeddings and the head run eager.

Both forms hold pickled Python objects and generated code: like every engine folder, this one is
code, loaded only from bytes whose sha256 was just checked. Compiled code is specific to the torch,
Triton and Python that made it and to the device (the compute capability on CUDA); each is checked
before loading. On the CPU the artifact keeps Inductor's C++ kernels as source, compiled when it is
loaded; the entry's compile cache (`runtime.compile_cache`) holds what that load compiled, so a
fresh process finds them built (docs/benchmarks.md says what was measured where).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..compile_cache import seed_entry
from ..integrity import read_verified
from ..manifest import INDUCTOR_FILE, Entry, entry_file
from ..precision import Precision
from ..static import StaticWanTransformer, call_block
from . import Backend, Engine, compiled_device_problem

log = logging.getLogger("wan_build.runtime")
FORMS = ("aot_compile", "cache_artifacts")


def available_form() -> str:
    """The artifact form this torch can write and read."""
    # Asked without importing Dynamo (4 s on a CPU), as the check of every entry at open runs it:
    # torch has the artifact where it has the loader and Dynamo's aot_compile module.
    if hasattr(torch.compiler, "load_compiled_function") and (Path(torch.__file__).parent / "_dynamo" / "aot_compile.py").is_file():
        return "aot_compile"
    return "cache_artifacts"


@contextlib.contextmanager
def without_header_precompile():
    """Loading an artifact on the CPU builds its C++ kernels, or finds them in the compile cache
    (`runtime.compile_cache`), keyed without the precompiled header. With header precompiling on,
    Inductor would first run the preprocessor over its kernel header and build that header (150 MB,
    7 s on an empty machine) even when every kernel is found; off, only missing kernels are compiled."""
    from torch._inductor import config

    if not hasattr(config, "cpp_cache_precompile_headers"):
        yield
        return
    with config.patch(cpp_cache_precompile_headers=False):
        yield


def load_block(form: str, data: bytes) -> Callable | None:
    """The compiled block from an artifact's bytes (aot_compile), or None after installing the caches."""
    import runtime.static as static_module

    if form == "aot_compile":
        with without_header_precompile():
            compiled = torch.compiler.load_compiled_function(io.BytesIO(data), f_globals=vars(static_module))
        # Its guards compare every tensor's dispatch keys with the compile's, which differ with the
        # caller's grad and inference modes although the arithmetic does not; what matters is checked
        # by us instead (the entry's shapes and dtypes on every call, its device and versions at load).
        if hasattr(compiled, "disable_guard_check"):
            compiled.disable_guard_check()
        return compiled
    torch.compiler.load_cache_artifacts(data)
    return None


class InductorEngine(Engine):
    """The static model at the entry's shape on the front's tensors, every block through the compiled one.

    The compiled block guards on what it was compiled for, down to the tensors' dispatch keys, so it
    always runs outside inference mode (inputs made in inference mode are copied once per call, the
    tables are built outside it). Should a guard still fail (parameters created in inference mode,
    say), the engine warns once and runs its blocks eagerly: the answer stays right."""

    def __init__(self, entry: Entry, device: torch.device, model: StaticWanTransformer, form: str, data: bytes):
        super().__init__(entry, device)
        shared = {k: v for k, v in model.named_parameters()}
        with torch.inference_mode(False):
            self.model = StaticWanTransformer.from_parameters(model.config, model.shape, shared).eval()
        compiled = load_block(form, data)
        if compiled is not None:
            self.model.block_call = lambda block, *args: compiled(block, *args)
        else:
            for block in self.model.blocks:
                block.compile(fullgraph=True, dynamic=False)
        self.form = form
        self.fell_back: str | None = None

    def update_weights(self, weights: Mapping[str, torch.Tensor]) -> bool:
        """The compiled block takes the block's tensors as inputs: new tensors need no recompile."""
        params = dict(self.model.named_parameters())
        if any(n in params and (t.shape != params[n].shape or t.dtype != params[n].dtype)
               for n, t in weights.items()):
            return False
        for name, tensor in weights.items():
            if name in params:
                params[name].data = tensor
        return True

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._serve(lambda model, *args: model(*args), inputs)

    def run_parts(self, inputs: tuple[torch.Tensor, ...], parts: Callable) -> torch.Tensor:
        """`parts(model, *inputs)` on this engine's model: a step-cached call runs the prologue, the
        blocks its policy asks for (each through the compiled block) and the epilogue."""
        return self._serve(parts, self.checked(inputs))

    def _serve(self, fn: Callable, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            inputs = tuple(t.clone() if t.is_inference() else t for t in inputs)
            if self.fell_back is None:
                try:
                    return fn(self.model, *inputs)
                except RuntimeError as e:  # a guard of the compiled block did not hold
                    text = " ".join(str(e).split())
                    reason = text.split("verbose_code_parts=", 1)[-1][:300]
                    self.fell_back = reason
                    log.warning("inductor engine %s: the compiled block does not apply here (%s); its blocks run "
                                "eager from now on", self.entry.id, self.fell_back)
                    self.model.block_call = call_block
                    for block in self.model.blocks:
                        block._compiled_call_impl = None
            return fn(self.model, *inputs)


class InductorBackend(Backend):
    name = "inductor"
    library = "torch._inductor"
    install_hint = "a torch build with Inductor (and Triton on CUDA)"
    version_keys = ("torch", "triton", "python")
    serves_parts = True  # every block runs through the one compiled block

    def required_files(self, entry: Entry) -> tuple[str, ...]:
        return (INDUCTOR_FILE,)

    def runs(self, precision: Precision, device: torch.device, capability: tuple[int, int] | None) -> str | None:
        if precision.quantized:
            return f"{precision.value} engines are built by the tensorrt backend" + (
                " and aoti" if precision in (Precision.FP8, Precision.INT8) else "") + "; inductor builds fp32, fp16 and bf16"
        return super().runs(precision, device, capability)

    def compatibility(self, entry: Entry, device: torch.device, capability: tuple[int, int] | None,
                      versions: Mapping[str, str | None]) -> str | None:
        problem = (super().compatibility(entry, device, capability, versions)
                   or compiled_device_problem(entry, device, capability))
        if problem:
            return problem
        form = entry.options.get("form")
        if form not in FORMS:
            return f"artifact form {form!r} is not one this runtime reads ({', '.join(FORMS)})"
        if form == "aot_compile" and available_form() != "aot_compile":
            return f"an aot_compile artifact, and torch {torch.__version__} cannot load those"
        return None

    def load(self, entry: Entry, folder: Path, device: torch.device, model, options: Mapping | None = None) -> Engine:
        info = entry.files[INDUCTOR_FILE]
        data = read_verified(entry_file(folder, entry, INDUCTOR_FILE), info.sha256, info.bytes)
        seed_entry(entry, folder, device)
        return InductorEngine(entry, device, model, entry.options["form"], data)
