"""Resolution profiles: YAML -> `Profile` (frozen), strictly.

    name: wan22-i2v-480p
    model:
      experts: {high_noise: ckpt/transformer, low_noise: ckpt/transformer_2, boundary: 0.9}
      # or, for one-expert models:  weights: ckpt/transformer
      preset: wan2.2-i2v-a14b        # optional: check the weights against it
    precision: bf16                  # or a list: [bf16, fp8]
    backends: [tensorrt, aoti]
    shapes:
      - {batch: 1, frames: 81, height: 480, width: 832}
    text_tokens: 512                 # default 512
    device: auto                     # auto | cpu | cuda (where AOTInductor engines are compiled)
    onnx_opset: 23                   # default 23 (ONNX Attention + RMSNormalization); 20 decomposes them
    tensorrt: {...}                  # TensorRT options (see TensorRTOptions)
    calibration: calib/              # optional: recorded calls for fp8/nvfp4 TensorRT calibration
                                     # (runtime.capture.capture_calls); default: fixed-seed inputs

Every error names the file, the line, the key and what is allowed. Paths are relative to the
profile's folder. Sizes are video frames and pixels; each is checked against the model's rules
when the profile loads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from runtime.backends import BACKENDS
from runtime.config import MAX_BATCH, MAX_TEXT_TOKENS, TEXT_TOKENS, WanConfig, get_preset, latent_size
from runtime.errors import WanBuildError
from runtime.precision import PRECISIONS
from runtime.static import StaticShape, check_build_limits, check_static_shape
from runtime.weights import load_checkpoint

DEVICES = ("auto", "cpu", "cuda")
OPSETS = (20, 23)
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
SMOOTHQUANT = ("auto", "on", "off")
_TARGET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # tensorrt.smoothquant for int8 entries
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class ProfileError(WanBuildError):
    """A profile that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class ShapeSpec:
    batch: int
    frames: int  # video frames
    height: int  # pixels
    width: int

    def label(self) -> str:
        return f"{self.frames}x{self.height}x{self.width} b{self.batch}"


@dataclass(frozen=True)
class Expert:
    name: str  # "main", or "high_noise" / "low_noise"
    weights: Path


@dataclass(frozen=True)
class TensorRTOptions:
    workspace_gb: float | None = None  # None: TensorRT's default (all device memory)
    optimization_level: int = 3  # builder optimisation level 0..5
    timing_cache: Path | None = None  # None: one per GPU model and TensorRT version in the wan-build cache folder
    hardware_compatibility: str = "none"
    strip_weights: bool = True  # weight-stripped plans, refitted from the ONNX weights at load
    refittable: bool = False  # REFIT_INDIVIDUAL on the weights: plans refitted from the model's tensors (any weights)
    weight_streaming: bool = False
    weight_streaming_budget_gb: float | None = None  # weights kept on the GPU when streaming; None: TensorRT's automatic
    cuda_graphs: bool = False  # capture execute_async_v3 into a CUDA graph at first use
    smoothquant: str = "auto"  # int8 entries: SmoothQuant "on", "off", or "auto" (the recipe with the lower error)


@dataclass(frozen=True)
class Profile:
    name: str
    source: Path
    experts: tuple[Expert, ...]
    boundary: float | None
    preset: str | None
    config: WanConfig
    precisions: tuple[str, ...]
    backends: tuple[str, ...]
    shapes: tuple[ShapeSpec, ...]
    text_tokens: int = TEXT_TOKENS
    device: str = "auto"
    onnx_opset: int = 23
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    calibration: Path | None = None
    cache_stages: bool = False  # also build each shape's stages (`runtime.stages`) for step-cached calls
    # GPU models a fleet build (`--ray`) builds every entry for, as Ray names them ("H100", "L40S", "A100-80G")
    targets: tuple[str, ...] = ()

    def static_shape(self, spec: ShapeSpec) -> StaticShape:
        return StaticShape.for_latent(self.config, spec.batch,
                                      latent_size(self.config, spec.frames, spec.height, spec.width),
                                      self.text_tokens)


# -- YAML with positions --------------------------------------------------------------------------
class _Ctx:
    def __init__(self, path: Path):
        self.file = path
        self._constructor = yaml.SafeLoader("")

    def fail(self, node: yaml.Node | None, key: str, problem: str) -> ProfileError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return ProfileError(f"{self.file}{line}: {key}: {problem}")

    def mapping(self, node: yaml.Node, key: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, f"must be a mapping with keys {', '.join(allowed)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else None
            path = f"{key}.{name}" if key != "(top level)" else str(name)
            if name not in allowed:
                raise self.fail(k, path, f"unknown key; allowed here: {', '.join(allowed)}")
            if name in out:
                raise self.fail(k, path, "appears twice")
            out[name] = (k, v)
        for name in required:
            if name not in out:
                where = key if key != "(top level)" else "the profile"
                raise self.fail(node, f"{key}.{name}" if key != "(top level)" else name,
                                f"missing; {where} needs {', '.join(required)}")
        return out

    def scalar(self, node: yaml.Node, key: str, kind: type, check: Callable[[Any], str | None] | None = None,
               allowed: str = "") -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, f"must be a single {kind.__name__}{allowed and '; ' + allowed}")
        try:
            value = self._constructor.construct_object(node)
        except yaml.YAMLError as e:
            raise self.fail(node, key, f"cannot read the value ({getattr(e, 'problem', None) or e})") from None
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.fail(node, key, f"must be {kind.__name__}, got {value!r}{allowed and '; ' + allowed}")
        problem = check(value) if check else None
        if problem:
            raise self.fail(node, key, problem)
        return value

    def choice(self, node: yaml.Node, key: str, choices: tuple) -> Any:
        kind = type(choices[0])
        return self.scalar(node, key, kind, lambda v: None if v in choices else
                           f"{v!r} is not allowed; allowed: {', '.join(map(str, choices))}",
                           allowed=f"allowed: {', '.join(map(str, choices))}")

    def sequence(self, node: yaml.Node, key: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, key, "must be a non-empty list")
        return list(node.value)

    def path(self, node: yaml.Node, key: str) -> Path:
        text = self.scalar(node, key, str, lambda v: None if v.strip() else "must not be empty")
        p = Path(text).expanduser()
        return p if p.is_absolute() else Path(os.path.normpath(self.file.parent / p))


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _positive(v: int) -> str | None:
    return None if v >= 1 else f"must be >= 1 (got {v})"


def _at_most(limit: int) -> Callable[[int], str | None]:
    def check(v: int) -> str | None:
        return _positive(v) or (None if v <= limit else f"must be <= {limit} (got {v}); no Wan pipeline asks for more")
    return check


# -- loading --------------------------------------------------------------------------------------
def load_profile(path: str | Path, check_weights: bool = True) -> Profile:
    """Load and validate a profile. With `check_weights=False` the weights need not exist yet
    (the geometry is then checked against `model.preset`, which becomes required)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read the profile ({e})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ProfileError(f"{path}: nested too deeply to be a profile (a profile is a few levels deep)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    ctx = _Ctx(path)
    if root is None:
        raise ProfileError(f"{path}: the profile is empty")
    top = ctx.mapping(root, "(top level)", ("name", "model", "precision", "backends", "shapes", "text_tokens",
                                             "device", "onnx_opset", "tensorrt", "calibration", "cache_stages",
                                             "targets"),
                      required=("name", "model", "precision", "backends", "shapes"))
    name = ctx.scalar(top["name"][1], "name", str, lambda v: None if _NAME.match(v) else
                      "must be lowercase letters, digits, '.', '_' or '-' (it names the engine folder)")
    experts, boundary, preset = _model(ctx, top["model"][1])
    config = _config(ctx, top["model"][1], experts, preset, check_weights)
    if boundary is not None and config.experts == 1 and preset is not None:
        raise ctx.fail(top["model"][1], "model.experts", f"preset {preset} has one expert; use model.weights")

    precisions = _list_or_one(ctx, top["precision"][1], "precision", PRECISIONS)
    backends = _list_or_one(ctx, top["backends"][1], "backends", BACKENDS)
    text_tokens = ctx.scalar(top["text_tokens"][1], "text_tokens", int, _at_most(MAX_TEXT_TOKENS)) \
        if "text_tokens" in top else TEXT_TOKENS
    device = ctx.choice(top["device"][1], "device", DEVICES) if "device" in top else "auto"
    opset = ctx.choice(top["onnx_opset"][1], "onnx_opset", OPSETS) if "onnx_opset" in top else 23
    tensorrt = _tensorrt(ctx, top["tensorrt"][1]) if "tensorrt" in top else TensorRTOptions()
    cache_stages = ctx.scalar(top["cache_stages"][1], "cache_stages", bool) if "cache_stages" in top else False
    targets: list[str] = []
    if "targets" in top:
        for i, node in enumerate(ctx.sequence(top["targets"][1], "targets")):
            target = ctx.scalar(node, f"targets[{i}]", str, lambda v: None if _TARGET.match(v) else
                                "must be a GPU model as Ray names it (letters, digits, '-', '_', '.'; e.g. H100, L40S, "
                                "A100-80G)")
            if target in targets:
                raise ctx.fail(node, f"targets[{i}]", f"repeats {target}")
            targets.append(target)
        if device == "cpu":
            raise ctx.fail(top["targets"][1], "targets", "lists GPU models but device is cpu; drop one of them")
    calibration = None
    if "calibration" in top:
        calibration = ctx.path(top["calibration"][1], "calibration")
        if not calibration.exists():
            raise ctx.fail(top["calibration"][1], "calibration",
                           f"{calibration} does not exist; give a folder of recorded calls "
                           "(runtime.capture.capture_calls) or drop the key")

    if "nvfp4" in precisions and "tensorrt" in backends and opset < 23:
        raise ctx.fail(top["onnx_opset"][1], "onnx_opset", f"nvfp4 TensorRT engines need onnx_opset 23 (FP4 "
                       f"DequantizeLinear); got {opset}. Use 23, or build nvfp4 in a profile of its own")

    shapes = []
    for i, node in enumerate(ctx.sequence(top["shapes"][1], "shapes")):
        key = f"shapes[{i}]"
        fields = ctx.mapping(node, key, ("batch", "frames", "height", "width"), ("frames", "height", "width"))
        values = {f: ctx.scalar(fields[f][1], f"{key}.{f}", int, _at_most(MAX_BATCH) if f == "batch" else _positive)
                  for f in fields}
        spec = ShapeSpec(values.get("batch", 1), values["frames"], values["height"], values["width"])
        if spec in shapes:
            raise ctx.fail(node, key, f"repeats shape {spec.label()}")
        try:
            shape = StaticShape.for_latent(config, spec.batch, latent_size(config, spec.frames, spec.height,
                                                                           spec.width), text_tokens)
            check_static_shape(config, shape)
            check_build_limits(config, shape)
        except WanBuildError as e:
            raise ctx.fail(node, key, str(e)) from None
        shapes.append(spec)
    return Profile(name, path, experts, boundary, preset, config, precisions, backends, tuple(shapes),
                   text_tokens, device, opset, tensorrt, calibration, cache_stages, tuple(targets))


def _list_or_one(ctx: _Ctx, node: yaml.Node, key: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    nodes = ctx.sequence(node, key) if isinstance(node, yaml.SequenceNode) else [node]
    values = tuple(ctx.choice(n, key, choices) for n in nodes)
    if len(set(values)) != len(values):
        raise ctx.fail(node, key, "lists a value twice")
    return values


def _model(ctx: _Ctx, node: yaml.Node) -> tuple[tuple[Expert, ...], float | None, str | None]:
    fields = ctx.mapping(node, "model", ("weights", "experts", "preset"))
    preset = None
    if "preset" in fields:
        preset = ctx.scalar(fields["preset"][1], "model.preset", str)
        try:
            get_preset(preset)
        except WanBuildError as e:
            raise ctx.fail(fields["preset"][1], "model.preset", str(e)) from None
    if ("weights" in fields) == ("experts" in fields):
        raise ctx.fail(node, "model", "give exactly one of weights (one model) or experts (Wan2.2 A14B)")
    if "weights" in fields:
        return (Expert("main", ctx.path(fields["weights"][1], "model.weights")),), None, preset
    ex = ctx.mapping(fields["experts"][1], "model.experts", ("high_noise", "low_noise", "boundary"),
                     ("high_noise", "low_noise", "boundary"))
    boundary = ctx.scalar(ex["boundary"][1], "model.experts.boundary", float,
                          lambda v: None if 0 < v < 1 else f"must lie in (0, 1), e.g. 0.9 (got {v})")
    experts = tuple(Expert(n, ctx.path(ex[n][1], f"model.experts.{n}")) for n in ("high_noise", "low_noise"))
    return experts, boundary, preset


def _config(ctx: _Ctx, node: yaml.Node, experts: tuple[Expert, ...], preset: str | None,
            check_weights: bool) -> WanConfig:
    want = get_preset(preset) if preset else None
    if not check_weights:
        if want is None:
            raise ctx.fail(node, "model.preset", "needed to check shapes when the weights are not read")
        return want
    configs = []
    for expert in experts:
        key = "model.weights" if expert.name == "main" else f"model.experts.{expert.name}"
        try:
            configs.append(load_checkpoint(expert.weights, preset=want).config)
        except WanBuildError as e:
            raise ctx.fail(node, key, str(e)) from None
    if len(configs) == 2 and not configs[0].same_structure(configs[1]):
        raise ctx.fail(node, "model.experts", "the two experts have different structures")
    return configs[0]


def _tensorrt(ctx: _Ctx, node: yaml.Node) -> TensorRTOptions:
    f = ctx.mapping(node, "tensorrt", ("workspace_gb", "optimization_level", "timing_cache",
                                       "hardware_compatibility", "strip_weights", "refittable", "weight_streaming",
                                       "weight_streaming_budget_gb", "cuda_graphs", "smoothquant"))
    kw: dict[str, Any] = {}
    if "workspace_gb" in f:
        kw["workspace_gb"] = ctx.scalar(f["workspace_gb"][1], "tensorrt.workspace_gb", float,
                                        lambda v: None if v > 0 else f"must be > 0 (got {v})")
    if "optimization_level" in f:
        kw["optimization_level"] = ctx.choice(f["optimization_level"][1], "tensorrt.optimization_level",
                                              (0, 1, 2, 3, 4, 5))
    if "timing_cache" in f and not _is_null(f["timing_cache"][1]):  # null: the default cache
        kw["timing_cache"] = ctx.path(f["timing_cache"][1], "tensorrt.timing_cache")
    if "hardware_compatibility" in f:
        kw["hardware_compatibility"] = ctx.choice(f["hardware_compatibility"][1], "tensorrt.hardware_compatibility",
                                                  HARDWARE_COMPATIBILITY)
    if "smoothquant" in f:
        node = f["smoothquant"][1]
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":bool"):  # YAML reads on/off/true/false as booleans
            kw["smoothquant"] = "on" if ctx.scalar(node, "tensorrt.smoothquant", bool) else "off"
        else:
            kw["smoothquant"] = ctx.choice(node, "tensorrt.smoothquant", SMOOTHQUANT)
    for flag in ("strip_weights", "refittable", "weight_streaming", "cuda_graphs"):
        if flag in f:
            kw[flag] = ctx.scalar(f[flag][1], f"tensorrt.{flag}", bool)
    if "weight_streaming_budget_gb" in f and not _is_null(f["weight_streaming_budget_gb"][1]):
        kw["weight_streaming_budget_gb"] = ctx.scalar(f["weight_streaming_budget_gb"][1],
                                                      "tensorrt.weight_streaming_budget_gb", float,
                                                      lambda v: None if v >= 0 else f"must be >= 0 (got {v})")
        if not kw.get("weight_streaming"):
            raise ctx.fail(f["weight_streaming_budget_gb"][0], "tensorrt.weight_streaming_budget_gb",
                           "is a budget for weight streaming; set weight_streaming: true too, or drop it")
    if kw.get("weight_streaming") and kw.get("cuda_graphs"):
        raise ctx.fail(f["cuda_graphs"][0], "tensorrt.cuda_graphs", "cannot be combined with weight_streaming: "
                       "TensorRT makes the enqueue synchronous and uncapturable while it streams weights; choose one")
    return TensorRTOptions(**kw)
