"""Engine backends: one module per engine kind, behind one small protocol, and the registry.

A `Backend` says what an entry of its kind needs (its library, the files it reads, the tool versions
it must match), whether this machine can run an entry (`compatibility`, checked before anything is
loaded) and how to load one (`load`). Callers (the engine set, `wan-build verify`, doctor) loop over
`registry()`; nothing else branches on the backend's name.

Every loaded engine is an `Engine`: it checks each input against the entry's recorded shape and
dtype and hands the library tensors in the layout the engine was compiled for (contiguous, with
standard strides, 64-byte aligned). Expanded, transposed and sliced views, which the front and
diffusers' pipelines produce, are copied first; engines that read raw pointers with assumed strides
(AOTInductor, TensorRT) would otherwise compute on the wrong elements without a word.

Every backend module imports its library inside the functions that need it, so `import runtime`
works on a machine that has none of them.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping

import torch

from ..manifest import Entry, TensorInfo, cpu_isa
from ..precision import Precision
from ..static import StaticWanTransformer

BACKENDS = ("tensorrt", "aoti", "inductor", "onnxruntime")  # the runtime's default preference, fastest first
ALIGNMENT = 64  # bytes; torch's allocators give 64 (CPU) and 512 (CUDA), kernels assume 16 or more


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def engine_input(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its memory is laid out as a fresh contiguous tensor's, else such a copy."""
    if t.stride() == contiguous_strides(tuple(t.shape)) and t.data_ptr() % ALIGNMENT == 0:
        return t
    out = torch.empty(tuple(t.shape), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


class Engine(ABC):
    """A loaded engine. Call it with the static model's inputs in order; it returns the output."""

    def __init__(self, entry: Entry, device: torch.device):
        self.entry = entry
        self.device = torch.device(device)
        self._specs = tuple((i.name, i.shape, getattr(torch, i.dtype)) for i in entry.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(*self.checked(inputs))

    def checked(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The inputs, checked against the entry and laid out as the engine was built for."""
        if len(inputs) != len(self._specs):
            raise ValueError(f"engine {self.entry.id} takes {len(self._specs)} inputs, got {len(inputs)}")
        for (name, shape, dtype), t in zip(self._specs, inputs):
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"engine {self.entry.id}: {name} is {list(t.shape)} {t.dtype}, "
                                 f"the engine was built for {list(shape)} {dtype}")
        return tuple(engine_input(t) for t in inputs)

    @abstractmethod
    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The engine's output for inputs already checked and laid out as it was built for."""

    def update_weights(self, weights: Mapping[str, torch.Tensor]) -> bool:
        """Run on `weights` (the model's tensors by name, same layout) from the next call on, without
        reloading; False when this engine cannot, and is then reloaded on its next use."""
        return False

    def release(self) -> None:
        """Free what the engine holds (device memory) now; the engine set drops it afterwards."""


def compiled_device_problem(entry: Entry, device: torch.device | str,
                            capability: tuple[int, int] | None) -> str | None:
    """Why code compiled for `entry`'s device cannot run here: another device type, on a GPU another
    compute capability, on the CPU other vector instruction sets (compiled kernels are specific to
    each); None when it can."""
    device = torch.device(device)
    if entry.device_type != device.type:
        return f"compiled for {entry.device_type}, the model runs on {device.type}"
    built_for = entry.device.get("compute_capability")
    here = f"{capability[0]}.{capability[1]}" if capability else None
    if device.type == "cuda" and built_for != here:
        return f"compiled for compute capability {built_for}, this GPU is {here}"
    built_isa = entry.device.get("cpu_isa")
    if device.type == "cpu" and built_isa is not None and built_isa != cpu_isa():
        return (f"compiled for a CPU with {built_isa}, this CPU has {cpu_isa()} "
                "(build the entry on a machine of this CPU kind)")
    return None


class Backend(ABC):
    """What every engine kind answers. Subclasses set the class attributes and override what differs."""

    name: str = ""
    library: str = ""  # the module that must be importable to run it
    install_hint: str = ""
    version_keys: tuple[str, ...] = ()  # tools whose exact version the artifact was made with
    # Whether its engines run the model's parts apart (prologue, any range of blocks, epilogue), as
    # step-cached calls need: their engines then have `run_parts(inputs, parts)`, which runs
    # `parts(static_model, *inputs)` on the engine's own model. Others compute whole forwards only.
    serves_parts: bool = False

    def missing_library(self) -> str | None:
        if importlib.util.find_spec(self.library) is None:
            return f"{self.library} is not installed" + (f" ({self.install_hint})" if self.install_hint else "")
        return None

    @abstractmethod
    def required_files(self, entry: Entry) -> tuple[str, ...]:
        """Files the manifest must list (and so hash) for this entry."""

    def runs(self, precision: Precision, device: torch.device, capability: tuple[int, int] | None) -> str | None:
        """Why this backend cannot run `precision` on such a device at all, or None."""
        return precision.hardware_problem(device, capability)

    def compatibility(self, entry: Entry, device: torch.device, capability: tuple[int, int] | None,
                      versions: Mapping[str, str | None]) -> str | None:
        """Why this machine cannot run `entry` (checked before any file is loaded), or None."""
        for tool in self.version_keys:
            if entry.versions.get(tool) != versions.get(tool):
                return (f"built with {tool} {entry.versions.get(tool)}, this machine has "
                        f"{versions.get(tool) or 'none'}")
        return self.runs(Precision(entry.precision), device, capability)

    @abstractmethod
    def load(self, entry: Entry, folder: Path, device: torch.device, model: StaticWanTransformer,
             options: Mapping | None = None) -> Engine:
        """Load `entry` from `folder/<id>/`, whose files have passed their checks. `model` is the eager
        static model at the entry's shape: its tensors (`model.constants()`: parameters and shape
        tables) are what artifacts that keep their weights outside are handed. `options`: the
        caller's settings for this backend (`engine_options[backend]` of `from_pretrained`)."""


_REGISTRY: dict[str, Backend] = {}


def registry() -> dict[str, Backend]:
    """Every backend by name, in the runtime's default order."""
    if not _REGISTRY:
        from .aoti import AOTIBackend
        from .inductor import InductorBackend
        from .onnxruntime import OnnxRuntimeBackend
        from .tensorrt import TensorRTBackend

        found = {b.name: b for b in (TensorRTBackend(), AOTIBackend(), InductorBackend(), OnnxRuntimeBackend())}
        _REGISTRY.update((name, found[name]) for name in BACKENDS)
    return _REGISTRY


def backend(name: str) -> Backend:
    try:
        return registry()[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None


def missing_library(name: str) -> str | None:
    """Why backend `name` cannot run on this machine at all, or None."""
    return backend(name).missing_library()


def input_infos(specs) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo.of(s.name, s.shape, s.dtype) for s in specs)
