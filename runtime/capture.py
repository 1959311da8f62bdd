"""Record a transformer's calls during a real generation, for FP8/NVFP4 calibration.

    from runtime.capture import capture_calls

    with capture_calls(pipe.transformer, "calib/"):          # and pipe.transformer_2 for Wan2.2 A14B
        pipe(prompt=..., height=480, width=832, num_frames=81, num_inference_steps=20)

Each call becomes `calib/call-NNNN.safetensors` holding the forward's tensors under diffusers'
argument names (`hidden_states`, `timestep`, `encoder_hidden_states`, and
`encoder_hidden_states_image` where given). A profile's `calibration: calib/` then calibrates
each quantized TensorRT entry on the recorded calls of its shape and expert. Works for diffusers'
`WanTransformer3DModel` and for this project's `WanTransformer`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import InputError

CALL_ARGS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")


@contextlib.contextmanager
def capture_calls(transformer: nn.Module, folder: str | Path, every: int = 1,
                  limit: int | None = None) -> Iterator[list[Path]]:
    """Save every `every`-th call (at most `limit`) of `transformer` into `folder`; yields the list
    of files written so far. Numbering continues after the files already there, so two experts can
    record into one folder."""
    from safetensors.torch import save_file

    if every < 1:
        raise InputError(f"every must be >= 1 (got {every})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    seen = 0
    index = len(list(folder.glob("call-*.safetensors")))

    def hook(module, args, kwargs):
        nonlocal seen, index
        seen += 1
        if (seen - 1) % every or (limit is not None and len(written) >= limit):
            return
        values = dict(zip(CALL_ARGS, args))
        values.update({k: v for k, v in kwargs.items() if k in CALL_ARGS})
        tensors = {k: torch.as_tensor(v).detach().to("cpu").contiguous() for k, v in values.items() if v is not None}
        path = folder / f"call-{index:04d}.safetensors"
        while path.exists():  # another capture (the other expert) may record into this folder too
            index += 1
            path = folder / f"call-{index:04d}.safetensors"
        save_file(tensors, str(path))
        written.append(path)

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield written
    finally:
        handle.remove()
