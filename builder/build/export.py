"""Static model -> ONNX, and the parity gate every engine passes before it is written.

Opset: 23 by default. There `scaled_dot_product_attention` exports as the ONNX `Attention` op and
RMSNorm as `RMSNormalization`: 25% fewer nodes, the form NVIDIA's own Wan export uses, parsed by
TensorRT >= 10.15 and run by ONNX Runtime >= 1.22. Opset 20 (a profile's `onnx_opset: 20`)
decomposes both into MatMul/Softmax and Pow/ReduceMean, for older TensorRT; TensorRT still fuses
that attention pattern because the exporter scales Q and K before the first MatMul.

Inputs: the static model's tensors, then its shape tables (RoPE cos/sin and the timestep
frequencies). With the tables outside the graph, the initializers are the weights alone and
identical for every shape, so `model.onnx.data` is stored once per model and precision and
hard-linked into each entry.

Host memory: the graph is traced on the meta device and the real tensors (memory-mapped
checkpoint views, or one cast copy) are attached afterwards, so exporting a 14B model holds one
copy of its weights, not two. Weights always go to `model.onnx.data` (external data), so files
over 2 GB work.

The weights file is then stored once per content (`builder.build.folder.share_weights`).

Named weights: every parameter is an initializer under its own name (`model.<parameter name>`), in
its own layout. The exporter's optimizer would fold `Transpose(weight)` of each linear layer into a
new unnamed constant (`val_123`); that folding is turned off for nodes that read a weight, so an
engine can be handed other weights of the same layout by name (ONNX Runtime `add_initializer`,
TensorRT refit) and the graph holds no value derived from the weights. Transposes are left to the
engine's optimizer (ONNX Runtime fuses them into its MatMul/Gemm, TensorRT into its GEMMs).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from runtime.config import WanConfig
from runtime.manifest import ONNX_DATA, ONNX_FILE, WEIGHT_PREFIX
from runtime.stages import StageModel
from runtime.static import SHAPE_TABLES, StaticShape, StaticWanTransformer

TABLE_INPUTS = SHAPE_TABLES
EXPORT_FORM = "named-weights"  # in the identity of entries built from the export (see the module doc)


class TablesAsInputs(torch.nn.Module):
    """The static model (or one stage of it) with its shape tables (RoPE cos/sin, timestep
    frequencies) as graph inputs.

    Initializers are then the weights alone, identical for every shape of one model and precision,
    so their data file is stored once and hard-linked into each shape's folder; the runtime feeds the
    tables from the static model it builds for the shape anyway."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor):
        n = len(self.model.input_names)
        tables = dict(zip(table_names(self.model), args[n:]))
        return torch.func.functional_call(self.model, tables, args[:n], strict=False)


def table_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The shape tables `model` reads: all of them for the whole model, a stage's own for a stage."""
    return tuple(getattr(model, "table_names", TABLE_INPUTS))


def onnx_input_names(model: torch.nn.Module) -> list[str]:
    return list(model.input_names) + list(table_names(model))


def export_onnx(config: WanConfig, shape: StaticShape, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                folder: Path, opset: int = 23, stage: Callable[[str], None] = lambda s: None,
                named_weights: bool = True, model_stage: str | None = None,
                inputs_like: Sequence[torch.Tensor] | None = None) -> Path:
    """Write `folder/model.onnx` (+ `model.onnx.data`, the weights) for `config` at `shape`.

    `tensors` are the model's parameters and shape tables (name -> tensor) in their final dtypes.
    Inputs: the static model's, then the tables (`TABLE_INPUTS`). `stage` hears the phases.
    `model_stage`: export that stage of the model (`runtime.stages`) instead of the whole forward,
    called with tensors like `inputs_like`; its graph reads its own weights, from the same data file
    as the whole model's (see `write_weights_data`).
    `named_weights=False`: the optimizer folds freely (linear weights stored transposed, [in, out],
    under new names), the form the FP8/NVFP4 Q/DQ writers rewrite; those entries hold their weights.
    """
    stage(f"exporting {'the ' + model_stage + ' stage ' if model_stage else ''}to ONNX (traced on the meta device)")
    with torch.device("meta"):
        meta = StaticWanTransformer(config, shape).eval()
    for name in TABLE_INPUTS:
        meta.register_buffer(name, torch.empty_like(tensors[name], device="meta"), persistent=False)
    _match_dtypes(meta, tensors)
    if model_stage is not None:
        if not named_weights:
            raise ValueError("stages are exported with named weights only")
        meta = StageModel(meta, model_stage).eval()
    if inputs_like is None:
        inputs = tuple(torch.empty(s.shape, dtype=s.dtype, device="meta") for s in meta.input_specs(dtype))
    else:
        inputs = tuple(torch.empty_like(t, device="meta") for t in inputs_like)
    inputs += tuple(torch.empty_like(tensors[name], device="meta") for name in table_names(meta))
    all_weights = {k: v for k, v in tensors.items() if k not in TABLE_INPUTS}
    mine = {k for k, _ in meta.named_parameters()} if model_stage is not None else set(all_weights)
    weights = {f"{WEIGHT_PREFIX}{k}": v for k, v in all_weights.items() if k in mine}
    with quiet_torch():
        program = torch.onnx.export(TablesAsInputs(meta).eval(), inputs, dynamo=True, opset_version=opset,
                                    optimize=False, input_names=onnx_input_names(meta),
                                    output_names=list(meta.output_names))
        program.apply_weights(weights)
        if named_weights:
            optimize_keeping_weights(program.model, [n for n in weights if n in program.model.graph.initializers])
        else:
            program.optimize()
        _forget_rewriter_state()
    missing = sorted(set(weights) - set(program.model.graph.initializers)) if named_weights else []
    if missing:
        raise RuntimeError(f"the ONNX export lost the named weights {', '.join(missing[:4])}"
                           + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ONNX_FILE
    stage("writing the ONNX file")
    if named_weights:
        import onnx_ir as ir

        layout = write_weights_data(folder / ONNX_DATA, all_weights)
        graph = program.model.graph
        for name in weights:
            value = graph.initializers[name]
            offset, length = layout[name[len(WEIGHT_PREFIX):]]
            value.const_value = ir.ExternalTensor(ONNX_DATA, offset, length, value.const_value.dtype,
                                                  shape=value.const_value.shape, name=name, base_dir=folder)
        ir.save(program.model, path)
    else:
        program.save(str(path), external_data=True)
    return path


ALIGNMENT = 4096  # bytes: each weight starts on a page (memory-mapped readers need none, some like it)


def write_weights_data(path: Path, weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Write every weight's bytes to `path` in one canonical layout (sorted by name, page-aligned) and
    return name -> (offset, length). The file depends on the weights alone, not on the graph that
    reads them, so the whole model's entry and each of its stage entries (whose graphs read part of
    it) have byte-identical data files, stored once (`share_weights`)."""
    layout: dict[str, tuple[int, int]] = {}
    offset = 0
    with open(path, "wb") as f:
        for name in sorted(weights):
            t = weights[name].detach()
            data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            if offset % ALIGNMENT:
                pad = ALIGNMENT - offset % ALIGNMENT
                f.write(b"\0" * pad)
                offset += pad
            f.write(memoryview(data))
            layout[name] = (offset, data.nbytes)
            offset += data.nbytes
    return layout


def optimize_keeping_weights(model, names) -> None:
    """The exporter's graph optimizer (constant folding, rewrites, common subexpressions), with the
    weights `names` kept as they are: during the optimization they are graph inputs without a value,
    so nothing is folded from them and no two of them are merged (its deduplication pass would merge
    weights that happen to be equal, such as norms still at their initial ones), then they become
    initializers again (see the module doc)."""
    from onnxscript import optimizer

    graph = model.graph
    held = []
    for name in names:
        value = graph.initializers.pop(name)
        held.append((value, value.const_value))
        value.const_value = None
        graph.inputs.append(value)
    try:
        optimizer.optimize_ir(model)
    finally:
        for value, data in held:
            graph.inputs.remove(value)
            value.const_value = data
            graph.register_initializer(value)


def _forget_rewriter_state() -> None:
    """onnxscript's rewrite rules are module-level objects whose matchers keep the last graph they
    matched (`_graph`, `_match`, `_current_node`) after the optimizer returns: the whole exported
    graph, and with it every weight, stays alive for the rest of the build (1.0x the weights, measured
    by bench/build_memory.py). Clear that state so the graph goes when the program does."""
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        # type(), not isinstance(): the heap holds weak proxies, and isinstance() on one whose object
        # is gone raises ReferenceError (seen: it failed builds at random)
        if issubclass(type(obj), PatternMatcher):
            for name in ("_graph", "_match", "_current_node", "_tracer"):
                if name in vars(obj):
                    setattr(obj, name, None)


@contextlib.contextmanager
def quiet_torch():
    """Keep torch's exporter and compiler chatter (step narration on stdout, notes about optional
    packages, deprecations inside torch) out of the build log; real errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _match_dtypes(meta: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Give the meta model each real tensor's dtype (float32-kept modules, float32 tables)."""
    for name, value in list(meta.named_parameters()) + list(meta.named_buffers()):
        module_name, _, leaf = name.rpartition(".")
        module = meta.get_submodule(module_name) if module_name else meta
        want = tensors[name].dtype
        if value.dtype != want:
            if isinstance(value, torch.nn.Parameter):
                setattr(module, leaf, torch.nn.Parameter(value.to(want), requires_grad=False))
            else:
                module.register_buffer(leaf, value.to(want), persistent=False)
