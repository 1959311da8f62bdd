"""Two-expert models (Wan2.2 A14B) outside diffusers.

diffusers' Wan2.2 pipelines hold the experts as `transformer` (high noise) and `transformer_2`
(low noise) and switch at `t >= boundary_ratio * 1000`; give each a `WanTransformer`. For other
callers, `WanExpertRouter` makes the same choice per call, and `load_engines` opens an engine
folder with the weights its manifest names.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .dynamic import Route, WanTransformer
from .errors import InputError
from .manifest import EngineError, read_manifest


class WanExpertRouter(nn.Module):
    """Calls the high-noise expert for t >= boundary * 1000, the low-noise expert otherwise."""

    def __init__(self, high_noise: WanTransformer, low_noise: WanTransformer, boundary: float,
                 release_idle: bool | None = None):
        """`release_idle`: drop the idle expert's loaded engines when the other one takes over
        (True), never (False), or when the GPU has less than a quarter of its memory free (None)."""
        super().__init__()
        self.high_noise, self.low_noise, self.boundary = high_noise, low_noise, float(boundary)
        self.release_idle = release_idle
        self.last_expert: str | None = None

    @property
    def last_route(self) -> Route | None:
        return None if self.last_expert is None else getattr(self, self.last_expert).last_route

    def expert_for(self, timestep: Any) -> str:
        high = torch.as_tensor(timestep) >= self.boundary * 1000
        count = int(high.sum())  # one host read per step, not two
        if count == high.numel():
            return "high_noise"
        if count == 0:
            return "low_noise"
        raise InputError(f"timestep values lie on both sides of the expert boundary ({self.boundary * 1000:g}); "
                         "samples at different noise levels need different experts: call them separately")

    def _memory_short(self, device: torch.device) -> bool:
        if self.release_idle is not None:
            return self.release_idle
        if device.type != "cuda":
            return False
        free, total = torch.cuda.mem_get_info(device)
        return free < total / 4

    def set_loras(self, high_noise: list | None = None, low_noise: list | None = None) -> None:
        """Each expert's active LoRAs (Wan2.2 LoRAs come as high/low-noise pairs); None leaves an
        expert as it is, [] restores its base weights. Both sets are checked before either changes."""
        from .lora import plan_updates, read_loras

        for name, loras in (("high_noise", high_noise), ("low_noise", low_noise)):
            if loras is not None:
                expert = getattr(self, name)
                plan_updates(read_loras(loras), expert.wan_config, dict(expert.named_parameters()))
        if high_noise is not None:
            self.high_noise.set_loras(high_noise)
        if low_noise is not None:
            self.low_noise.set_loras(low_noise)

    # -- step caching: each expert keeps its own policy state ----------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str, **fields: Any) -> Iterator[None]:
        with self.high_noise.cache_context(name, **fields), self.low_noise.cache_context(name, **fields):
            yield

    def enable_cache(self, config: Any) -> None:
        """The same cache config on both experts, each with its own state (see `runtime.cache`)."""
        from .cache import policy_for

        policy_for(config)  # an unsupported config changes neither expert
        for expert in (self.high_noise, self.low_noise):
            expert.enable_cache(config)

    def disable_cache(self) -> None:
        for expert in (self.high_noise, self.low_noise):
            expert.disable_cache()

    @property
    def is_cache_enabled(self) -> bool:
        return self.high_noise.is_cache_enabled

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        for expert in (self.high_noise, self.low_noise):
            expert._reset_stateful_cache()

    def forward(self, hidden_states: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = True,
                attention_kwargs: dict[str, Any] | None = None):
        expert = self.expert_for(timestep)
        if self.last_expert is not None and expert != self.last_expert:
            idle = getattr(self, self.last_expert)
            if idle.engines is not None and self._memory_short(idle.device):
                idle.engines.release()  # the idle expert's engines reload on its next call
                if idle.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.last_expert = expert
        return getattr(self, self.last_expert)(hidden_states, timestep, encoder_hidden_states,
                                               encoder_hidden_states_image, return_dict, attention_kwargs)


def load_engines(folder: str | Path, torch_dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                 trusted: str | None = None, loras: list | dict[str, list] | None = None,
                 **kwargs: Any) -> WanTransformer | WanExpertRouter:
    """Open an engine folder with the weights its manifest names: one front, or a router over two.

    `trusted="sha256:..."` pins the manifest (`wan-build verify FOLDER --print-digest`): a folder whose
    manifest is not that one raises before anything it names is read. `loras`: `[(path, strength), ...]`
    for a one-expert model, `{"high_noise": [...], "low_noise": [...]}` for two. Other keywords go to
    `WanTransformer.from_pretrained`."""
    manifest = read_manifest(Path(folder), trusted)
    experts = manifest.experts
    two = "high_noise" in experts or "low_noise" in experts
    if isinstance(loras, dict):
        unknown = set(loras) - set(experts)
        if unknown or not two:
            raise InputError(f"loras names {', '.join(sorted(unknown or loras))}; this folder's experts are "
                             f"{', '.join(experts)}" + ("" if two else " (give a plain list for a one-expert model)"))
    elif loras and two:
        raise InputError("loras for a two-expert model is a dict: {'high_noise': [...], 'low_noise': [...]}")

    def front(name: str) -> WanTransformer:
        if name not in experts:
            raise EngineError(f"{folder}: the manifest has no {name} expert (it has {', '.join(experts) or 'none'})")
        mine = loras.get(name) if isinstance(loras, dict) else loras
        return WanTransformer.from_pretrained(experts[name].weights, torch_dtype, device=device, engines=folder,
                                              trusted=trusted, loras=mine, **kwargs)

    if two:
        if manifest.boundary is None:
            raise EngineError(f"{folder}: the manifest has two experts but no boundary")
        return WanExpertRouter(front("high_noise"), front("low_noise"), manifest.boundary)
    return front("main")
