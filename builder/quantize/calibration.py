"""Calibration data a user supplies: recorded transformer calls (`runtime.capture.capture_calls`).

A profile's `calibration: <file or folder>` names `.safetensors` files, each one diffusers-style
call (`hidden_states`, `timestep`, `encoder_hidden_states`, optionally
`encoder_hidden_states_image`). Each call is checked like a call of the runtime front, turned into
the static model's inputs, and given to the expert that would run it (two-expert models: the
high-noise expert for t >= boundary x 1000). A quantized TensorRT entry (fp8, nvfp4) calibrates
on the calls of its expert and exact static shape; the build stops before building anything if
an entry has none, naming the shapes that are there. Without `calibration`, fixed-seed random
inputs at the entry's shape are used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.config import WanConfig
from runtime.dynamic import static_call
from runtime.errors import WanBuildError
from runtime.integrity import sha256_file
from runtime.static import StaticShape


class CalibrationError(WanBuildError):
    """The calibration data cannot be used; the message names the file or entry and the fix."""


@dataclass(frozen=True)
class Call:
    file: Path
    expert: str
    shape: StaticShape
    inputs: tuple[torch.Tensor, ...]  # the static model's inputs, float32/bf16 as recorded, on the CPU


def calibration_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise CalibrationError(f"{path}: no .safetensors calibration calls there; record some with "
                               "runtime.capture.capture_calls (see its docstring)")
    return files


def fingerprint(files: list[Path]) -> str:
    """sha256 over calibration files' names and bytes: part of a calibrated entry's identity (only
    the calls the entry uses, so recording calls at another size rebuilds nothing)."""
    digest = hashlib.sha256()
    for f in sorted(files):
        digest.update(f"{f.name}\0{sha256_file(f)}\0".encode())
    return digest.hexdigest()


def load_calls(path: Path, config: WanConfig, experts: tuple[str, ...], boundary: float | None) -> list[Call]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    calls = []
    for f in calibration_files(path):
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CalibrationError(f"{f}: not a readable safetensors file ({e})") from None
        missing = [k for k in ("hidden_states", "timestep", "encoder_hidden_states") if k not in tensors]
        if missing:
            raise CalibrationError(f"{f}: lacks {', '.join(missing)}; a calibration call holds a transformer "
                                   "call's hidden_states, timestep and encoder_hidden_states")
        try:
            shape, inputs = static_call(config, tensors["hidden_states"].dtype, torch.device("cpu"),
                                        tensors["hidden_states"], tensors["timestep"],
                                        tensors["encoder_hidden_states"], tensors.get("encoder_hidden_states_image"))
        except WanBuildError as e:
            raise CalibrationError(f"{f}: not a call of {config.name}: {e}") from None
        expert = experts[0]
        if len(experts) == 2:
            high = inputs[1] >= boundary * 1000
            if bool(high.any()) != bool(high.all()):
                raise CalibrationError(f"{f}: its timesteps lie on both sides of the expert boundary "
                                       f"({boundary * 1000:g}); record calls of one expert each")
            expert = experts[0] if bool(high.all()) else experts[1]
        calls.append(Call(f, expert, shape, inputs))
    return calls


def calls_for(calls: list[Call], expert: str, shape: StaticShape, label: str) -> list[Call]:
    """The calls of `expert` at `shape`, or a CalibrationError that lists what there is."""
    found = [c for c in calls if c.expert == expert and c.shape == shape]
    if not found:
        there = sorted({f"{c.expert} {c.shape.describe()}" for c in calls})
        raise CalibrationError(f"no calibration call for {label} (expert {expert}, {shape.describe()}); "
                               f"the calibration data has: {'; '.join(there) or 'nothing'}. Record calls at "
                               "this size, or drop `calibration` to calibrate on fixed-seed inputs")
    return found
