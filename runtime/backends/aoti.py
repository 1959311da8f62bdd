"""AOTInductor packages (`engine.pt2`) compiled without their weights.

The package holds only compiled code; the weights are handed in at load as the front's own
tensors (`user_managed=True`), so every shape's package shares one copy of the weights, and other
weights of the same layout (merged LoRAs) are handed in again in place (`update_weights`). A package
is a shared library that runs when loaded: it is loaded from the very bytes whose sha256 was just
checked against the manifest, never from the path again.

Compiled code is specific to the device kind it was compiled for, and on CUDA to the compute
capability (Inductor's Triton kernels are built per architecture), and to the torch that compiled
it; each is checked before loading.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from ..integrity import read_verified
from ..manifest import AOTI_FILE, Entry, entry_file
from ..precision import Precision
from . import Backend, Engine, compiled_device_problem


class AOTIEngine(Engine):
    def __init__(self, entry: Entry, device: torch.device, runner, constants: Mapping[str, torch.Tensor]):
        super().__init__(entry, device)
        self._runner = runner
        names = runner.get_constant_fqns()
        missing = [n for n in names if n not in constants]
        if missing:
            raise RuntimeError(f"the model has no tensors for {', '.join(missing[:5])}")
        self._constants = {n: constants[n] for n in names}
        runner.load_constants(self._constants, check_full_update=True, user_managed=True)

    def update_weights(self, weights: Mapping[str, torch.Tensor]) -> bool:
        """Hand the package other tensors of the same layout (merged LoRAs): pointers only, no copy."""
        new = {n: weights.get(n, t) for n, t in self._constants.items()}
        if any(new[n].shape != t.shape or new[n].dtype != t.dtype or new[n].device != t.device
               for n, t in self._constants.items()):
            return False
        self._runner.load_constants(new, check_full_update=True, user_managed=True)
        self._constants = new
        return True

    def run(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output; a tuple of them for an entry of several (a stage)."""
        out = self._runner(*inputs)
        if not isinstance(out, (list, tuple)):
            return out
        return out[0] if len(out) == 1 else tuple(out)


class Package:
    """A loaded package, called the way torch's `AOTICompiledModel` calls its loader (flat tensors in,
    flat tensors out), without importing `torch.export` (2 s of every cold start on the CPU)."""

    def __init__(self, loader):
        self.loader = loader

    def get_constant_fqns(self) -> list[str]:
        return self.loader.get_constant_fqns()

    def load_constants(self, constants: Mapping[str, torch.Tensor], *, check_full_update: bool,
                       user_managed: bool) -> None:
        self.loader.load_constants(constants, False, check_full_update, user_managed)  # use_inactive=False

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return self.loader.boxed_run(list(inputs))


def load_package(data: bytes, device: torch.device):
    """The package in `data`, loaded by torch's package loader directly. `aoti_load_package` would
    first compare the machine with the package's metadata, for a warning only, and that comparison
    probes the CPU's vector instruction sets by compiling a test program per set (17 s on an empty
    compile cache); the entry's own checks (device, compute capability, CPU instruction sets, torch)
    ran before this. Torch builds without that loader class go through `aoti_load_package`."""
    device = torch.device(device)
    index = -1
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise RuntimeError("the package is not a ZIP archive (a .pt2 package is one)")
    loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader is None:
        return torch._inductor.aoti_load_package(io.BytesIO(data), device_index=index)
    with tempfile.NamedTemporaryFile(suffix=".pt2") as f:  # the loader reads a path; it unpacks its own copy
        f.write(data)
        f.flush()
        return Package(loader(f.name, "model", False, 1, index))


class AOTIBackend(Backend):
    name = "aoti"
    library = "torch._inductor"
    install_hint = "a torch build with Inductor"
    version_keys = ("torch",)

    def required_files(self, entry: Entry) -> tuple[str, ...]:
        return (AOTI_FILE,)

    def runs(self, precision: Precision, device: torch.device, capability: tuple[int, int] | None) -> str | None:
        if precision == Precision.NVFP4:
            return "NVFP4 engines are built by the tensorrt backend only"
        if precision == Precision.INT8 and torch.device(device).type == "cuda" and capability and tuple(capability) < (7, 5):
            return "int8 needs int8 tensor cores: compute capability 7.5 (Turing) or newer"
        return super().runs(precision, device, capability)

    def compatibility(self, entry: Entry, device: torch.device, capability: tuple[int, int] | None,
                      versions: Mapping[str, str | None]) -> str | None:
        return (super().compatibility(entry, device, capability, versions)
                or compiled_device_problem(entry, device, capability))

    def load(self, entry: Entry, folder: Path, device: torch.device, model, options: Mapping | None = None) -> Engine:
        constants = model.constants()
        info = entry.files[AOTI_FILE]
        data = read_verified(entry_file(folder, entry, AOTI_FILE), info.sha256, info.bytes)
        return AOTIEngine(entry, device, load_package(data, device), constants)
