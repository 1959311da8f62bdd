"""Step caching: diffusers' cache policies, decided the way diffusers' hooks decide, run by the front.

`WanTransformer.enable_cache(config)` takes diffusers' own config objects (read by their fields; this
module imports no diffusers):
- `FirstBlockCacheConfig(threshold)`: the first block always runs; when its residual (output minus
  input) changed by at most `threshold` (mean absolute change over the previous computed step's
  mean absolute residual), the other blocks are skipped and their last residual is added instead.
- `MagCacheConfig(threshold, max_skip_steps, retention_ratio, num_inference_steps, mag_ratios,
  calibrate)`: after the first `retention_ratio` of the steps, a step is skipped (every block; the
  last residual of the whole stack is added to its input) while the error accumulated from the
  magnitude ratios stays within `threshold` for at most `max_skip_steps` steps in a row. `mag_ratios`
  are interpolated to the step count by diffusers' config itself; `calibrate=True` skips nothing
  and, at the last step, prints the ratios of this checkpoint (also kept in `calibration`).

State is kept per cache context (diffusers' pipelines run the conditional and unconditional calls in
contexts "cond" and "uncond"): First-Block-Cache needs one (as in diffusers), MagCache uses
"inference" outside any. `reset()` (the pipeline's `_reset_stateful_cache` at its end) drops every
context's state; MagCache also starts over after `num_inference_steps` calls of a context, as
diffusers' hook does. The arithmetic is diffusers' own, step for step, so the same inputs give the
same skip decisions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import InputError

SUPPORTED = ("FirstBlockCacheConfig", "MagCacheConfig")

# What a policy runs, given by the caller: (tokens after the prologue) -> (tokens after the blocks).
Blocks = Callable[[torch.Tensor, int, int | None], torch.Tensor]  # (x, start, stop) -> x


@dataclass
class Step:
    """What one call did: which blocks ran, which results were reused."""

    computed: bool  # every block ran
    ran: str  # e.g. "blocks 0-39", "block 0"
    reused: str = ""  # e.g. "the residual of blocks 1-39 from step 12"

    def describe(self) -> str:
        return f"ran {self.ran}" + (f", reused {self.reused}" if self.reused else "")


@dataclass
class _FbcState:
    head_residual: torch.Tensor | None = None
    tail_residual: torch.Tensor | None = None
    calls: int = 0
    computed_at: int = -1


@dataclass
class _MagState:
    previous_residual: torch.Tensor | None = None
    accumulated_ratio: Any = 1.0
    accumulated_err: Any = 0.0
    accumulated_steps: int = 0
    step_index: int = 0
    calibration_ratios: list[float] = field(default_factory=list)
    computed_at: int = -1


def _blocks(start: int, stop: int) -> str:
    return f"block {start}" if stop - start == 1 else f"blocks {start}-{stop - 1}"


class CachePolicy(ABC):
    """One policy with a state per cache context."""

    name = ""
    default_context: str | None = None  # the context used outside any (None: a context is required)

    def __init__(self, config: Any):
        self.config = config
        self.states: dict[str, Any] = {}
        self.calls = 0  # calls run under this policy, and how many of them skipped blocks (never reset)
        self.skipped = 0

    def reset(self) -> None:
        self.states.clear()

    def __call__(self, x: torch.Tensor, blocks: Blocks, num_blocks: int, context: str | None) -> tuple[torch.Tensor, Step]:
        out, step = self.run(x, blocks, num_blocks, context)
        self.calls += 1
        self.skipped += not step.computed
        return out, step

    def state(self, context: str | None):
        context = context or self.default_context
        if context is None:
            raise InputError(f"{self.name} keeps its state per cache context: wrap the call in "
                             "`model.cache_context(name)` (diffusers' pipelines do)")
        if context not in self.states:
            self.states[context] = self.new_state()
        return self.states[context]

    @abstractmethod
    def new_state(self):
        """A fresh state for one cache context."""

    @abstractmethod
    def run(self, x: torch.Tensor, blocks: Blocks, num_blocks: int, context: str | None) -> tuple[torch.Tensor, Step]:
        """The tokens after the blocks for tokens `x` after the prologue, running what the policy
        decides through `blocks(x, start, stop)`; and what it ran and reused."""


class FirstBlockCache(CachePolicy):
    name = "FirstBlockCache"

    def __init__(self, config: Any):
        super().__init__(config)
        self.threshold = float(_field(config, "threshold"))

    def new_state(self):
        return _FbcState()

    def run(self, x, blocks, num_blocks, context):
        state = self.state(context)
        state.calls += 1
        head = blocks(x, 0, 1)
        residual = head - x
        compute = True
        if state.head_residual is not None:
            previous = state.head_residual
            diff = ((residual - previous).abs().mean() / previous.abs().mean()).item()
            compute = diff > self.threshold
        if num_blocks == 1:
            return head, Step(True, "block 0")
        if not compute:
            return (state.tail_residual + head,
                    Step(False, "block 0", f"the residual of {_blocks(1, num_blocks)} from call {state.computed_at}"))
        state.head_residual = residual
        out = blocks(head, 1, None)
        state.tail_residual = out - head
        state.computed_at = state.calls
        return out, Step(True, _blocks(0, num_blocks))


class MagCache(CachePolicy):
    name = "MagCache"
    default_context = "inference"

    def __init__(self, config: Any):
        super().__init__(config)
        self.threshold = _field(config, "threshold")
        self.max_skip_steps = _field(config, "max_skip_steps")
        self.retention_ratio = _field(config, "retention_ratio")
        self.num_inference_steps = _field(config, "num_inference_steps")
        self.mag_ratios = _field(config, "mag_ratios")
        self.calibrate = bool(_field(config, "calibrate"))
        self.calibration: dict[str, list[float]] = {}  # context -> the ratios of the last calibration run
        if self.mag_ratios is None and not self.calibrate:
            raise InputError("MagCacheConfig needs mag_ratios (or calibrate=True to measure them)")

    def new_state(self):
        return _MagState()

    def run(self, x, blocks, num_blocks, context):
        state = self.state(context)
        compute = True
        if not self.calibrate:
            step = state.step_index
            scale = 1.0 if step >= len(self.mag_ratios) else self.mag_ratios[step]
            retention_step = int(self.retention_ratio * self.num_inference_steps + 0.5)
            if step >= retention_step:
                state.accumulated_ratio *= scale
                state.accumulated_steps += 1
                state.accumulated_err += abs(1.0 - state.accumulated_ratio)
                if (state.previous_residual is not None and state.accumulated_err <= self.threshold
                        and state.accumulated_steps <= self.max_skip_steps):
                    compute = False
                else:
                    state.accumulated_ratio, state.accumulated_steps, state.accumulated_err = 1.0, 0, 0.0
        index = state.step_index
        if not compute:
            out = x + state.previous_residual
            step = Step(False, "no block", f"the residual of {_blocks(0, num_blocks)} from step {state.computed_at}")
        else:
            out = blocks(x, 0, None)
            residual = out - x
            if self.calibrate:
                if state.previous_residual is None:
                    ratio = 1.0
                else:
                    current = torch.linalg.norm(residual.float(), dim=-1)
                    previous = torch.linalg.norm(state.previous_residual.float(), dim=-1)
                    ratio = (current / (previous + 1e-8)).mean().item()
                state.calibration_ratios.append(ratio)
            state.previous_residual = residual
            state.computed_at = index
            step = Step(True, _blocks(0, num_blocks))
        self._advance(state, context or self.default_context)
        return out, step

    def _advance(self, state: _MagState, context: str) -> None:
        state.step_index += 1
        if state.step_index >= self.num_inference_steps:
            if self.calibrate:
                self.calibration[context] = list(state.calibration_ratios)
                print("\n[MagCache] Calibration Complete. Copy these values to MagCacheConfig(mag_ratios=...):")
                print(f"{state.calibration_ratios}\n")
            self.states[context] = self.new_state()


def _field(config: Any, name: str) -> Any:
    if not hasattr(config, name):
        raise InputError(f"{type(config).__name__} has no {name!r}: pass diffusers' own "
                         f"{type(config).__name__} (one of {', '.join(SUPPORTED)})")
    return getattr(config, name)


def policy_for(config: Any) -> CachePolicy:
    """The policy for diffusers' cache config `config`, or an InputError naming the supported ones."""
    kind = type(config).__name__
    if kind == "FirstBlockCacheConfig":
        return FirstBlockCache(config)
    if kind == "MagCacheConfig":
        return MagCache(config)
    raise InputError(f"cache config {kind} is not supported by the wan-build front; supported: "
                     f"{', '.join(SUPPORTED)} (diffusers.hooks)")
