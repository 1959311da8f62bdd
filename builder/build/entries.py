"""What a profile asks to build: one `PlannedEntry` per (expert x shape x precision x backend), with
its id, the hash of exactly the fields that change its engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from runtime.manifest import device_info, entry_id, tool_versions
from runtime.backends import backend as runtime_backend
from runtime.precision import Precision
from runtime.stages import stages_of
from runtime.static import StaticShape

from ..backends import builder
from ..profiles import Expert, Profile, ShapeSpec
from ..quantize.calibration import Call, fingerprint


@dataclass(frozen=True)
class PlannedEntry:
    expert: Expert
    spec: ShapeSpec
    shape: StaticShape
    precision: str
    backend: str
    id: str
    identity: dict[str, Any]
    calibration: tuple[Call, ...] = ()  # recorded calls this entry calibrates on (fp8/nvfp4 tensorrt)
    stage: str | None = None  # one stage of the model (`runtime.stages`; profile key cache_stages)

    def label(self) -> str:
        stage = f" {self.stage} stage" if self.stage else ""
        return f"{self.expert.name} {self.spec.label()} {self.precision} {self.backend}{stage}"

    @property
    def calibrated(self) -> bool:
        return calibrated(self.precision, self.backend)


def calibrated(precision: str, backend: str) -> bool:
    """Entries whose quantization scales are calibrated (the others quantize at run time or not at all)."""
    return builder(backend).calibrates(Precision(precision))


def shape_identity(shape: StaticShape, config) -> dict[str, Any]:
    return {"batch": shape.batch, "latent_frames": shape.latent_frames, "latent_height": shape.latent_height,
            "latent_width": shape.latent_width, "tokens": shape.tokens(config), "text_tokens": shape.text_tokens,
            "image_tokens": shape.image_tokens, "per_token_timesteps": shape.per_token_timesteps}


def machine_identity(profile: Profile, backend: str, precision: str, device: dict[str, Any],
                     versions: dict[str, Any]) -> dict[str, Any]:
    """The part of an entry's identity that comes from the machine building it (libraries, GPU)."""
    out = {"torch": versions["torch"], **builder(backend).identity(profile, device, versions)}
    if calibrated(precision, backend):
        out["modelopt"] = versions["modelopt"]
    return out


def plan_entries(profile: Profile, fingerprints: dict[str, str], device: torch.device | None,
                 calls: list[Call] | None = None, *, machine: dict[str, Any] | None = None) -> list[PlannedEntry]:
    """Every entry the profile asks for, with its id. With `calls` (the profile's calibration data),
    calibrated entries get those of their expert and shape (checked by `build` before building).
    The ids are those of entries built on `device` here, or with `machine` ({"device": device_info,
    "versions": tool_versions} of another machine, as a fleet build's worker reports them) there."""
    versions = machine["versions"] if machine is not None else tool_versions()
    dev = machine["device"] if machine is not None else device_info(device)
    config = {k: v for k, v in profile.config.to_diffusers().items() if not k.startswith("_")}
    out = []
    for expert in profile.experts:
        for spec in profile.shapes:
            shape = profile.static_shape(spec)
            for precision in profile.precisions:
                for backend in profile.backends:
                    identity = {"backend": backend, "precision": precision, "config": config,
                                "weights": fingerprints[expert.name], "shape": shape_identity(shape, profile.config),
                                **machine_identity(profile, backend, precision, dev, versions)}
                    identity.update(builder(backend).precision_identity(profile, Precision(precision)))
                    mine: tuple[Call, ...] = ()
                    if calibrated(precision, backend):
                        if calls:
                            mine = tuple(c for c in calls if c.expert == expert.name and c.shape == shape)
                            identity["calibration"] = fingerprint([c.file for c in mine])
                    out.append(PlannedEntry(expert, spec, shape, precision, backend, entry_id(identity), identity,
                                            mine))
                    if profile.cache_stages and not runtime_backend(backend).serves_parts:
                        for stage in stages_of(profile.config.num_layers):
                            staged = {**identity, "stage": stage}
                            out.append(PlannedEntry(expert, spec, shape, precision, backend, entry_id(staged),
                                                    staged, stage=stage))
    return out
