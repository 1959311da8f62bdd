"""Memory and cost model: what a model, shape, batch and precision need, term by term.

Every figure is a named term, so a report explains itself. Weights and FLOPs are exact counts
(wan-architecture sections 8-9). Activations are a model of what this project's eager static model
allocates, with constants measured, not guessed:

- 16-bit: 24.0 x L x d bytes. H200 (bf16, cuDNN attention, bench/gpu.py): one 14B block 24.0 at
  480p and at 720p, the full 14B forward at 480p 24.0; CPU (bf16, peak RSS, mid config) 24.7.
- fp32: 36.5 x L x d bytes. CPU (peak RSS with glibc's mmap threshold fixed, so freed memory is
  returned and RSS follows live tensors): mid config 36.6, 36.3 and 36.1 at 3,510, 8,190 and
  16,380 tokens; tiny config 38.8.
- Per-token timesteps (TI2V-5B) add the fp32 modulation, 6 x d x 4 bytes per token, plus one fp32
  (1 + scale) temporary: 28 x L x d (derived from the code; the H200 5B block measured 28.6).
Engines with fused kernels need at most the eager figure (an upper bound, not measured for them).
Build memory for TensorRT is an estimate from how its builder works (marked as such).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from runtime.config import WanConfig
from runtime.errors import WanBuildError
from runtime.precision import Precision
from runtime.static import StaticShape

from .plan import Flops, forward_flops, weight_bytes

GB = 1e9
# Eager activation constants (bytes per token per model dim), see the module docstring.
ACTIVATION_BYTES_PER_TOKEN_DIM = {2: 24.0, 4: 36.5}  # by activation element size
PER_TOKEN_MODULATION_BYTES_PER_TOKEN_DIM = 28.0
CUDA_CONTEXT_GB = 1.0  # CUDA context, cuBLAS/cuDNN handles and allocator slack on one GPU
# Sampling defaults of the original repos (wan-architecture section 5): steps per video.
DEFAULT_STEPS = {"wan2.1-t2v-1.3b": 50, "wan2.1-t2v-14b": 50, "wan2.1-i2v-14b": 40, "wan2.1-flf2v-14b": 50,
                 "wan2.2-t2v-a14b": 40, "wan2.2-i2v-a14b": 40, "wan2.2-ti2v-5b": 50}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    compute_capability: str
    bf16_tflops: float
    fp8_tflops: float | None
    fp4_tflops: float | None
    memory_tbps: float
    measured_bf16_tflops: float | None = None
    aliases: tuple[str, ...] = ()

    @property
    def cc(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    def supports(self, precision: str) -> bool:
        """The card has the tensor cores the precision needs (per-precision minimums: runtime.precision)."""
        p = Precision(precision)
        if p == Precision.INT8 and self.cc < (7, 5):  # int8 tensor cores from Turing
            return False
        rate = {Precision.FP8: self.fp8_tflops, Precision.NVFP4: self.fp4_tflops,
                Precision.INT8: self.int8_tops}.get(p, self.bf16_tflops)
        return p.hardware_problem("cuda", self.cc) is None and rate is not None

    @property
    def int8_tops(self) -> float | None:
        """Dense int8 rate: the FP8 rate where the card has FP8 (Ada, Hopper, Blackwell datasheets give
        equal int8 and fp8 rates), else twice the bf16 rate (Turing and Ampere tensor cores)."""
        if self.fp8_tflops:
            return self.fp8_tflops
        return 2 * self.bf16_tflops if self.bf16_tflops else None

    @property
    def matmul_tflops(self) -> float:
        """The bf16 rate floors are computed with: measured where we measured it, else the datasheet's."""
        return self.measured_bf16_tflops or self.bf16_tflops


@lru_cache(maxsize=1)
def gpus() -> tuple[Gpu, ...]:
    data = json.loads((Path(__file__).parent / "data" / "gpus.json").read_text())
    return tuple(Gpu(**{**g, "aliases": tuple(g.get("aliases", ()))}) for g in data["gpus"])


def find_gpu(name: str) -> Gpu:
    """A GPU by name or alias, case and spacing ignored; unknown names get the closest suggestions."""
    key = name.lower().replace(" ", "").replace("_", "-")
    table = {}
    for g in gpus():
        for n in (g.name, *g.aliases):
            table[n.lower().replace(" ", "").replace("_", "-")] = g
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, table, n=3, cutoff=0.5)
    names = sorted({table[c].name for c in close})
    hint = f"did you mean {', '.join(names)}? " if names else ""
    raise WanBuildError(f"unknown GPU {name!r}; {hint}known: {', '.join(g.name for g in gpus())}; "
                        "or give --gpu-memory GB")


def custom_gpu(memory_gb: float) -> Gpu:
    if memory_gb <= 0:
        raise WanBuildError(f"--gpu-memory {memory_gb} must be > 0 (GB)")
    return Gpu(f"{memory_gb:g} GB GPU", memory_gb, "8.9", 0.0, None, None, 0.0)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryEstimate:
    """GPU memory one serving process needs, term by term."""

    terms: list[Term] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    def lines(self) -> list[str]:
        out = [f"  {t.name:34s} {t.bytes / GB:8.2f} GB  {t.note}" for t in self.terms]
        out.append(f"  {'total':34s} {self.total / GB:8.2f} GB")
        return out


def activation_bytes(config: WanConfig, shape: StaticShape, precision: str) -> list[Term]:
    """Peak activations of one forward (eager static model; an upper bound for engines)."""
    e = Precision(precision).facts.activation_bytes
    k = ACTIVATION_BYTES_PER_TOKEN_DIM[e]
    L, d, b = shape.tokens(config), config.dim, shape.batch
    terms = [Term("activations (attention phase)", b * L * d * k,
                  f"{k:g} B x {b} x {L:,} tokens x {d} (measured constant, fused attention)")]
    if shape.per_token_timesteps:
        terms.append(Term("per-token modulation (fp32)", b * L * d * PER_TOKEN_MODULATION_BYTES_PER_TOKEN_DIM,
                          "TI2V timesteps [B, L]: 6 x d fp32 values per token"))
    context = b * (shape.text_tokens + shape.image_tokens) * d * e * 3  # embedded context + its K/V per block
    terms.append(Term("text/image context and K/V", context, f"{shape.text_tokens + shape.image_tokens} tokens"))
    return terms


def serving_memory(config: WanConfig, shape: StaticShape, precision: str, *, experts_resident: int | None = None,
                   streamed_fraction: float = 0.0) -> MemoryEstimate:
    """GPU memory to serve `shape` at `precision`: weights of the resident experts (all of them, or
    one when the idle expert is offloaded), activations, CUDA context. `streamed_fraction` of the
    weights stays on the host (TensorRT weight streaming)."""
    experts = config.experts if experts_resident is None else experts_resident
    w = weight_bytes(config, precision)
    est = MemoryEstimate()
    resident = w * experts * (1 - streamed_fraction)
    label = f"weights ({experts} expert{'s' if experts > 1 else ''}, {precision})"
    note = "idle expert offloaded to host" if experts < config.experts else ""
    if streamed_fraction:
        note = f"{100 * (1 - streamed_fraction):.0f}% resident, the rest streamed from host"
    est.terms.append(Term(label, resident, note))
    est.terms.extend(activation_bytes(config, shape, precision))
    est.terms.append(Term("CUDA context and allocator slack", CUDA_CONTEXT_GB * GB))
    return est


# Host RAM of an entry's build beyond one copy of the expert's weights: measured by
# bench/build_memory.py (a fresh process per build, peak RSS per phase, on the CPU; Wan2.1-1.3B's
# structure): python, torch and onnx take 0.23 GB, the export or compile machinery and the eager
# reference another 0.21-0.25 GB, the same with 2 blocks (0.47 GB of fp32 weights) and 6 (1.22 GB):
# a constant, not a share of the weights. The ONNX Runtime parity session maps the written weights
# file after the torch copy is released, so no phase holds two copies.
BUILD_PROCESS_GB = 0.5

def build_memory(config: WanConfig, shape: StaticShape, precision: str, backend: str,
                 device: str = "cuda", strip_weights: bool = True) -> dict[str, MemoryEstimate]:
    """Host and GPU memory to build one entry (the build holds one expert's weights, one entry at a
    time). The CPU backends' host figures are measured (BUILD_PROCESS_GB); TensorRT's are estimates
    from how its builder works: the torch copy is released before it builds, then its ONNX parser
    holds a copy of the weights and the serialized plan another (a small one with strip_weights, the
    profiles' default). A build on the CPU also holds the eager reference's activations on the host."""
    w = weight_bytes(config, precision)
    acts = sum(t.bytes for t in activation_bytes(config, shape, precision))
    host, gpu = MemoryEstimate(), MemoryEstimate()
    host.terms.append(Term("process, export and compile machinery", BUILD_PROCESS_GB * GB, "measured"))
    if backend == "tensorrt":
        # The export holds the torch copy and its working set (as ONNX Runtime's); then the torch copy
        # goes and TensorRT's parser holds one of its own, the serialized plan besides it.
        host.terms.append(Term("weights (the export's, then TensorRT's parser's)", w,
                               "estimate; the torch copy is released before TensorRT builds"))
        host.terms.append(Term("serialized plan", 0.01 * w if strip_weights else w,
                               "estimate" + ("; weight-stripped" if strip_weights else "")))
        gpu.terms.append(Term("weights", w, "estimate"))
        gpu.terms.append(Term("activations + tactic workspace", 2 * acts, "estimate: twice the eager peak"))
    else:
        host.terms.append(Term("weights (one copy)", w, "memory-mapped when the checkpoint's dtype matches"))
        if device == "cuda":
            gpu.terms.append(Term("weights", w))
            gpu.terms.append(Term("activations (parity run and compile)", acts))
    if device == "cpu" and backend == "onnxruntime" and precision in ("fp16", "bf16"):
        # Measured: a session of 0.61 GB of fp16 weights peaks at 1.37-1.46 GB at any optimization level.
        host.terms.append(Term("ONNX Runtime's fp32 copy of the weights", 2 * w,
                               "measured; its CPU provider has no 16-bit matmul on x86 and converts them"))
    if device == "cpu":
        host.terms.append(Term("activations (eager reference)", acts, "on the host when building on the CPU"))
    elif gpu.terms:
        gpu.terms.append(Term("CUDA context and allocator slack", CUDA_CONTEXT_GB * GB))
    return {"host": host, "gpu": gpu}


def build_memory_report(config: WanConfig, shape: StaticShape, precision: str) -> list[str]:
    """Host RAM to build one entry of `shape`, per backend (one expert's weights at a time)."""
    cells = []
    for backend in ("onnxruntime", "aoti", "inductor"):
        cells.append(f"{backend} {build_memory(config, shape, precision, backend)['host'].total / GB:.1f} GB")
    stripped = build_memory(config, shape, precision, "tensorrt")["host"].total / GB
    full = build_memory(config, shape, precision, "tensorrt", strip_weights=False)["host"].total / GB
    cells.append(f"tensorrt {stripped:.1f} GB (estimate; {full:.1f} GB with strip_weights: false)")
    cpu = build_memory(config, shape, precision, "onnxruntime", device="cpu")["host"].terms[-1].bytes / GB
    return [f"host RAM to build one entry of this size in {precision} (one expert at a time; measured for the "
            "CPU backends, estimated for TensorRT):",
            "  " + ", ".join(cells),
            f"  building on the CPU adds the eager reference's activations ({cpu:.1f} GB)"]


def available_host_bytes() -> float | None:
    """Memory this machine can give a new job now (Linux's MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class Costs:
    flops: Flops
    steps: int
    cfg: bool

    @property
    def per_step(self) -> float:
        return self.flops.total * (2 if self.cfg else 1)

    @property
    def per_video(self) -> float:
        return self.per_step * self.steps


def costs(config: WanConfig, shape: StaticShape, steps: int | None = None, cfg: bool = True) -> Costs:
    return Costs(forward_flops(config, shape), steps or DEFAULT_STEPS.get(config.name, 50), cfg)


def floor_seconds(config: WanConfig, shape: StaticShape, gpu: Gpu, precision: str, cfg: bool = True) -> float:
    """Seconds per step at the GPU's matmul rate: the time no implementation beats. With fp8/nvfp4
    the block linear layers run at that rate (attention stays bf16)."""
    fl = forward_flops(config, shape)
    bf16 = gpu.matmul_tflops * 1e12
    fast = {"fp8": gpu.fp8_tflops, "nvfp4": gpu.fp4_tflops, "int8": gpu.int8_tops}.get(precision)
    linear_rate = (fast * 1e12 * (gpu.matmul_tflops / gpu.bf16_tflops)) if fast else bf16
    seconds = (fl.total - fl.linear) / bf16 + fl.linear / linear_rate
    return seconds * (2 if cfg else 1)


# -- what fits ------------------------------------------------------------------------------------
FIT_MODES = ("fits", "offload", "streaming", "no")
FIT_LABELS = {"fits": "fits", "offload": "fits with expert offload", "streaming": "fits with weight streaming",
              "no": "does not fit"}
QUALITY_ORDER = ("bf16", "fp8", "int8", "nvfp4")  # int8 where a card has no fp8 (A100, A10, RTX 30xx)


@dataclass(frozen=True)
class Fit:
    mode: str  # fits, offload, streaming, no
    precision: str | None
    needed_gb: float  # for the chosen mode and precision (or the smallest need when nothing fits)
    gpu_gb: float

    def describe(self) -> str:
        if self.mode == "no":
            return f"does not fit (needs at least {self.needed_gb:.1f} GB, GPU has {self.gpu_gb:g} GB)"
        return f"{FIT_LABELS[self.mode]} in {self.precision} ({self.needed_gb:.1f} of {self.gpu_gb:g} GB)"

    def short(self) -> str:
        return {"fits": "{p}", "offload": "{p} +offload", "streaming": "{p} +stream", "no": "no"}[self.mode].format(
            p=self.precision)


def mode_memory(config: WanConfig, shape: StaticShape, precision: str, mode: str) -> MemoryEstimate:
    """The memory terms of one mode: all experts resident ("fits"), the idle expert offloaded
    ("offload"), or weights streamed with two blocks' weights resident, double-buffered ("streaming")."""
    if mode == "fits":
        return serving_memory(config, shape, precision)
    if mode == "offload":
        return serving_memory(config, shape, precision, experts_resident=1)
    streamed = 1 - min(2, config.num_layers) / config.num_layers  # two blocks resident (fewer if there are fewer)
    return serving_memory(config, shape, precision, experts_resident=1, streamed_fraction=streamed)


def need(config: WanConfig, shape: StaticShape, precision: str, mode: str) -> float:
    return mode_memory(config, shape, precision, mode).total


def options(config: WanConfig, shape: StaticShape, gpu: Gpu,
            precisions: tuple[str, ...] = QUALITY_ORDER) -> list[tuple[str, str, float, bool]]:
    """(mode, precision, GB needed, fits?) for every mode and precision the GPU supports."""
    out = []
    for mode in FIT_MODES[:-1]:
        if mode == "offload" and config.experts == 1:
            continue
        for p in precisions:
            if gpu.supports(p):
                gb = need(config, shape, p, mode) / GB
                out.append((mode, p, gb, gb <= gpu.memory_gb))
    return out


def best_fit(config: WanConfig, shape: StaticShape, gpu: Gpu, precisions: tuple[str, ...] = QUALITY_ORDER) -> Fit:
    """The first mode that fits (resident, then expert offload, then weight streaming), in the best
    precision that fits in it (bf16, then fp8, then nvfp4, as the GPU supports them)."""
    opts = options(config, shape, gpu, precisions)
    for mode, p, gb, ok in opts:
        if ok:
            return Fit(mode, p, gb, gpu.memory_gb)
    smallest = min((gb for _, _, gb, _ in opts), default=0.0)
    return Fit("no", None, smallest, gpu.memory_gb)


def standard_sizes(config: WanConfig) -> list[tuple[int, int, int]]:
    """The sizes the model was trained and released for (wan-architecture section 7), both orientations."""
    if config.vae_spatial_stride == 16:  # TI2V-5B
        return [(121, 704, 1280), (121, 1280, 704)]
    sizes = [(81, 480, 832), (81, 832, 480)]
    if config.dim >= 5120:
        sizes += [(81, 720, 1280), (81, 1280, 720)]
    return sizes


def gpu_report(config: WanConfig, gpu: Gpu, sizes: list[tuple[int, int, int]], batches: tuple[int, ...] = (1, 2),
               cfg: bool = True) -> list[str]:
    """What fits on `gpu`: every size x batch x precision, resident and with the idle expert offloaded,
    and the FLOP floor per denoising step."""
    from runtime.config import latent_size

    rate = (f"bf16 {gpu.matmul_tflops:g} TFLOP/s ({'measured' if gpu.measured_bf16_tflops else 'datasheet'})"
            if gpu.bf16_tflops else "no rate given")
    support = ", ".join(p for p in ("fp8", "int8", "nvfp4") if gpu.supports(p) and gpu.bf16_tflops) or "no fp8/int8/nvfp4 data"
    lines = [f"GPU {gpu.name}: {gpu.memory_gb:g} GB, compute capability {gpu.compute_capability}, {rate}; {support}"]
    two = config.experts > 1
    head = f"{'video size':16s} {'batch':>5s} {'prec.':6s} {'all experts':>12s} "
    head += f"{'offloaded':>12s} " if two else ""
    head += f"{'streamed':>10s} {'floor/step':>11s}"
    lines.append(head)
    for frames, height, width in sizes:
        latent = latent_size(config, frames, height, width)
        for batch in batches:
            shape = StaticShape.for_latent(config, batch, latent)
            for p in QUALITY_ORDER:
                if not gpu.supports(p) or (p != "bf16" and not gpu.bf16_tflops):
                    continue
                cells = []
                for mode in ("fits", "offload", "streaming") if two else ("fits", "streaming"):
                    gb = need(config, shape, p, mode) / GB
                    cells.append(f"{gb:6.1f} {'ok' if gb <= gpu.memory_gb else 'no':>3s}")
                floor = (f"{floor_seconds(config, shape, gpu, p, cfg):9.2f} s" if gpu.bf16_tflops else "        -")
                lines.append(f"{f'{frames}x{height}x{width}':16s} {batch:5d} {p:6s} "
                             + " ".join(c.rjust(12 if i < len(cells) - 1 else 10) for i, c in enumerate(cells))
                             + f" {floor}")
    lines.append("GB needed per mode (ok = fits); floor = FLOPs per step (CFG: 2 forwards) / matmul rate, "
                 "fp8/int8/nvfp4 linear layers at their rate")
    return lines
