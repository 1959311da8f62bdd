"""Engine builders: one module per engine kind, behind one small protocol, and the registry.

Each `BuilderBackend` pairs with the runtime backend of the same name (`runtime.backends`), which
loads what it builds, and says:
- `unavailable(precision, device)`: why this machine cannot build that precision (the entry is then
  skipped with the reason, not failed);
- `identity(...)`: the fields, beyond the common ones, that change its engines (they go into the
  entry id); `options(profile)`: what the runtime must know to load them (recorded in the entry);
- `calibrates(precision)`: whether its engines carry calibrated scales (tied to one set of weights);
- `stage_problem(precision)`: why it builds no stage engines of that precision (`cache_stages`);
- `front_weights(precision, profile)`: whether its engines run on the weights handed to them at
  load (any weights of the recorded layout) rather than weights baked in at build;
- `build(job)`: write the artifact into `job.folder` and return the engine's output on the parity
  inputs, loaded through the runtime backend, with the eager output it must match;
- `verify_reference(entry, model)`: the reference and tolerance `wan-build verify` uses.
The build, doctor and catalog loop over `registry()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from runtime.backends import BACKENDS, Backend, backend as runtime_backend
from runtime.manifest import Entry, capability_of
from runtime.precision import Precision
from runtime.static import StaticWanTransformer


@dataclass
class Job:
    """One entry to build: the static model on the build device, its parity inputs, where to write."""

    entry: Any  # builder.build.entries.PlannedEntry
    model: StaticWanTransformer
    inputs: tuple[torch.Tensor, ...]
    profile: Any  # builder.profiles.Profile
    folder: Path  # the entry's partial folder
    store: Path  # the shared weights store of the engine folder
    device: torch.device
    draft: Entry  # the entry's record so far (shape, inputs, ...), to load the engine through the runtime
    echo: Callable[[str], None] = print
    record: dict[str, Any] = field(default_factory=dict)  # quantization_error, build, versions the backend adds
    release_weights: Callable[[], None] = lambda: None  # drop the build's torch copy of the weights (low memory)


def compiled_for(device: dict[str, Any]) -> str:
    """The device part of a compiled entry's identity: the compute capability on a GPU, the vector
    instruction sets on the CPU (`runtime.manifest.cpu_isa`)."""
    if device["type"] == "cuda":
        return device["compute_capability"]
    return device["type"] + (f":{device['cpu_isa']}" if device.get("cpu_isa") else "")


class BuilderBackend(ABC):
    name: str = ""

    @property
    def runtime(self) -> Backend:
        return runtime_backend(self.name)

    def unavailable(self, precision: Precision, device: torch.device) -> str | None:
        return self.runtime.missing_library() or self.runtime.runs(precision, device, capability_of(device))

    def identity(self, profile, device: dict[str, Any], versions: dict[str, str | None]) -> dict[str, Any]:
        return {}

    def precision_identity(self, profile, precision: Precision) -> dict[str, Any]:
        """What else, for entries of `precision` only, makes an entry different (a calibration recipe)."""
        return {}

    def options(self, profile) -> dict[str, Any]:
        return {}

    def calibrates(self, precision: Precision) -> bool:
        return False

    def stage_problem(self, precision: Precision) -> str | None:
        """Why this backend builds no stage engines (`runtime.stages`, profile key `cache_stages`) of
        `precision`, or None when it does."""
        if precision.quantized:
            return f"{precision.value} entries have no stage engines yet (their scales cover the whole model)"
        return None

    def front_weights(self, precision: Precision, profile) -> bool:
        """Whether its engines of `precision` run on the weights the runtime hands them (recorded as
        `options.weights = "front"` with the weights' layout), so other weights of the same layout
        (a fine-tune, merged LoRAs) need no rebuild."""
        return False

    @abstractmethod
    def build(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the entry's files into `job.folder`; returns (engine output, eager reference) on
        `job.inputs` for the parity gate."""

    def verify_reference(self, entry: Entry, model: StaticWanTransformer) -> float:
        """Make `model` the eager reference `wan-build verify` compares `entry` with (in place); returns
        the relative error allowed."""
        return Precision(entry.precision).parity_tolerance


_REGISTRY: dict[str, BuilderBackend] = {}


def registry() -> dict[str, BuilderBackend]:
    if not _REGISTRY:
        from .aoti import AOTIBuilder
        from .inductor import InductorBuilder
        from .onnxruntime import OnnxRuntimeBuilder
        from .tensorrt import TensorRTBuilder

        found = {b.name: b for b in (TensorRTBuilder(), AOTIBuilder(), InductorBuilder(), OnnxRuntimeBuilder())}
        _REGISTRY.update((name, found[name]) for name in BACKENDS)
    return _REGISTRY


def builder(name: str) -> BuilderBackend:
    return registry()[name]
