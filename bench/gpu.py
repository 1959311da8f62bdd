"""GPU benchmark at real Wan sizes, one run: ceilings, blocks, the full 14B forward, FP8.

Prints the machine, measures the card's own ceilings (a large bf16 matmul, FP8 matmul, a large
device-to-device copy), then for each case times the variants side by side and ends with one table:
median ms and spread, achieved TFLOP/s, the FLOP floor (FLOPs / measured bf16 matmul rate), the ratio
to it, and the relative error against our eager block. Full numbers go to results.json in the
output folder (--out, or $BENCH_OUT, or $OUT).

Cases (wan-architecture sections 8-9 for the FLOPs):
  block480  one Wan 14B block, 480x832x81 (32,760 tokens)
  block720  one Wan 14B block, 720x1280x81 (75,600 tokens)
  block5b   one TI2V-5B block, 704x1280x121 (27,280 tokens, per-token timesteps)
  full480   the full 40-layer 14B forward at 480p-81f (28.6 GB of bf16 weights)
Variants: diffusers' block (when importable), our static block eager, CUDA-graph replay,
torch.compile, AOTInductor, FP8 linear layers (eager and compiled); plus microbenchmarks of the
attention backends, the linear part in bf16 vs FP8 (eager, eager with the FP8 quantizer unfused, and
compiled), and fused vs separate QKV projections.

    python bench/gpu.py                       # everything, sized for < 7 min on an H100
    python bench/gpu.py --cases block480 --skip aoti
    python bench/gpu.py --tiny --device cpu   # the same code at toy sizes (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.planning.plan import forward_flops  # noqa: E402
from runtime.config import LatentSize, WanConfig, get_preset  # noqa: E402
from runtime import fp8 as fp8_module  # noqa: E402
from runtime.fp8 import quantize_fp8  # noqa: E402
from runtime.static import (StaticShape, StaticWanTransformer, TransformerBlock, parameter_shapes,  # noqa: E402
                            rope_tables)
from runtime.weights import parameter_dtype  # noqa: E402

CASES = {
    "block480": ("wan2.1-t2v-14b", (21, 60, 104), "block"),
    "block720": ("wan2.1-t2v-14b", (21, 90, 160), "block"),
    "block5b": ("wan2.2-ti2v-5b", (31, 44, 80), "block"),
    "full480": ("wan2.1-t2v-14b", (21, 60, 104), "full"),
}
TINY_LATENT = (3, 8, 12)
VARIANT_KINDS = ("diffusers", "cudagraph", "compile", "inductor", "aoti", "fp8", "micro", "fp32")


class Bench:
    def __init__(self, device: torch.device, repeats: int, budget_s: float, out: Path):
        self.device, self.repeats, self.budget_s, self.out = device, repeats, budget_s, out
        self.start = time.perf_counter()
        self.results: dict = {"machine": machine_info(device), "cases": {}, "micro": {}}
        self.rows: list[tuple] = []

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object], repeats: int | None = None, warmup: int = 2) -> dict:
        """Median and spread of `fn` in ms: CUDA events on a GPU, a host clock after sync elsewhere."""
        repeats = repeats or self.repeats
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t0))
        times.sort()
        return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1],
                "p25_ms": times[len(times) // 4], "p75_ms": times[(3 * len(times)) // 4], "n": repeats}

    def record(self, case: str, variant: str, fn: Callable[[], torch.Tensor], flops: float, reference: torch.Tensor,
               fp32_reference: torch.Tensor | None = None, note: str = "", **timing) -> None:
        """Time one variant, compare it with the eager reference, keep and print the row."""
        out = fn()
        stats = self.time_ms(fn, **timing)
        ms = stats["median_ms"]
        floor_ms = flops / (self.results["matmul_tflops"] * 1e12) * 1e3
        stats.update(tflops=flops / (ms * 1e-3) / 1e12, floor_ms=floor_ms, ratio_to_floor=ms / floor_ms,
                     rel_error_vs_eager=relative_error(out, reference), note=note)
        if fp32_reference is not None:
            stats["rel_error_vs_fp32"] = relative_error(out, fp32_reference)
        self.results["cases"][case]["variants"][variant] = stats
        self.rows.append((case, variant, ms, stats["p25_ms"], stats["p75_ms"], stats["tflops"], floor_ms,
                          ms / floor_ms, stats["rel_error_vs_eager"]))
        print(f"  {case} {variant}: {ms:.2f} ms ({stats['tflops']:.0f} TFLOP/s, {ms / floor_ms:.2f}x floor, "
              f"err {stats['rel_error_vs_eager']:.1e}) {note}")
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")


def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}")
        try:
            import subprocess

            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:  # noqa: BLE001 - informational only
            info["driver"] = f"unknown ({e})"
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


# -- ceilings -------------------------------------------------------------------------------------
def ceilings(b: Bench, tiny: bool) -> None:
    n = 1024 if tiny else 8192
    dev = b.device
    g = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    y = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    t = b.time_ms(lambda: x @ y, repeats=20)
    b.results["matmul_tflops"] = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12
    print(f"ceiling: {dtype} matmul {n}^3: {b.results['matmul_tflops']:.0f} TFLOP/s")
    try:
        if dev.type != "cuda":  # torch's CPU float8 matmul is a slow reference path (minutes at 1024^3)
            raise RuntimeError("no FP8 tensor cores on the CPU")
        xq, yq = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn)
        one = torch.tensor(1.0, device=dev)
        t = b.time_ms(lambda: torch._scaled_mm(xq, yq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                      repeats=20)
        b.results["fp8_matmul_tflops"] = 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12
        print(f"ceiling: fp8 e4m3 matmul {n}^3: {b.results['fp8_matmul_tflops']:.0f} TFLOP/s")
    except Exception as e:  # noqa: BLE001 - no FP8 on this device
        b.results["fp8_matmul_tflops"] = None
        print(f"ceiling: fp8 matmul unavailable ({type(e).__name__}: {str(e)[:100]})")
    nbytes = (64 << 20) if tiny else (4 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = b.time_ms(lambda: dst.copy_(src), repeats=20)
    b.results["copy_tbps"] = 2 * nbytes / (t["median_ms"] * 1e-3) / 1e12
    print(f"ceiling: device copy {nbytes >> 20} MiB: {b.results['copy_tbps']:.2f} TB/s (read + write)")


# -- one block ------------------------------------------------------------------------------------
def random_block(config: WanConfig, device: torch.device, seed: int) -> TransformerBlock:
    torch.manual_seed(seed)
    with torch.device(device):
        block = TransformerBlock(config)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim >= 2 and "scale_shift" not in name:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            elif "bias" in name:
                p.copy_(0.02 * torch.randn_like(p))
    for name, p in block.named_parameters():  # diffusers' precision policy, as the runtime loads it
        p.data = p.data.to(parameter_dtype(name, torch.bfloat16))
    return block.eval().requires_grad_(False)


def block_inputs(config: WanConfig, shape: StaticShape, device: torch.device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    L, d = shape.tokens(config), config.dim
    T = L if shape.per_token_timesteps else 1
    x = torch.randn(1, L, d, device=device, generator=g).to(torch.bfloat16)
    ctx = torch.randn(1, shape.text_tokens, d, device=device, generator=g).to(torch.bfloat16)
    temb = (0.1 * torch.randn(1, T, 6, d, device=device, generator=g)).to(torch.bfloat16)
    cos, sin = (t.to(device) for t in rope_tables(config, shape))
    return x, ctx, temb, cos, sin


def diffusers_block(block: TransformerBlock, config: WanConfig, shape: StaticShape):
    """diffusers' WanTransformerBlock sharing our block's tensors, and its rotary embedding."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

    with torch.device("meta"):
        ref = WanTransformerBlock(config.dim, config.ffn_dim, config.num_heads, "rms_norm_across_heads", True,
                                  config.eps, None)
    ref.load_state_dict(block.state_dict(), assign=True)
    device = block.scale_shift_table.device
    rope = WanRotaryPosEmbed(config.head_dim, config.patch_size, config.rope_max_seq_len).to(device)
    dummy = torch.empty(1, 1, shape.latent_frames, shape.latent_height, shape.latent_width, device=device)
    rotary = tuple(rope(dummy))
    return ref.eval(), rotary


def block_case(b: Bench, name: str, config: WanConfig, latent: tuple[int, int, int], skip: set[str]) -> None:
    config = config.replace(num_layers=1)
    shape = StaticShape(1, *latent, per_token_timesteps=config.per_token_timesteps)
    flops = forward_flops(config, shape)
    block_flops = flops.linear + flops.self_attention + flops.cross_attention
    case = {"config": config.name, "latent": latent, "tokens": shape.tokens(config), "flops": block_flops,
            "variants": {}}
    b.results["cases"][name] = case
    block = random_block(config, b.device, seed=1)
    x, ctx, temb, cos, sin = block_inputs(config, shape, b.device, seed=2)
    contexts = (ctx,)

    def eager():
        return block(x, contexts, temb, cos, sin)

    with torch.inference_mode():
        reference = eager()
        fp32_ref = None
        if "fp32" not in skip:
            block32 = random_block(config, b.device, seed=1).float()
            fp32_ref = block32(x.float(), (ctx.float(),), temb.float(), cos, sin)
            del block32

        def failed(variant: str, e: Exception) -> None:
            case["variants"][variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  {name} {variant}: FAILED {type(e).__name__}: {str(e)[:200]}")

        def record(variant: str, fn: Callable[[], torch.Tensor], note: str = "") -> None:
            try:
                b.record(name, variant, fn, block_flops, reference, fp32_ref, note)
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the run
                failed(variant, e)

        if b.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(b.device)
            base = torch.cuda.memory_allocated(b.device)
        record("ours eager", eager)
        if b.device.type == "cuda":
            case["peak_activation_bytes"] = torch.cuda.max_memory_allocated(b.device) - base
            case["weight_bytes"] = sum(p.numel() * p.element_size() for p in block.parameters())
            case["host_sync_free"] = no_host_sync(eager)
        if "diffusers" not in skip:
            try:
                ref, rotary = diffusers_block(block, config, shape)
                t4 = temb if shape.per_token_timesteps else temb[:, 0]
                record("diffusers block", lambda: ref(x, ctx, t4, rotary))
            except ImportError as e:
                print(f"  {name} diffusers: not importable ({e})")
        if "cudagraph" not in skip and b.device.type == "cuda":
            record("ours CUDA graph", cuda_graph(eager))
        def record_compiled(variant: str, module: torch.nn.Module) -> None:
            compiled = torch.compile(module, fullgraph=True)
            t0 = time.perf_counter()
            try:
                compiled(x, contexts, temb, cos, sin)  # the compile itself; its failure must not end the case
            except Exception as e:  # noqa: BLE001
                failed(variant, e)
                return
            record(variant, lambda: compiled(x, contexts, temb, cos, sin), f"(compile {time.perf_counter() - t0:.0f} s)")

        if "compile" not in skip and b.left() > 120:
            record_compiled("ours torch.compile", block)
        if "aoti" not in skip and b.left() > 150 and aoti_loads(b):
            t0 = time.perf_counter()
            try:
                runner = aoti_block(block, (x, contexts, temb, cos, sin), Path(tempfile.mkdtemp()) / f"{name}.pt2")
                record("ours AOTInductor", lambda: runner(x, contexts, temb, cos, sin),
                       f"(compile {time.perf_counter() - t0:.0f} s, weights outside the package)")
            except Exception as e:  # noqa: BLE001
                failed("ours AOTInductor", e)
        if "fp8" not in skip:
            fp8 = fp8_block(config, b.device, "rowwise")
            record("ours FP8 linear (rowwise)", lambda: fp8(x, contexts, temb, cos, sin))
            if b.device.type == "cuda":  # what the eager path did before its quantizer was compiled
                record("ours FP8 linear (rowwise, unfused quantizer)", unfused(lambda: fp8(x, contexts, temb, cos, sin)))
            fp8t = fp8_block(config, b.device, "tensor")
            record("ours FP8 linear (per-tensor)", lambda: fp8t(x, contexts, temb, cos, sin))
            if "compile" not in skip and b.left() > 120:
                record_compiled("ours FP8 + torch.compile", fp8)
            if "micro" not in skip:
                linear_part(b, name, block, fp8, shape.tokens(config), config, compile_too="compile" not in skip)
        if "micro" not in skip:
            attention_backends(b, name, config, shape.tokens(config))
            fused_qkv(b, name, block, x)


def fp8_block(config: WanConfig, device: torch.device, scaling: str) -> TransformerBlock:
    """The same random block with every linear layer FP8 (as a middle block of the recipe)."""
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([random_block(config, device, seed=1)])
    names = quantize_fp8(holder, num_layers=1, keep_blocks=0, scaling=scaling, check_device=False)
    assert len(names) == 10, names
    return holder.blocks[0]


def cuda_graph(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Capture `fn` (fixed input buffers) once; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def no_host_sync(fn: Callable[[], torch.Tensor]) -> bool:
    """True when `fn` runs with CUDA's sync debug mode set to error (no implicit host sync)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def aoti_loads(b: Bench) -> bool:
    """Whether AOTInductor packages load here: a crash at load (seen with torch 2.11+cu130) would end
    the whole run, so a tiny package is tried first in a separate process."""
    if "aoti_loads" not in b.results:
        import subprocess

        probe = Path(__file__).with_name("aoti_probe.py")
        r = subprocess.run([sys.executable, str(probe), "--forms", "user-managed", "--device", b.device.type],
                           capture_output=True, text=True, timeout=600)
        b.results["aoti_loads"] = " ok " in r.stdout
        print(f"  AOTInductor load probe: {'ok' if b.results['aoti_loads'] else 'FAILED, skipping AOTInductor'}"
              f" ({r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-200:]})")
    return b.results["aoti_loads"]


def aoti_block(block: torch.nn.Module, args: tuple, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(block, args)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs={"aot_inductor.package_constants_in_so": False})
    runner = torch._inductor.aoti_load_package(str(path))
    constants = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    runner.load_constants({n: constants[n] for n in runner.get_constant_fqns()}, check_full_update=True,
                          user_managed=True)

    def call(*a):
        out = runner(*a)
        return out[0] if isinstance(out, (list, tuple)) else out

    return call


# -- microbenchmarks ------------------------------------------------------------------------------
def unfused(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` with FP8 activation quantization run as plain eager passes (not compiled)."""
    def call() -> torch.Tensor:
        fp8_module.FUSE_ON_CUDA = False
        try:
            return fn()
        finally:
            fp8_module.FUSE_ON_CUDA = True
    return call


def linear_part(b: Bench, name: str, block, fp8_block, tokens: int, config: WanConfig, compile_too: bool) -> None:
    """The block's ten linear layers alone at their real shapes: bf16 vs FP8 (activation quantization
    included), eager (FP8 with the compiled quantizer, and with plain eager passes) and, budget
    permitting, each whole set compiled."""
    dev, d, f = b.device, config.dim, config.ffn_dim
    g = torch.Generator(device=dev).manual_seed(3)
    x_d = torch.randn(tokens, d, device=dev, generator=g).to(torch.bfloat16)
    x_f = torch.randn(tokens, f, device=dev, generator=g).to(torch.bfloat16)
    ctx = torch.randn(512, d, device=dev, generator=g).to(torch.bfloat16)

    def run(blk, x_d, x_f, ctx):
        a1, a2, ff = blk.attn1, blk.attn2, blk.ffn.net
        return [a1.to_q(x_d), a1.to_k(x_d), a1.to_v(x_d), a1.to_out[0](x_d), a2.to_q(x_d), a2.to_out[0](x_d),
                a2.to_k(ctx), a2.to_v(ctx), ff[0].proj(x_d), ff[2](x_f)]

    flops = 2 * tokens * (6 * d * d + 2 * d * f) + 2 * 512 * 2 * d * d
    variants = {"bf16": lambda: run(block, x_d, x_f, ctx), "fp8": lambda: run(fp8_block, x_d, x_f, ctx)}
    if dev.type == "cuda":
        variants["fp8 unfused quantizer"] = unfused(variants["fp8"])
    if compile_too and b.left() > 90:
        for key, blk in (("bf16 compiled", block), ("fp8 compiled", fp8_block)):
            compiled = torch.compile(lambda x_d, x_f, ctx, blk=blk: run(blk, x_d, x_f, ctx), fullgraph=True)
            compiled(x_d, x_f, ctx)
            variants[key] = lambda compiled=compiled: compiled(x_d, x_f, ctx)
    res = {}
    for key, fn in variants.items():
        t = b.time_ms(fn)
        res[f"{key} ms"] = t["median_ms"]
        res[f"{key} TFLOP/s"] = flops / t["median_ms"] / 1e9
    errs = [relative_error(o, r) for o, r in zip(variants["fp8"](), variants["bf16"]())]
    res["rel_error_max"], res["rel_error_mean"] = max(errs), sum(errs) / len(errs)
    res["fp8 vs bf16, eager"] = res["bf16 ms"] / res["fp8 ms"]
    if "fp8 compiled ms" in res:
        res["fp8 vs bf16, compiled"] = res["bf16 compiled ms"] / res["fp8 compiled ms"]
    b.results["micro"][f"{name} linear part"] = res
    times = ", ".join(f"{k.removesuffix(' ms')} {v:.2f} ms" for k, v in res.items() if k.endswith(" ms"))
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in res.items() if k.startswith("fp8 vs"))
    print(f"  {name} linear part: {times}; {ratios}; per-layer FP8 error {res['rel_error_mean']:.1e} mean")


def attention_backends(b: Bench, name: str, config: WanConfig, tokens: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = b.device
    g = torch.Generator(device=dev).manual_seed(4)
    q, k, v = (torch.randn(1, config.num_heads, tokens, config.head_dim, device=dev, generator=g)
               .to(torch.bfloat16) for _ in range(3))
    flops = 4 * tokens * tokens * config.dim
    res = {}
    backends = [("default", None)] + [(n, getattr(SDPBackend, n)) for n in
                                      ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for label, backend in backends:
        try:
            if backend is None:
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
            else:
                def fn(backend=backend):
                    with sdpa_kernel([backend]):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            out = fn()
            t = b.time_ms(fn)
            res[label] = {"ms": t["median_ms"], "tflops": flops / t["median_ms"] / 1e9,
                          "rel_error_vs_default": relative_error(out, ref)}
        except Exception as e:  # noqa: BLE001 - backend not available for this shape/device
            res[label] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    b.results["micro"][f"{name} self-attention backends"] = res
    print(f"  {name} self-attention core: " + ", ".join(
        f"{k} {v['ms']:.2f} ms ({v['tflops']:.0f} TFLOP/s)" if "ms" in v else f"{k} n/a" for k, v in res.items()))


def fused_qkv(b: Bench, name: str, block, x: torch.Tensor) -> None:
    a = block.attn1
    w = torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight])
    bias = torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias])
    sep = b.time_ms(lambda: (a.to_q(x), a.to_k(x), a.to_v(x)))
    fused = b.time_ms(lambda: torch.nn.functional.linear(x, w, bias).chunk(3, dim=-1))
    res = {"separate_ms": sep["median_ms"], "fused_ms": fused["median_ms"],
           "gain": sep["median_ms"] / fused["median_ms"]}
    b.results["micro"][f"{name} qkv projection"] = res
    print(f"  {name} q/k/v projections: separate {res['separate_ms']:.2f} ms, fused {res['fused_ms']:.2f} ms "
          f"({res['gain']:.3f}x)")


# -- the full model -------------------------------------------------------------------------------
def random_tensor(name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Random weights made on the device (a 14B model in seconds), scaled as init_weights scales them."""
    t = torch.randn(shape, device=device, dtype=parameter_dtype(name, torch.bfloat16))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "scale_shift_table":
        return t / shape[-1] ** 0.5
    if leaf == "bias" or leaf == "pos_embed":
        return 0.02 * t
    if len(shape) == 1:
        return 1 + 0.1 * t
    return t / shape[1:].numel() ** 0.5


def full_case(b: Bench, name: str, config: WanConfig, latent: tuple[int, int, int], skip: set[str]) -> None:
    shape = StaticShape(1, *latent, per_token_timesteps=config.per_token_timesteps)
    flops = forward_flops(config, shape).total
    case = {"config": config.name, "latent": latent, "tokens": shape.tokens(config), "flops": flops, "variants": {}}
    b.results["cases"][name] = case
    torch.manual_seed(5)
    tensors = {n: random_tensor(n, s, b.device) for n, s in parameter_shapes(config).items()}
    case["weight_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    model = StaticWanTransformer.from_parameters(config, shape, tensors).eval()
    inputs = model.example_inputs(seed=6, dtype=torch.bfloat16)
    repeats = max(3, b.repeats // 4)
    with torch.inference_mode():
        if b.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(b.device)
            base = torch.cuda.memory_allocated(b.device)
        reference = model(*inputs)
        if b.device.type == "cuda":
            case["peak_activation_bytes"] = torch.cuda.max_memory_allocated(b.device) - base
            case["host_sync_free"] = no_host_sync(lambda: model(*inputs))

        def record(variant: str, fn: Callable[[], torch.Tensor]) -> None:
            b.record(name, variant, fn, flops, reference, repeats=repeats, warmup=1)

        record("ours eager", lambda: model(*inputs))
        if "compile" not in skip and b.left() > 120:
            # the compiled route (compile=True): one block's code for every block, compile time recorded
            from runtime.compiled import compile_blocks, uncompile_blocks

            compile_blocks(model)
            start = time.perf_counter()
            model(*inputs)
            b.sync()
            case["ours compiled: first call s"] = round(time.perf_counter() - start, 1)
            record("ours compiled (regional)", lambda: model(*inputs))
            uncompile_blocks(model)
        if "inductor" not in skip and b.left() > 120:
            # the `inductor` artifact: compiled once here, loaded back as a fresh process would load it
            from builder.backends.inductor import compile_block
            from runtime.backends.inductor import available_form

            form = available_form()
            start = time.perf_counter()
            data = compile_block(model, inputs, form)
            case["inductor artifact: compile s"] = round(time.perf_counter() - start, 1)
            case["inductor artifact: bytes"] = len(data)
            from runtime.backends import input_infos
            from runtime.backends.inductor import InductorEngine
            from runtime.manifest import Entry, ParityInfo

            entry = Entry("0" * 16, "inductor", "bf16", "main", shape, None, shape.tokens(config),
                          input_infos(model.input_specs(torch.bfloat16)), (), {}, {}, {}, "",
                          ParityInfo(0, 0, 1, 1))
            start = time.perf_counter()
            engine = InductorEngine(entry, b.device, model, form, data)
            case["inductor artifact: load s"] = round(time.perf_counter() - start, 1)
            record(f"ours inductor artifact ({form})", lambda: engine(*inputs))
            if engine.fell_back:
                case["inductor artifact: fell back"] = engine.fell_back
        if "diffusers" not in skip and b.left() > 60:
            try:
                from diffusers import WanTransformer3DModel

                cfg = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
                with torch.device("meta"):
                    ref = WanTransformer3DModel(**cfg)
                from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

                ref.load_state_dict(tensors, assign=True, strict=True)  # the same tensors, no copy
                ref.rope = WanRotaryPosEmbed(config.head_dim, config.patch_size, config.rope_max_seq_len).to(b.device)
                ref = ref.eval()
                record("diffusers", lambda: ref(*inputs, return_dict=False)[0])
                if "compile" not in skip and b.left() > 120:
                    # as diffusers documents regional compilation (compile_repeated_blocks), else per block
                    if hasattr(ref, "compile_repeated_blocks"):
                        ref.compile_repeated_blocks(fullgraph=True)
                    else:
                        for blk in ref.blocks:
                            blk.compile(fullgraph=True)
                    start = time.perf_counter()
                    ref(*inputs, return_dict=False)
                    b.sync()
                    case["diffusers compiled: first call s"] = round(time.perf_counter() - start, 1)
                    record("diffusers + torch.compile", lambda: ref(*inputs, return_dict=False)[0])
                del ref
            except ImportError as e:
                print(f"  {name} diffusers: not importable ({e})")
        if "fp8" not in skip and b.left() > 60:
            quantize_fp8(model, config.num_layers, check_device=False)
            record("ours FP8 (recipe)", lambda: model(*inputs))


def print_table(b: Bench) -> None:
    m = b.results["machine"]
    print()
    print(f"{m.get('gpu', m.get('cpu'))} | torch {m['torch']} | CUDA {m['cuda']} | driver {m.get('driver', '-')} | "
          f"matmul {b.results['matmul_tflops']:.0f} TFLOP/s | copy {b.results['copy_tbps']:.2f} TB/s")
    print(f"{'case':9s} {'variant':30s} {'ms':>9s} {'p25-p75':>15s} {'TFLOP/s':>8s} {'floor ms':>9s} "
          f"{'x floor':>8s} {'rel.err':>8s}")
    for case, variant, ms, p25, p75, tf, floor, ratio, err in b.rows:
        print(f"{case:9s} {variant:30s} {ms:9.2f} {p25:7.2f}-{p75:<7.2f} {tf:8.0f} {floor:9.2f} {ratio:8.2f} "
              f"{err:8.1e}")
    for case, layers in b.results.get("full_layers", {}).items():
        # every block costs the same; embeddings and head are under 1% of a forward (wan-architecture 9)
        factor = layers["model"] / layers["timed"]
        print(f"{case}: timed {layers['timed']} of {layers['model']} layers; per-block extrapolation to all layers "
              f"(x{factor:g}, an estimate):")
        for row_case, variant, ms, *_ in b.rows:
            if row_case == case:
                print(f"  {variant:30s} {ms * factor / 1000:8.2f} s per forward (estimated)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cases", default="block480,full480,block720,block5b",
                        help=f"comma-separated, in run order; known: {', '.join(CASES)}")
    parser.add_argument("--skip", default="", help=f"variant kinds to skip: {', '.join(VARIANT_KINDS)}")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (tiny presets), to check the harness")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--full-layers", type=int, default=0,
                        help="layers of the full-forward case (default: the model's); fewer to fit a time budget, "
                             "the table then also gives the per-block extrapolation to all layers")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds; compiles are skipped past it")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("BENCH_OUT") or os.environ.get("OUT")
                                                             or "bench-out"))
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(VARIANT_KINDS) | {c for c in args.cases.split(",") if c not in CASES}
    if unknown:
        parser.error(f"unknown names: {', '.join(sorted(unknown))}")
    device = torch.device(args.device)
    b = Bench(device, args.repeats, args.budget, args.out)
    m = b.results["machine"]
    print("machine: " + ", ".join(f"{k}={v}" for k, v in m.items()))
    ceilings(b, args.tiny)
    for case in args.cases.split(","):
        preset, latent, kind = CASES[case]
        config = get_preset("tiny-ti2v" if args.tiny and "5b" in case else "tiny-t2v" if args.tiny else preset)
        if args.tiny:
            latent = TINY_LATENT
            config = config.replace(num_layers=8) if kind == "full" else config
        if kind == "full" and args.full_layers:
            b.results.setdefault("full_layers", {})[case] = {"timed": args.full_layers, "model": config.num_layers}
            config = config.replace(num_layers=args.full_layers)
        print(f"{case}: {config.name}, latent {latent} ({LatentSize(*latent).tokens(config)} tokens), "
              f"{b.left():.0f} s of budget left")
        try:
            (block_case if kind == "block" else full_case)(b, case, config, latent, skip)
        except Exception:  # noqa: BLE001 - keep the other cases' numbers
            b.results["cases"].setdefault(case, {})["error"] = traceback.format_exc()[-2000:]
            print(traceback.format_exc()[-1500:])
        if device.type == "cuda":
            torch.cuda.empty_cache()
        b.save()
    b.results["wall_s"] = time.perf_counter() - b.start
    b.save()
    print_table(b)
    print(f"full results: {b.out / 'results.json'} ({b.results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
