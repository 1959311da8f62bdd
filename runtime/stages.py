"""Stages of the static model: the parts a step-cached call runs apart, each a static model itself.

    prologue       (hidden_states, timestep, text[, image]) -> (tokens, text_context[, image_context], temb, temb_proj)
    first_block    (tokens, contexts..., temb_proj)          -> tokens_out      block 0
    other_blocks   (tokens, contexts..., temb_proj)          -> tokens_out      blocks 1 .. N-1
    epilogue       (tokens, temb)                            -> sample

A cache policy needs no other cut: First-Block-Cache runs `first_block` every step and
`other_blocks` only when the residual moved; MagCache runs both or neither. A model of one block has
no `other_blocks`.

`StageModel(model, stage)` holds the very submodules (and so tensors) of `model` that its stage
reads, under the names they have in the whole model (`blocks.7.attn1.to_q.weight`), plus the shape
tables it reads. So a stage engine is handed the same tensors by the same names as the whole-model
engine of its shape, its weights file is the whole model's, and LoRAs merged into the model reach
every stage. Its forward is the whole model's code for that part (`StaticWanTransformer.prologue`,
`.epilogue`, the block loop), run on the stage's own attributes, so export sees only its tensors.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import InputError
from .static import StaticWanTransformer, call_block

STAGES = ("prologue", "first_block", "other_blocks", "epilogue")


def stages_of(num_layers: int) -> tuple[str, ...]:
    """The stages a model of `num_layers` blocks has."""
    return STAGES if num_layers > 1 else tuple(s for s in STAGES if s != "other_blocks")


def context_names(model: StaticWanTransformer) -> tuple[str, ...]:
    return ("text_context", "image_context") if model.config.image_dim is not None else ("text_context",)


class StageModel(nn.Module):
    """One stage of `model` (see the module doc); shares `model`'s tensors."""

    block_call = staticmethod(call_block)

    def __init__(self, model: StaticWanTransformer, stage: str):
        super().__init__()
        if stage not in stages_of(model.config.num_layers):
            raise InputError(f"stage {stage!r} is not one of {', '.join(stages_of(model.config.num_layers))}")
        self.stage, self.config, self.shape = stage, model.config, model.shape
        object.__setattr__(self, "whole", model)  # not a submodule: export sees the stage's tensors only
        for name in ("_patches", "_tokens", "_timestep_len", "_unpatch", "_out_shape"):
            setattr(self, name, getattr(model, name))
        self._contexts = type(model).contexts
        contexts = context_names(model)
        if stage == "prologue":
            self.patch_embedding, self.condition_embedder = model.patch_embedding, model.condition_embedder
            self.table_names = ("time_freqs",)
            self.input_names = tuple(model.input_names)
            self.output_names = ("tokens", *contexts, "temb", "temb_proj")
        elif stage == "epilogue":
            self.proj_out, self.scale_shift_table = model.proj_out, model.scale_shift_table
            self.table_names = ()
            self.input_names, self.output_names = ("tokens", "temb"), tuple(model.output_names)
        else:
            span = (0, 1) if stage == "first_block" else (1, model.config.num_layers)
            self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(*span)})
            self.table_names = ("rope_cos", "rope_sin")
            self.input_names, self.output_names = ("tokens", *contexts, "temb_proj"), ("tokens_out",)
        for name in self.table_names:
            self.register_buffer(name, getattr(model, name), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.whole.dtype

    def constants(self) -> dict[str, torch.Tensor]:
        """This stage's parameters and shape tables by name (as `StaticWanTransformer.constants`)."""
        return {k: v.detach() for k, v in (*self.named_parameters(), *self.named_buffers())}

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.constants().items() if k not in self.table_names}

    def contexts(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._contexts(self, *args)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.stage == "prologue":
            x, contexts, temb, temb_proj = StaticWanTransformer.prologue(self, *inputs)
            return (x, *contexts, temb, temb_proj)
        if self.stage == "epilogue":
            return (StaticWanTransformer.epilogue(self, *inputs),)
        x, *contexts, temb_proj = inputs
        for block in self.blocks.values():
            x = self.block_call(block, x, tuple(contexts), temb_proj, self.rope_cos, self.rope_sin)
        return (x,)


def stage_example(model: StaticWanTransformer, stage: str,
                  inputs: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(the stage's inputs, its outputs) on the whole model's `inputs`, computed by the whole model
    (eager): what a stage is built, checked and verified on."""
    with torch.no_grad():
        x, contexts, temb, temb_proj = model.prologue(*inputs)
        if stage == "prologue":
            return inputs, (x, *contexts, temb, temb_proj)
        first = model.run_blocks(x, contexts, temb_proj, 0, 1)
        if stage == "first_block":
            return (x, *contexts, temb_proj), (first,)
        rest = model.run_blocks(first, contexts, temb_proj, 1, None)
        if stage == "other_blocks":
            return (first, *contexts, temb_proj), (rest,)
        return (rest, temb), (model.epilogue(rest, temb),)


Run = Callable[..., tuple[torch.Tensor, ...]]


class StagedCall:
    """One call of the whole model through stage runners (`runners[stage](*inputs) -> outputs`):
    what the front runs a cached step with. `ran` lists the stages run, in order."""

    def __init__(self, runners: dict[str, Run], num_contexts: int):
        self.runners, self.num_contexts, self.ran = runners, num_contexts, []

    def _run(self, stage: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.ran.append(stage)
        out = self.runners[stage](*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def prologue(self, *inputs: torch.Tensor):
        out = self._run("prologue", *inputs)
        if len(out) != self.num_contexts + 3:
            raise RuntimeError(f"the prologue stage gave {len(out)} outputs, {self.num_contexts + 3} expected")
        return out[0], out[1:1 + self.num_contexts], out[-2], out[-1]

    def blocks(self, x: torch.Tensor, contexts: tuple[torch.Tensor, ...], temb_proj: torch.Tensor,
               start: int, stop: int | None) -> torch.Tensor:
        """Blocks `start` .. `stop` - 1, as the stages cut them (0-1, 1-N, 0-N)."""
        if start == 0:
            x = self._run("first_block", x, *contexts, temb_proj)[0]
            if stop == 1 or "other_blocks" not in self.runners:
                return x
        elif start != 1 or stop is not None:
            raise RuntimeError(f"stage engines cut the blocks at 1; blocks {start}-{stop} is not a stage")
        return self._run("other_blocks", x, *contexts, temb_proj)[0]

    def epilogue(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self._run("epilogue", x, temb)[0]
