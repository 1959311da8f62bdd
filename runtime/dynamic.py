"""`WanTransformer`: a drop-in for diffusers' `WanTransformer3DModel`.

It accepts what the diffusers model accepts (timestep as a scalar, `[B]` or `[B, L]`; CLIP image
tokens for Wan2.1 I2V, `[2B, 257, 1280]` for FLF2V), checks it, and serves the call from a
static model built for exactly that shape. The weights live once, here; each cached static model
shares them. `last_route` says which backend served the last call and why.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .compiled import compile_blocks, describe as describe_compiled, uncompile_blocks, why as compile_error
from .config import LatentSize, WanConfig, check_latent_size, get_preset
from .engines import EngineSet
from .errors import GeometryError, InputError
from .fp8 import Fp8Linear, quantize_fp8
from .integrity import weights_fingerprint
from .precision import Precision
from .static import StaticShape, StaticWanTransformer, add_parameters, parameter_shapes, skeleton
from .gguf import has_quantized
from .weights import check_tensors, load_checkpoint, materialize, parameter_dtype

log = logging.getLogger("wan_build.runtime")


@dataclass(frozen=True)
class Route:
    """How one call was served."""

    backend: str  # "eager", or the engine kind that ran it
    shape: StaticShape
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


class WanTransformerOutput:
    """What diffusers returns: `.sample`, also reachable as `out[0]` and `out["sample"]`."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if key in (0, "sample"):
            return self.sample
        raise KeyError(key)

    def to_tuple(self) -> tuple[torch.Tensor]:
        return (self.sample,)


class DiffusersConfig(dict):
    """The diffusers config dict, with attribute access (`model.config.in_channels`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class WanTransformer(nn.Module):
    """Wan DiT with a diffusers-compatible `forward`, served by fixed-shape models."""

    def __init__(self, config: WanConfig, tensors: Mapping[str, torch.Tensor] | None = None,
                 max_cached_shapes: int = 4, compile: bool = False):
        super().__init__()
        self.wan_config = config
        self.compile_blocks = bool(compile)  # see runtime.compiled
        self._compile_failed: dict[StaticShape, str] = {}
        self.config = DiffusersConfig(config.to_diffusers())
        self.max_cached_shapes = max(1, int(max_cached_shapes))
        self.last_route: Route | None = None
        self._cache_context: str | None = None
        self.cache_policy = None  # runtime.cache.CachePolicy, from enable_cache
        self.last_step = None  # runtime.cache.Step of the last cached call
        self._eager: OrderedDict[StaticShape, StaticWanTransformer] = OrderedDict()
        self._warned_attention_kwargs = False
        self._warned_nonfinite = False
        self._fp8 = False
        self._int8 = False  # runtime.int8 layers (precision int8 with bf16 elsewhere)
        self._int4 = False  # runtime.int4 layers (no engine precision: calls run the static model)
        self._loras: list = []  # [(LoraFile, strength)], merged into the parameters
        self._lora_base: dict[str, torch.Tensor] = {}  # the base tensors of the parameters LoRAs changed
        # FP8 layers: their high-precision weights as read (memory-mapped checkpoint views, no copy), what
        # `set_loras` merges into and re-quantizes; and which of them hold merged weights now.
        self._fp8_source: dict[str, torch.Tensor] = {}
        self._fp8_merged: set[str] = set()
        self.engines: EngineSet | None = None
        self.gguf = tensors is not None and has_quantized(tensors)  # weights kept in GGUF blocks
        if tensors is None:
            add_parameters(self, config)
        else:
            with skeleton():
                add_parameters(self, config)
            shapes = parameter_shapes(config)
            if has_quantized(tensors):  # GGUF weights kept in their blocks (runtime.gguf)
                from .gguf import expected_shapes, swap_gguf_layers

                shapes = expected_shapes(shapes, tensors)
                with skeleton():
                    swap_gguf_layers(self, tensors)
            check_tensors(shapes, tensors, config.name)
            self.load_state_dict(dict(tensors), strict=True, assign=True)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None, *,
                        subfolder: str | None = None, device: torch.device | str = "cpu",
                        preset: str | WanConfig | None = None, quantize: str | None = None,
                        fp8_scaling: str = "rowwise", engines: str | Path | None = None,
                        strict: bool = False, backends: list[str] | None = None, full_check: bool = False,
                        trusted: str | None = None, allow_mismatch: bool = False,
                        engine_options: dict[str, dict] | None = None, max_loaded_engines: int | None = 2,
                        max_cached_shapes: int = 4, compile: bool = False,
                        loras: list | None = None) -> "WanTransformer":
        """Load a diffusers or original-layout checkpoint (see `runtime.weights`), memory-mapped.

        `torch_dtype` follows diffusers: the time embedder, modulation tables and affine norms stay
        float32. `preset` (a name or a WanConfig) checks the checkpoint's structure against it.
        `quantize="fp8"` makes the linear layers of the middle blocks FP8 (see `runtime.fp8`; bf16
        elsewhere; needs an Ada, Hopper or Blackwell GPU).

        `engines`: an engine folder built by `wan-build build`. Its entries for these weights (by
        fingerprint), this precision and this machine serve the calls of their shapes; for other
        weights of the same model (a fine-tune), the entries that take the model's weights do
        (`runtime.engines`); every other call falls back to eager. Entries that cannot be used are
        refused with a logged reason; `strict=True` raises instead. `backends` limits and orders the backends tried. Every engine
        file is hashed in full before its first use in this process; `full_check` also re-hashes every
        entry's files at open. `trusted="sha256:..."` (from `wan-build verify --print-digest`) refuses
        the folder unless its manifest is exactly the pinned one. Entries built with
        `--allow-mismatch` are refused unless `allow_mismatch=True`, which serves them with a warning.
        `engine_options` are per-backend settings, e.g. `{"tensorrt": {"weight_streaming_budget_gb": 12}}`.
        `max_loaded_engines` caps the engines loaded at once (least recently used ones are released):
        every loaded TensorRT or ONNX Runtime engine holds its own copy of the weights.

        `compile=True`: calls that no engine serves run their static model compiled with
        torch.compile, regionally (`runtime.compiled`); a compile failure falls back to eager.

        `loras=[(path, strength), ...]` merges LoRA files at load (see `set_loras`).
        """
        if isinstance(preset, str):
            preset = get_preset(preset)
        device = check_device(device)
        checkpoint = load_checkpoint(path, subfolder=subfolder, preset=preset)
        shapes = parameter_shapes(checkpoint.config)
        # GGUF weights stay in their blocks (dequantized per layer at use); engines take full tensors
        keep = has_quantized(checkpoint.tensors) and engines is None
        if torch_dtype is None and str(path).endswith(".gguf"):  # its tensors mix types: one compute dtype
            torch_dtype = torch.float32
        if keep:
            from .gguf import expected_shapes

            if quantize is not None or loras:
                raise InputError(f"{path}: a GGUF model keeps its weights quantized; "
                                 f"{'quantize=' + repr(quantize) if quantize else 'loras'} cannot be applied to it "
                                 "(load a safetensors checkpoint for that)")
            check_tensors(expected_shapes(shapes, checkpoint.tensors), checkpoint.tensors, str(path))
        elif has_quantized(checkpoint.tensors):  # dequantized below: check the logical shapes
            from .gguf import logical_view

            check_tensors(shapes, logical_view(checkpoint.tensors), str(path))
        else:
            check_tensors(shapes, checkpoint.tensors, str(path))
        tensors = materialize(checkpoint.tensors, shapes, torch_dtype, device, keep_quantized=keep)
        model = cls(checkpoint.config, tensors, max_cached_shapes=max_cached_shapes, compile=compile)
        model.requires_grad_(False)
        if loras:
            model.set_loras(loras)
        if quantize == "int8":
            if model.dtype not in (torch.float32, torch.bfloat16):
                raise InputError(f"quantize='int8' with torch_dtype={model.dtype} is not supported; use "
                                 "torch_dtype=torch.bfloat16 or torch.float32")
            model.quantize_int8()
        elif quantize == "int4":
            if model.dtype != torch.bfloat16:
                raise InputError(f"quantize='int4' with torch_dtype={model.dtype} is not supported; INT4 layers "
                                 "take bf16 activations: use torch_dtype=torch.bfloat16")
            model.quantize_int4()
        elif quantize is not None:
            if quantize != "fp8" or model.dtype != torch.bfloat16:
                raise InputError(f"quantize={quantize!r} with torch_dtype={model.dtype} is not supported; "
                                 "use quantize='fp8' with torch_dtype=torch.bfloat16 (int4 too), or quantize='int8' "
                                 "with torch_dtype=torch.bfloat16 or torch.float32")
            model.quantize_fp8(fp8_scaling, source=checkpoint.tensors)
        if engines is not None:
            fingerprint = weights_fingerprint(checkpoint.tensors, checkpoint.files)
            model.engines = EngineSet.open(engines, fingerprint=fingerprint, precision=model.precision,
                                           device=model.device, strict=strict, backends=backends,
                                           full_check=full_check, trusted=trusted, allow_mismatch=allow_mismatch,
                                           engine_options=engine_options, max_loaded=max_loaded_engines,
                                           config=model.config)
        return model.eval()

    def quantize_int8(self) -> list[str]:
        """Make the middle blocks' linear layers INT8 (W8A8, `runtime.int8`) in place; returns their names.
        With bf16 elsewhere, `precision: int8` entries (AOTInductor) serve it; with fp32 no engine does."""
        from .int8 import quantize_int8

        names = self._quantize_weights("int8", quantize_int8)
        self._int8 = bool(names)
        return names

    def quantize_int4(self) -> list[str]:
        """Make the middle blocks' linear layers INT4 weight-only (groups of 128, bf16 activations,
        `runtime.int4`) in place; returns their names. No engine serves an INT4 model yet."""
        from .int4 import quantize_int4

        names = self._quantize_weights("int4", quantize_int4)
        self._int4 = bool(names)
        return names

    def _quantize_weights(self, kind: str, quantize) -> list[str]:
        if self.gguf or self._fp8 or self._int8 or self._int4:
            raise InputError(f"quantize_{kind}: this model is quantized already (GGUF, FP8, INT8 or INT4); load the "
                             "safetensors checkpoint")
        if self._loras:
            log.info("quantize_%s: the merged LoRAs are quantized in and stay", kind)
        names = quantize(self, self.wan_config.num_layers)
        self._drop_built()
        return names

    def quantize_fp8(self, scaling: str = "rowwise", check_device: bool = True,
                     source: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        """Make the middle blocks' linear layers FP8 in place (see `runtime.fp8`); returns their names.
        `source`: the checkpoint's tensors (memory-mapped, as `from_pretrained` passes them), kept by
        reference for the FP8 layers' weights so `set_loras` can merge into them and re-quantize;
        without it, LoRAs merged now stay and `set_loras` refuses."""
        if self.gguf:
            raise InputError("quantize_fp8 on a GGUF model: its weights are quantized already; load the safetensors "
                             "checkpoint to make FP8 layers")
        if self._fp8:
            raise InputError("this model is FP8-quantized already")
        names = quantize_fp8(self, self.wan_config.num_layers, scaling, check_device=check_device)
        self._fp8 = bool(names)
        weights = [f"{n}.weight" for n in names]
        if source is not None and all(w in source for w in weights):
            self._fp8_source = {w: source[w] for w in weights}
            self._fp8_merged = {w for w in weights if w in self._lora_base}
        for w in weights:  # the bf16 base copies go: the FP8 layers replaced those parameters
            self._lora_base.pop(w, None)
        if not self._fp8_source and self._loras:  # nothing to re-quantize from: these LoRAs stay merged
            self._lora_base.clear()
        self._drop_built()  # static models built on the bf16 layers are stale now
        return names

    def set_loras(self, loras: list) -> None:
        """Make `loras` (`[(path or LoraFile, strength), ...]`, a bare path meaning strength 1.0) the
        active set, in place; `[]` restores the base weights. Merges always start from the base
        tensors (kept for the parameters LoRAs touch, one copy of those alone), so A -> B -> A gives A's
        weights exactly; nothing is re-read from the checkpoint. Every file and key is checked before
        any weight changes: on an error the model keeps its current weights.

        Engines that take their weights from the model (`Entry.front_weights`) serve the merged
        weights: they are handed the new tensors on their next call, nothing is rebuilt. Engines that
        hold the checkpoint's weights (calibrated FP8/NVFP4 TensorRT plans) do not serve while LoRAs
        are active: those calls run the eager (or compiled) static model, and `last_route` says why."""
        from .lora import LoraFile, merged_tensors, plan_updates, read_loras

        if self._int8 or self._int4:
            raise InputError(f"set_loras on an {'INT8' if self._int8 else 'INT4'} model: pass loras= to "
                             "from_pretrained with quantize= (they are merged before quantizing)")
        if self.gguf:
            raise InputError("set_loras on a GGUF model: its weights stay quantized, so LoRAs cannot be merged "
                             "into them; load the safetensors checkpoint (or the GGUF file with engines=, which "
                             "dequantizes it) to use LoRAs")
        if self._fp8 and not self._fp8_source:
            raise InputError("set_loras on this FP8 model: its high-precision weights are not at hand to merge "
                             "into (it was quantized without them); load it with from_pretrained(..., "
                             "quantize='fp8'), which keeps the checkpoint's, or merge first (loras=[...])")
        if isinstance(loras, (str, Path, LoraFile)):
            raise InputError("set_loras takes a list: [(path, strength), ...]; [] restores the base weights")
        files = [(x, 1.0) if isinstance(x, LoraFile) else
                 (x[0], x[1]) if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], LoraFile)
                 else read_loras([x])[0] for x in loras]
        params = dict(self.named_parameters())
        base = {name: self._lora_base.get(name, p.data) for name, p in params.items()}
        plan = plan_updates(files, self.wan_config, base)
        fp8_layers = {f"{n}.weight": m for n, m in self.named_modules() if isinstance(m, Fp8Linear)}
        for name in set(plan) & set(fp8_layers):  # merge into the high-precision weights, as before quantizing
            base[name] = self._fp8_high_precision(name, fp8_layers[name])
        merged = merged_tensors(base, plan)
        with torch.no_grad():
            for name in list(self._lora_base):
                if name not in merged:  # no longer touched: back to the base tensor itself
                    params[name].data = self._lora_base.pop(name)
            for name in list(self._fp8_merged):
                if name not in merged:  # re-quantized from the checkpoint's weights: the original FP8 layer
                    self._set_fp8(fp8_layers[name], self._fp8_high_precision(name, fp8_layers[name]))
                    self._fp8_merged.discard(name)
            for name, tensor in merged.items():
                if name in fp8_layers:
                    self._set_fp8(fp8_layers[name], tensor)
                    self._fp8_merged.add(name)
                    continue
                self._lora_base.setdefault(name, params[name].data)
                params[name].data = tensor
        self._loras = [(f, float(s)) for f, s in files]
        self._eager.clear()  # the static models are rebuilt around the new tensors on their next call
        if self.engines is not None:
            self.engines.update_weights({name: p.detach() for name, p in self.named_parameters()})

    def _fp8_high_precision(self, name: str, layer: Fp8Linear) -> torch.Tensor:
        """An FP8 layer's weight as it was before quantization (the checkpoint's, cast as at load)."""
        return self._fp8_source[name].to(device=layer.weight.device, dtype=layer.out_dtype)

    @staticmethod
    def _set_fp8(layer: Fp8Linear, weight: torch.Tensor) -> None:
        q, scale = layer._quantize_plain(weight)  # the quantization `quantize_fp8` applied at load
        layer.weight.data = q
        layer.weight_scale.data = scale.reshape(layer.weight_scale.shape)

    @property
    def loras(self) -> list[tuple[str, float]]:
        """The active LoRAs: (file, strength)."""
        return [(str(f.path), s) for f, s in self._loras]

    def _lora_note(self) -> str:
        return "LoRAs " + ", ".join(f"{f.path.name} x{s:g}" for f, s in self._loras) if self._loras else ""

    def _apply(self, fn, recurse=True):
        # Moving or casting replaces the parameter tensors; static models built on the old ones go.
        # A cast to 16 bits keeps diffusers' precision policy: the float32-kept tensors stay float32.
        self._drop_built()
        out = super()._apply(fn, recurse)
        params = dict(self.named_parameters())
        for name, p in params.items():
            if p.dtype in (torch.float16, torch.bfloat16) and parameter_dtype(name, p.dtype) == torch.float32:
                p.data = p.data.float()
        # The kept base tensors of LoRA-merged parameters follow the parameters' device and dtype.
        self._lora_base = {name: fn(t).to(params[name].dtype) for name, t in self._lora_base.items()}
        return out

    def _drop_built(self) -> None:
        """Forget the eager static models and loaded engines built on the current tensors."""
        self._eager.clear()
        if self.engines is not None:
            self.engines.release()

    # -- what diffusers pipelines read --------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def precision(self) -> str | None:
        """The engine precision this model runs now (follows `.to(dtype)`), None for a dtype no engine has."""
        if self._fp8:
            return Precision.FP8.value
        if self._int8:  # INT8 engines have bf16 around their int8 layers
            return Precision.INT8.value if self.dtype == torch.bfloat16 else None
        if self._int4:
            return None
        try:
            return Precision.of_dtype(self.dtype).value
        except ValueError:
            return None

    @contextlib.contextmanager
    def cache_context(self, name: str, **fields: Any) -> Iterator[None]:
        """diffusers pipelines wrap the cond and uncond calls in this (with the step's fields, which
        the policies here do not need); a cache policy keeps one state per name."""
        previous, self._cache_context = self._cache_context, name
        try:
            yield
        finally:
            self._cache_context = previous

    # -- step caching (runtime.cache) ----------------------------------------------------------------
    def enable_cache(self, config: Any) -> None:
        """Step caching with diffusers' `FirstBlockCacheConfig` or `MagCacheConfig`, deciding each
        step as diffusers' hooks on `WanTransformer3DModel` do (see `runtime.cache`)."""
        from .cache import policy_for

        if self.cache_policy is not None:
            raise InputError(f"caching is enabled already ({self.cache_policy.name}); call disable_cache() first")
        self.cache_policy = policy_for(config)

    def disable_cache(self) -> None:
        if self.cache_policy is None:
            log.warning("disable_cache: caching was not enabled")
        self.cache_policy = None

    @property
    def is_cache_enabled(self) -> bool:
        return self.cache_policy is not None

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """What diffusers' pipelines call at the end of a generation: every context's state goes."""
        if self.cache_policy is not None:
            self.cache_policy.reset()

    # -- calls --------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = True,
                attention_kwargs: dict[str, Any] | None = None) -> WanTransformerOutput | tuple[torch.Tensor]:
        if attention_kwargs and attention_kwargs.get("scale", 1.0) != 1.0 and not self._warned_attention_kwargs:
            log.warning("attention_kwargs scale=%s ignored: this model carries no LoRA adapters",
                        attention_kwargs["scale"])
            self._warned_attention_kwargs = True
        shape, inputs = self.prepare_inputs(hidden_states, timestep, encoder_hidden_states,
                                            encoder_hidden_states_image)
        if not self._warned_nonfinite:
            bad = [n for n, t in zip(("hidden_states", "timestep", "encoder_hidden_states",
                                      "encoder_hidden_states_image"), inputs) if not bool(torch.isfinite(t).all())]
            if bad:
                log.warning("%s hold NaN or infinite values; the output will too (warned once per model)",
                            ", ".join(bad))
                self._warned_nonfinite = True
        sample = self.run(shape, inputs)
        return WanTransformerOutput(sample) if return_dict else (sample,)

    def run(self, shape: StaticShape, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Serve prepared inputs: the engine built for `shape`, else the eager static model."""
        if self.cache_policy is not None:
            return self._run_cached(shape, inputs)
        if self.engines is not None:
            engine, entry, reason = self.engines.route(shape, self.precision, self.device,
                                                       lambda: self._eager_model(shape)[0], self._lora_note())
            if engine is not None:
                self.last_route = Route(entry.backend, shape, reason)
                return engine(*inputs)
        else:
            reason = "no engine folder given" + (f"; {self._lora_note()}" if self._loras else "")
        model, how = self._eager_model(shape)
        if self.compile_blocks and shape not in self._compile_failed:
            try:
                out = model(*inputs)
            except Exception as e:  # a compile error must not fail the call: back to eager, say why
                self._compile_failed[shape] = compile_error(e)
                uncompile_blocks(model)
                log.warning("torch.compile failed for %s (%s); this shape runs eager", shape.describe(),
                            self._compile_failed[shape])
            else:
                self.last_route = Route("compiled", shape, f"{reason}; {how}, {describe_compiled(model)}")
                return out
        if shape in self._compile_failed:
            how += f"; torch.compile failed ({self._compile_failed[shape]})"
        self.last_route = Route("eager", shape, f"{reason}; {how}")
        return model(*inputs)

    def _run_cached(self, shape: StaticShape, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A call under a cache policy: the prologue, the blocks the policy asks for, the epilogue,
        on the eager (or compiled) static model of the shape."""
        policy, steps = self.cache_policy, []

        def parts(model: StaticWanTransformer, *args: torch.Tensor) -> torch.Tensor:
            x, contexts, temb, temb_proj = model.prologue(*args)
            x, step = policy(x, lambda h, start, stop: model.run_blocks(h, contexts, temb_proj, start, stop),
                             len(model.blocks), self._cache_context)
            steps.append(step)
            return model.epilogue(x, temb)

        where = f" in context {self._cache_context}" if self._cache_context else ""
        note = f"; {self._lora_note()}" if self._loras else ""
        if self.engines is not None:
            out, why_stages = self._run_stages(shape, inputs, where, note)
            if out is not None:
                return out
            engine, entry, why = self.engines.route(shape, self.precision, self.device,
                                                    lambda: self._eager_model(shape)[0], self._lora_note(), parts=True)
            why = f"{why_stages}; {why}"
            if engine is not None:
                out = engine.run_parts(inputs, parts)
                self.last_step = steps[-1]
                self.last_route = Route(entry.backend, shape, f"{policy.name}{where}: {steps[-1].describe()} "
                                        f"(through the engine's compiled block); {why}{note}")
                return out
        model, how = self._eager_model(shape)
        out = parts(model, *inputs)
        self.last_step = steps[-1]
        reason = f"{policy.name}{where}: {steps[-1].describe()}; {how}"
        if self.engines is not None:
            reason += f"; {why}"
        backend = "compiled" if self.compile_blocks and shape not in self._compile_failed else "eager"
        self.last_route = Route(backend, shape, reason + note)
        return out

    def _run_stages(self, shape: StaticShape, inputs: tuple[torch.Tensor, ...], where: str,
                    note: str) -> tuple[torch.Tensor | None, str]:
        """A cached call on the stage engines of `shape` (`runtime.stages`): each stage the policy's step
        needs runs on its engine. (output, "") or, when no complete set of them serves, (None, why)."""
        from .stages import StageModel, StagedCall, stages_of

        config = self.wan_config
        runners, name, why = self.engines.route_stages(
            shape, self.precision, self.device, lambda stage: StageModel(self._eager_model(shape)[0], stage),
            stages_of(config.num_layers), self._lora_note())
        if runners is None:
            return None, why
        policy, call = self.cache_policy, StagedCall(runners, 2 if config.image_dim is not None else 1)
        x, contexts, temb, temb_proj = call.prologue(*inputs)
        x, step = policy(x, lambda h, start, stop: call.blocks(h, contexts, temb_proj, start, stop),
                         config.num_layers, self._cache_context)
        out = call.epilogue(x, temb)
        self.last_step = step
        self.last_route = Route(name, shape, f"{policy.name}{where}: {step.describe()}; stage engines run: "
                                f"{', '.join(call.ran)}; {why}{note}")
        return out, ""

    def _eager_model(self, shape: StaticShape) -> tuple[StaticWanTransformer, str]:
        model = self._eager.get(shape)
        if model is not None:
            self._eager.move_to_end(shape)
            return model, "eager static model (cached)"
        model = StaticWanTransformer.from_parameters(self.wan_config, shape, dict(self.named_parameters()))
        if self.compile_blocks and shape not in self._compile_failed:
            compile_blocks(model)
        self._eager[shape] = model
        if len(self._eager) > self.max_cached_shapes:
            old, _ = self._eager.popitem(last=False)
            log.info("evicted the eager model for %s (cache holds %d shapes)", old.describe(), self.max_cached_shapes)
        return model, "eager static model built for this shape"

    def prepare_inputs(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float,
                       encoder_hidden_states: torch.Tensor, encoder_hidden_states_image: torch.Tensor | None
                       ) -> tuple[StaticShape, tuple[torch.Tensor, ...]]:
        """Check a diffusers-style call and turn it into (static shape, the static model's inputs)."""
        return static_call(self.wan_config, self.dtype, self.device, hidden_states, timestep,
                           encoder_hidden_states, encoder_hidden_states_image)


def static_call(c: WanConfig, dtype: torch.dtype, device: torch.device, hidden_states: torch.Tensor,
                timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None) -> tuple[StaticShape, tuple[torch.Tensor, ...]]:
    """Check a diffusers-style call of a `c` model and turn it into (static shape, the static model's
    inputs in `dtype` on `device`). Bad input raises InputError naming the argument and the rule."""
    x = _tensor("hidden_states", hidden_states, ndim=5, layout="[batch, channels, frames, height, width]")
    b, channels, f, h, w = x.shape
    if channels != c.in_channels:
        raise InputError(f"hidden_states has {channels} channels; {c.name} takes {c.in_channels}"
                         f"{_channel_hint(c)}")
    try:
        check_latent_size(c, LatentSize(f, h, w))
    except GeometryError as e:
        raise InputError(f"hidden_states latent size {f}x{h}x{w}: {e}") from None
    tokens = LatentSize(f, h, w).tokens(c)

    ctx = _tensor("encoder_hidden_states", encoder_hidden_states, ndim=3, layout="[batch, text_tokens, text_dim]")
    if ctx.shape[0] != b or ctx.shape[2] != c.text_dim:
        raise InputError(f"encoder_hidden_states is {list(ctx.shape)}; {c.name} wants [{b}, tokens, {c.text_dim}] "
                         f"(batch {b} as in hidden_states)")
    t, per_token = _timestep(timestep, b, tokens)
    inputs = [x.to(device=device, dtype=dtype), t.to(device=device, dtype=torch.float32),
              ctx.to(device=device, dtype=dtype)]

    image_tokens = 0
    if c.image_dim is None:
        if encoder_hidden_states_image is not None:
            raise InputError(f"{c.name} takes no encoder_hidden_states_image (only Wan2.1 I2V/FLF2V models do)")
    else:
        if encoder_hidden_states_image is None:
            raise InputError(f"{c.name} needs encoder_hidden_states_image (CLIP image tokens, "
                             f"[batch, 257, {c.image_dim}])")
        img = _tensor("encoder_hidden_states_image", encoder_hidden_states_image, ndim=3,
                      layout="[batch, image_tokens, image_dim]")
        if img.shape[2] != c.image_dim or (img.shape[0] * img.shape[1]) % b:
            raise InputError(f"encoder_hidden_states_image is {list(img.shape)}; {c.name} wants "
                             f"[{b}, tokens, {c.image_dim}]")
        # FLF2V pipelines pass first- and last-frame tokens as [2B, 257, d]; the model sees [B, 514, d].
        img = img.reshape(b, -1, c.image_dim)
        image_tokens = img.shape[1]
        if c.image_pos_embed and image_tokens != c.image_tokens:
            raise InputError(f"{c.name} needs {c.image_tokens} image tokens per sample (first and last "
                             f"frame), got {image_tokens}")
        if ctx.shape[1] != 512:
            raise InputError(f"{c.name} needs exactly 512 text tokens (image/text split at len - 512); "
                             f"got {ctx.shape[1]}: pad the prompt embedding with zero rows")
        inputs.append(img.to(device=device, dtype=dtype))
    shape = StaticShape(b, f, h, w, ctx.shape[1], image_tokens, per_token)
    return shape, tuple(inputs)


def _tensor(name: str, value: Any, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor {layout}, got {type(value).__name__}")
    if value.ndim != ndim:
        raise InputError(f"{name} must be {ndim}-D {layout}, got shape {list(value.shape)}")
    if not value.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.is_meta:
        raise InputError(f"{name} is on the meta device (it has shapes but no values); pass a real tensor")
    return value


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device this machine has, or an InputError naming it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device={device!r} is not a device ({str(e).splitlines()[0][:120]}); use 'cpu' or "
                         "'cuda' / 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device={str(device)!r}, but torch sees no CUDA GPU here (torch {torch.__version__}, "
                             f"CUDA {torch.version.cuda or 'none'}); use device='cpu' or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device={str(device)!r}, but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
    elif device.type not in ("cpu", "meta"):
        raise InputError(f"device={str(device)!r} is not supported; use 'cpu' or 'cuda'")
    if device.type == "meta":
        raise InputError("device='meta' holds no values; load the model on 'cpu' or 'cuda'")
    return device


def _timestep(timestep: Any, batch: int, tokens: int) -> tuple[torch.Tensor, bool]:
    """Scalar, [1], [B], [B, 1], [1, 1], [B, L] or [1, L] -> [B] or [B, L] (and whether it is per token)."""
    if isinstance(timestep, torch.Tensor):
        t = timestep
    elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        t = torch.tensor(float(timestep))
    else:
        raise InputError(f"timestep must be a number or a tensor (a scalar, [{batch}] or [{batch}, {tokens}]), got "
                         f"{type(timestep).__name__} {str(timestep)[:40]!r}")
    if t.is_meta:
        raise InputError("timestep is on the meta device (it has no values); pass a real tensor")
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise InputError(f"timestep must hold real numbers, got {t.dtype}")
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1) or (t.ndim == 2 and tuple(t.shape) == (1, 1)):
        return t.reshape(1).expand(batch), False
    if t.ndim == 1 and t.shape[0] == batch:
        return t, False
    if t.ndim == 2 and tuple(t.shape) == (batch, 1) and tokens != 1:  # diffusers: one value per sample
        return t.reshape(batch), False
    if t.ndim == 2 and t.shape[0] in (1, batch) and t.shape[1] == tokens:
        return t.expand(batch, tokens), True
    raise InputError(f"timestep has shape {list(t.shape)}; expected a scalar, [{batch}] or [{batch}, {tokens}] "
                     f"(one value per sample, or per token: {tokens} tokens at this latent size)")


def _channel_hint(config: WanConfig) -> str:
    if config.in_channels == 36:
        return " (16 noise + 4 mask + 16 image-latent channels, concatenated by the I2V pipeline)"
    if config.in_channels == 48:
        return " (Wan2.2 VAE latents)"
    return ""
