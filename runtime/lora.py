"""LoRA files for Wan: read, check against a model's structure, merge from the base weights.

Layouts, as diffusers' Wan LoRA loader reads them (names are mapped to diffusers module names here,
once):
- diffusers / PEFT: `transformer.blocks.0.attn1.to_q.lora_A.weight` / `.lora_B.weight` (the
  `transformer.` prefix optional), `lora_B.bias` for bias deltas;
- original Wan: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `.lora_up.weight` (or
  `lora_A` / `lora_B`), `.alpha`, `.diff_b` (bias delta), `.diff` (full weight delta);
- musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight` / `.lora_up.weight` / `.alpha`.

A layer's update is `strength * alpha / rank * (up @ down)` (`alpha = rank` when the file has none),
plus `strength * diff` and, for the bias, `strength * diff_b`. Merging accumulates every active
LoRA's update in float32 on the weights' device and casts once; it always starts from the base
tensors, so switching LoRAs never drifts. Keys that name no layer of the model are an error that
lists them; keys aimed only at layers this variant lacks (image cross-attention on a text-to-video
model) are a warning that names them; nothing is merged partially. Pickle files are refused.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .config import WanConfig
from .errors import InputError, WeightsError
from .weights import PICKLE_SUFFIXES, original_to_diffusers_name, read_safetensors, read_safetensors_metadata

log = logging.getLogger("wan_build.lora")

LAYOUTS = ("diffusers", "original", "musubi")
# Layers only image-conditioned variants have: a LoRA trained on I2V may carry them.
IMAGE_ONLY = ("attn2.add_k_proj", "attn2.add_v_proj", "attn2.norm_added_k", "condition_embedder.image_embedder")


@dataclass
class LoraLayer:
    """The parts of a LoRA for one module (diffusers name, e.g. `blocks.0.attn1.to_q`)."""

    down: torch.Tensor | None = None  # [rank, in] (lora_A / lora_down)
    up: torch.Tensor | None = None  # [out, rank] (lora_B / lora_up)
    alpha: float | None = None
    diff: torch.Tensor | None = None  # full weight delta
    diff_b: torch.Tensor | None = None  # bias delta
    keys: list[str] = field(default_factory=list)  # the file's keys, for messages
    source: str = ""  # the module's name in the file (e.g. `diffusion_model.blocks.0.self_attn.q`)

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank (1 without alpha)."""
        if self.down is None or self.alpha is None:
            return 1.0
        return self.alpha / self.rank


@dataclass
class LoraFile:
    path: Path
    layout: str
    layers: dict[str, LoraLayer]

    @property
    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.layers.values() if layer.rank is not None})

    def describe(self) -> str:
        ranks = "/".join(map(str, self.ranks)) or "-"
        return f"{self.path.name} ({self.layout} layout, {len(self.layers)} layers, rank {ranks})"


# -- reading ------------------------------------------------------------------------------------------
_PARTS = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
          "lora_B.bias": "diff_b", "alpha": "alpha", "diff": "diff", "diff_b": "diff_b"}
_SUFFIX = re.compile(r"^(.*)\.(lora_A\.weight|lora_down\.weight|lora_B\.weight|lora_up\.weight|lora_B\.bias|"
                     r"alpha|diff_b|diff)$")


def detect_lora_layout(names: Sequence[str]) -> str:
    if names and all(n.startswith("lora_unet_") for n in names):
        return "musubi"
    if names and all(n.startswith("diffusion_model.") for n in names):
        return "original"
    stripped = [n.removeprefix("transformer.") for n in names]
    if any(".attn1." in n or ".attn2." in n or n.startswith("condition_embedder.") or n.startswith("proj_out.")
           for n in stripped):
        return "diffusers"
    if any(".self_attn." in n or ".cross_attn." in n or n.startswith(("head.", "time_embedding."))
           for n in stripped):
        return "original"
    raise WeightsError("the keys are neither the diffusers/PEFT, the original Wan nor the musubi LoRA layout "
                       f"(first keys: {', '.join(list(names)[:3]) or 'none'})")


def _musubi_module(name: str) -> str:
    """`blocks_0_self_attn_q` -> `blocks.0.self_attn.q` (original names), `blocks_3_ffn_0` -> `blocks.3.ffn.0`."""
    m = re.fullmatch(r"blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)", name)
    if m:
        return f"blocks.{m[1]}.{m[2]}.{m[3]}"
    m = re.fullmatch(r"blocks_(\d+)_(ffn)_(\d+)", name)
    if m:
        return f"blocks.{m[1]}.ffn.{m[3]}"
    m = re.fullmatch(r"(text_embedding|time_embedding|time_projection)_(\d+)", name)
    if m:
        return f"{m[1]}.{m[2]}"
    if name == "head_head":
        return "head.head"
    return name  # unknown: reported as matching no layer


def _to_diffusers_module(module: str, layout: str) -> str:
    if layout == "diffusers":
        return module
    if layout == "musubi":
        module = _musubi_module(module)
    return original_to_diffusers_name(module + ".weight").removesuffix(".weight")


def read_lora(path: str | Path) -> LoraFile:
    """A LoRA file's layers under diffusers module names (tensors memory-mapped, not copied)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"LoRA {path}: pickle files are refused (they can run code when opened); convert it to "
                           ".safetensors")
    if not path.is_file():
        raise WeightsError(f"LoRA {path}: no such file")
    tensors = read_safetensors(path)
    if not tensors:
        raise WeightsError(f"LoRA {path}: the file holds no tensors")
    try:
        layout = detect_lora_layout(list(tensors))
    except WeightsError as e:
        raise WeightsError(f"LoRA {path}: {e}") from None
    prefix = {"musubi": "lora_unet_", "original": "diffusion_model.", "diffusers": "transformer."}[layout]
    layers: dict[str, LoraLayer] = {}
    for key, value in tensors.items():
        name = key.removeprefix(prefix)
        m = _SUFFIX.match(name)
        if m is None:
            raise WeightsError(f"LoRA {path}: key {key!r} is no LoRA part (lora_A/lora_B, lora_down/lora_up, "
                               "alpha, diff, diff_b)")
        module, part = _to_diffusers_module(m[1], layout), _PARTS[m[2]]
        layer = layers.setdefault(module, LoraLayer(source=key[:len(key) - len(m[2]) - 1]))
        layer.keys.append(key)
        if part == "alpha":
            if value.numel() != 1 or not math.isfinite(float(value.float().reshape(()))):
                raise WeightsError(f"LoRA {path}: {key} must be one finite number")
            layer.alpha = float(value.float().reshape(()))
        else:
            if not value.is_floating_point():
                raise WeightsError(f"LoRA {path}: {key} is {value.dtype}, not a floating-point tensor")
            setattr(layer, part, value)
    if layout == "diffusers":
        _apply_peft_config(path, layers)
    for module, layer in layers.items():
        if (layer.down is None) != (layer.up is None):
            have, lack = ("down", "up") if layer.up is None else ("up", "down")
            raise WeightsError(f"LoRA {path}: {module} has a {have} matrix but no {lack} matrix "
                               f"({', '.join(layer.keys)}); the file is incomplete")
        if layer.down is not None and (layer.down.ndim != 2 or layer.up.ndim != 2
                                       or layer.up.shape[1] != layer.down.shape[0]):
            raise WeightsError(f"LoRA {path}: {module}: up {list(layer.up.shape)} and down {list(layer.down.shape)} "
                               "are not [out, rank] and [rank, in]")
    return LoraFile(path, layout, layers)


def _pattern_value(patterns: Mapping[str, object], module: str) -> object | None:
    """PEFT's per-module override: the pattern that matches the end of the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _apply_peft_config(path: Path, layers: dict[str, LoraLayer]) -> None:
    """diffusers writes the adapter's PEFT config into the file (`lora_adapter_metadata`): its
    `lora_alpha` (with `alpha_pattern` overrides) and `use_rslora` set the scale, as diffusers'
    loader applies them. Without it the scale is 1 (alpha = rank), as diffusers assumes."""
    raw = read_safetensors_metadata(path).get("lora_adapter_metadata")
    if not raw:
        return
    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise WeightsError(f"LoRA {path}: its lora_adapter_metadata is not valid JSON ({e})") from None
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    alpha, rslora = config.get("lora_alpha"), bool(config.get("use_rslora", False))
    alphas, ranks = config.get("alpha_pattern") or {}, config.get("rank_pattern") or {}
    for module, layer in layers.items():
        if layer.down is None:
            continue
        a = _pattern_value(alphas, module) if isinstance(alphas, dict) else None
        a = alpha if a is None else a
        r = _pattern_value(ranks, module) if isinstance(ranks, dict) else None
        r = layer.rank if r is None else r
        if a is None:
            continue
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not isinstance(r, int):
            raise WeightsError(f"LoRA {path}: lora_alpha {a!r} / r {r!r} for {module} in its metadata must be numbers")
        if r != layer.rank:
            raise WeightsError(f"LoRA {path}: {module} has rank {layer.rank}, its metadata says r = {r}")
        # Stored as the alpha that gives PEFT's scale under alpha / rank.
        layer.alpha = float(a) * (math.sqrt(r) if rslora else 1.0)


# -- checking and merging ---------------------------------------------------------------------------
def _check_strength(path: Path, strength: object) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise WeightsError(f"LoRA {path}: strength {strength!r} must be a finite number (1.0 is full strength)")
    return float(strength)


def plan_updates(loras: Sequence[tuple[LoraFile, float]], config: WanConfig,
                 params: Mapping[str, torch.Tensor]) -> dict[str, list[tuple[LoraFile, float, LoraLayer, str]]]:
    """Which parameter each LoRA layer updates, every check made before anything changes:
    parameter name -> [(file, strength, layer, part)], part "weight" or "bias"."""
    plan: dict[str, list] = {}
    for lora, strength in loras:
        strength = _check_strength(lora.path, strength)
        unknown, absent = [], []
        for module, layer in lora.layers.items():
            targets = []
            if layer.down is not None or layer.diff is not None:
                targets.append(("weight", f"{module}.weight"))
            if layer.diff_b is not None:
                targets.append(("bias", f"{module}.bias"))
            for part, name in targets:
                if name not in params:
                    missing = absent if any(t in module for t in IMAGE_ONLY) else unknown
                    if layer.source not in missing:
                        missing.append(layer.source)
                    continue
                shape = params[name].shape
                if part == "weight":
                    if layer.down is not None:
                        want = (int(layer.up.shape[0]), int(layer.down.shape[1]))
                        if len(shape) != 2 or tuple(shape) != want:
                            raise WeightsError(f"LoRA {lora.path}: {layer.keys[0]} updates {name} {list(shape)} "
                                               f"with [{want[0]}, {want[1]}]: a LoRA for another model size")
                    if layer.diff is not None and tuple(layer.diff.shape) != tuple(shape):
                        raise WeightsError(f"LoRA {lora.path}: {module}.diff is {list(layer.diff.shape)}, {name} "
                                           f"is {list(shape)}: a LoRA for another model size")
                elif tuple(layer.diff_b.shape) != tuple(shape):
                    raise WeightsError(f"LoRA {lora.path}: the bias delta of {module} is {list(layer.diff_b.shape)}, "
                                       f"{name} is {list(shape)}: a LoRA for another model size")
                plan.setdefault(name, []).append((lora, strength, layer, part))
        if unknown:
            raise WeightsError(f"LoRA {lora.path}: {len(unknown)} layer(s) match no layer of {config.name}: "
                               f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''} (a LoRA for another "
                               "model?); nothing was merged")
        if absent:
            log.warning("LoRA %s: %d layer(s) target image layers %s lacks, not applied: %s", lora.path, len(absent),
                        config.name, ", ".join(absent[:8]) + (" ..." if len(absent) > 8 else ""))
    return plan


def merged_tensors(base: Mapping[str, torch.Tensor], plan: Mapping[str, list]) -> dict[str, torch.Tensor]:
    """New tensors for the parameters `plan` touches: base + every update, summed in float32 on the
    base tensor's device, cast once to its dtype. The base tensors are not changed."""
    out = {}
    for name, updates in plan.items():
        ref = base[name]
        acc = ref.to(torch.float32, copy=True)
        for lora, strength, layer, part in updates:
            if part == "bias":
                acc += strength * layer.diff_b.to(ref.device, torch.float32)
                continue
            if layer.down is not None:
                up = layer.up.to(ref.device, torch.float32)
                down = layer.down.to(ref.device, torch.float32)
                acc.addmm_(up, down, alpha=strength * layer.scale)
            if layer.diff is not None:
                acc += strength * layer.diff.to(ref.device, torch.float32)
        out[name] = acc.to(ref.dtype)
    return out


def read_loras(loras: Sequence[tuple[str | Path, float]] | None) -> list[tuple[LoraFile, float]]:
    """`[(path, strength), ...]` (a bare path means strength 1.0) -> files read and strengths checked."""
    out = []
    if isinstance(loras, (str, Path)):
        raise InputError(f"loras={str(loras)!r} must be a list: [(path, strength), ...]")
    for item in loras or ():
        if isinstance(item, (str, Path)):
            path, strength = item, 1.0
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, Path)):
            path, strength = item
        else:
            raise InputError(f"loras: {item!r} is not a path or a (path, strength) pair")
        lora = read_lora(path)
        out.append((lora, _check_strength(lora.path, strength)))
    return out
