"""`wan-build gguf`: a checkpoint written as a GGUF file in the original Wan key layout, as the
community's files are (and read back by `runtime.gguf` and by diffusers' GGUF loader).

Quantized: the weights of the linear layers inside the blocks (self- and cross-attention
projections, the FFN) and of the text embedding, whose rows are a whole number of the type's blocks.
Kept in F32, as community files keep them: biases, norms, modulation tables, the patch embedding
(5-D, written as it is: the gguf package and diffusers read such tensors; llama.cpp's own tools, limited
to 4-D, are not needed to read a Wan file), the time embedding and projection, the image embedding and
the output head. The file is written next to its destination
and renamed into place, so an interrupted write leaves no partial file under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from runtime.errors import WanBuildError
from runtime.gguf import gguf_module
from runtime.static import parameter_shapes
from runtime.weights import check_tensors, diffusers_to_original_name, load_checkpoint

WRITE_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # what the gguf package can quantize
QUANTIZED_PARTS = (".attn1.", ".attn2.", ".ffn.", "condition_embedder.text_embedder.")


def quantized_here(name: str, shape: tuple[int, ...], block: int) -> bool:
    """Whether `wan-build gguf` quantizes this tensor (see the module doc)."""
    return (name.endswith(".weight") and len(shape) == 2 and shape[-1] % block == 0
            and any(part in name or name.startswith(part) for part in QUANTIZED_PARTS))


def write_gguf(weights: str | Path, qtype: str, out: str | Path, subfolder: str | None = None,
               echo: Callable[[str], None] = print) -> dict[str, int]:
    """Write `weights` to the GGUF file `out` with the linear weights in `qtype`; returns how many
    tensors went in each type."""
    gguf = gguf_module()
    if qtype not in WRITE_TYPES:
        raise WanBuildError(f"--type {qtype!r} is not one wan-build writes; choose from {', '.join(WRITE_TYPES)} "
                            "(the gguf package cannot quantize K-quants; llama.cpp's tools can)")
    out = Path(out)
    if out.is_dir():
        raise WanBuildError(f"--out {out} is a folder; give a file name ending in .gguf")
    if out.suffix != ".gguf":
        raise WanBuildError(f"--out {out}: name the file *.gguf")
    ckpt = load_checkpoint(weights, subfolder=subfolder)
    shapes = parameter_shapes(ckpt.config)
    check_tensors(shapes, ckpt.tensors, str(weights))
    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    counts: dict[str, int] = {}
    writer = gguf.GGUFWriter(str(tmp), "wan")
    try:
        writer.add_name(ckpt.config.name)
        for i, name in enumerate(sorted(shapes), 1):
            t = ckpt.tensors[name]
            if t.dtype.is_floating_point and t.dtype != torch.float32:
                t = t.float()
            data = t.detach().cpu().contiguous().numpy()
            key = diffusers_to_original_name(name)
            if quantized_here(name, tuple(data.shape), block):
                q = gguf.quants.quantize(data, kind)
                writer.add_tensor(key, q, raw_shape=q.shape, raw_dtype=kind)
                counts[qtype] = counts.get(qtype, 0) + 1
            else:
                writer.add_tensor(key, np.ascontiguousarray(data, dtype=np.float32))
                counts["F32"] = counts.get("F32", 0) + 1
            if i % 50 == 0:
                echo(f"  {i}/{len(shapes)} tensors")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return counts
