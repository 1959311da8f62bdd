"""Seeded random Wan weights in diffusers layout, for demos, tests and CI.

Real users point profiles at downloaded checkpoints. These weights have the exact structure of a
preset and values scaled so activations stay O(1) through every layer (no zeros, no identity
norms), which is what parity checks need. Files are streamed tensor by tensor, so even a 14B
preset needs memory for one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Mapping

import torch

from runtime.config import WanConfig
from runtime.errors import WanBuildError
from runtime.static import parameter_shapes
from runtime.weights import DIFFUSERS_FILE, parameter_dtype

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
EXPERT_FOLDERS = ("transformer", "transformer_2")  # diffusers: high-noise expert, low-noise expert


def random_parameter(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """One parameter, seeded by (seed, name) so the value does not depend on write order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("scale_shift_table",):
        return torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    if leaf == "pos_embed":
        return 0.1 * torch.randn(shape, generator=gen)
    if leaf == "bias":
        return 0.02 * torch.randn(shape, generator=gen)
    if len(shape) == 1:  # norm weights: near one, not exactly one
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    fan_in = shape[1:].numel()
    return torch.randn(shape, generator=gen) / fan_in**0.5


def write_safetensors(path: Path, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                      make: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Stream tensors into a safetensors file: the header first (shapes are known), then each tensor
    as `make(name)` produces it. Written to a temporary name and renamed, so no half file is left."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in shapes.items():
            t = make(name).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {list(t.shape)}, header says {list(shape)}")
            f.write(t.view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def write_diffusers_transformer(folder: Path, config: WanConfig, seed: int, dtype: torch.dtype = torch.float32,
                                rename: Callable[[str], str] | None = None, extra_config: Mapping | None = None
                                ) -> Path:
    """One transformer folder: config.json + diffusion_pytorch_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = parameter_shapes(config)
    rename = rename or (lambda n: n)
    back = {rename(n): n for n in shapes}
    layout = {rename(n): (tuple(s), parameter_dtype(n, dtype)) for n, s in shapes.items()}
    write_safetensors(folder / DIFFUSERS_FILE, layout, lambda n: random_parameter(back[n], shapes[back[n]], seed))
    cfg = dict(extra_config) if extra_config is not None else config.to_diffusers()
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def init_weights(config: WanConfig, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Random weights for `config` under `out`: one transformer folder, or for a two-expert model
    `transformer/` (high noise) and `transformer_2/` (low noise), as in a diffusers pipeline."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WanBuildError(f"--out {out} is a file; give a folder")
    if config.experts == 1:
        return [write_diffusers_transformer(out, config, seed, dtype)]
    folders = [write_diffusers_transformer(out / sub, config, seed + i, dtype) for i, sub in enumerate(EXPERT_FOLDERS)]
    index = {"_class_name": "WanImageToVideoPipeline" if config.in_channels == 36 else "WanPipeline",
             "boundary_ratio": config.boundary, "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folders

