"""The compiled route: the cached static models run through torch.compile, regionally.

`WanTransformer.from_pretrained(..., compile=True)` compiles each static model it builds block by
block (`nn.Module.compile` on every transformer block, `fullgraph=True`, static shapes): the blocks
of one model share their code (one Dynamo entry, the parameters are graph inputs), so a 40-block
model compiles one block's code, once per shape; the embeddings and the head stay eager. The first
call of each shape pays the compile (seconds to minutes); later calls of that shape run compiled.

A compile that fails never fails the call: the model's blocks go back to eager, a warning names the
error, and `last_route` says so. Past torch's recompile limit (`torch._dynamo.config
.cache_size_limit`, 8 shapes by default) torch itself runs further shapes eagerly and warns.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("wan_build.runtime")

COMPILE_OPTIONS = {"fullgraph": True, "dynamic": False}


def compile_blocks(model: nn.Module) -> None:
    for block in model.blocks:
        block.compile(**COMPILE_OPTIONS)


def uncompile_blocks(model: nn.Module) -> None:
    for block in model.blocks:
        block._compiled_call_impl = None


def describe(model: nn.Module) -> str:
    return f"compiled with torch.compile (regional: one block's code serves all {len(model.blocks)} blocks)"


def why(e: BaseException) -> str:
    """One line for a compile error: its type and the innermost cause's first line."""
    inner = getattr(e, "inner_exception", None) or e
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    first = (str(inner).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if inner is e else f"{type(e).__name__}: {type(inner).__name__}: {first}"
