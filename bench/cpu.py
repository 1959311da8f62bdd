"""CPU benchmark: diffusers eager, our eager static model, our front on each engine, one run.

The mid config of BENCHMARKING.md (4 heads x 128, ffn 1536, 4 layers, 36 input channels, text dim
512, 512 text tokens, latent 9 x 30 x 52 = 3,510 tokens, batch 1, fp32, 2 threads). Variants run in
alternating rounds (A B C ... then reversed) so machine noise hits all alike; results are ratios of
medians. The front's own cost per call (input checks + routing) is timed separately, since it is
far below the run-to-run noise of a whole forward.

    python bench/cpu.py [--rounds 5] [--threads 2] [--no-engines] [--cold-start] [--json docs/benchmarks/cpu.json]

`--cold-start` then times every route from a fresh process to its first output at the same config
(bench/cold_start.py: eager, compile=True cold and warm, the inductor artifact, AOTInductor, ONNX
Runtime; its JSON goes beside --json as *-cold-start.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.build import build  # noqa: E402
from builder.init_weights import init_weights  # noqa: E402
from builder.profiles import load_profile  # noqa: E402
from runtime import WanTransformer, get_preset  # noqa: E402

PROFILE = """name: bench-mid
model: {weights: weights, preset: mid-i2v}
precision: [fp32, bf16]
backends: [onnxruntime, aoti]
shapes:
  - {batch: 1, frames: 33, height: 240, width: 416}
device: cpu
"""
LATENT = (9, 30, 52)


def inputs(config, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.in_channels, *LATENT, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 512, config.text_dim, generator=g)
    return x, t, ctx


def time_rounds(variants: dict[str, Callable[[], torch.Tensor]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up: first calls build static models, allocate
        fn()
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def front_overhead_us(model: WanTransformer, x, t, ctx, n: int = 2000) -> float:
    """Microseconds per call of what the front adds over the engine: checks, casts, routing."""
    shape, inputs = model.prepare_inputs(x, t, ctx, None)
    model.engines.route(shape, model.precision, model.device, lambda: model._eager_model(shape)[0])
    start = time.perf_counter()
    for _ in range(n):
        shape, inputs = model.prepare_inputs(x, t, ctx, None)
        model.engines.route(shape, model.precision, model.device, lambda: model._eager_model(shape)[0])
    return 1e6 * (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-engines", action="store_true", help="skip building and timing engines")
    parser.add_argument("--cold-start", action="store_true",
                        help="then time each route from a fresh process to its first output (bench/cold_start.py)")
    parser.add_argument("--json", type=Path, help="write the raw times here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import WanTransformer3DModel

    config = get_preset("mid-i2v")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_weights(config, root / "weights", seed=0)
        ref = WanTransformer3DModel.from_pretrained(root / "weights").eval()
        ref16 = WanTransformer3DModel.from_pretrained(root / "weights", torch_dtype=torch.bfloat16).eval()
        ours = WanTransformer.from_pretrained(root / "weights")
        ours16 = WanTransformer.from_pretrained(root / "weights", torch.bfloat16)
        x, t, ctx = inputs(config)
        x16, ctx16 = x.bfloat16(), ctx.bfloat16()
        variants = {"diffusers eager fp32": lambda: ref(x, t, ctx).sample,
                    "wan-build eager fp32": lambda: ours(x, t, ctx).sample,
                    "diffusers eager bf16": lambda: ref16(x16, t, ctx16).sample,
                    "wan-build eager bf16": lambda: ours16(x16, t, ctx16).sample}
        fronts = {}
        if not args.no_engines:
            (root / "p.yaml").write_text(PROFILE)
            start = time.perf_counter()
            report = build(load_profile(root / "p.yaml"), root / "engines", echo=lambda s: None)
            results["build_s"] = {f"{r.entry.backend} {r.entry.precision}": round(r.seconds, 1)
                                  for r in report.results if r.status == "built"}
            print(f"built engines in {time.perf_counter() - start:.0f} s: {results['build_s']}")
            for dtype, (xx, cc) in ((torch.float32, (x, ctx)), (torch.bfloat16, (x16, ctx16))):
                tag = "fp32" if dtype == torch.float32 else "bf16"
                for backend in ("onnxruntime", "aoti"):
                    front = WanTransformer.from_pretrained(root / "weights", dtype, engines=root / "engines",
                                                           backends=[backend])
                    shape, prepared = front.prepare_inputs(xx, t, cc, None)
                    engine, _, _ = front.engines.route(shape, front.precision, front.device,
                                                       lambda f=front, s=shape: f._eager_model(s)[0])
                    if engine is None:
                        continue  # e.g. ONNX Runtime has no bf16 CPU kernels: never built
                    fronts[f"{backend} {tag}"] = (front, xx, cc)
                    variants[f"front -> {backend} {tag}"] = (lambda f=front, a=xx, c=cc: f(a, t, c).sample)
                    variants[f"{backend} {tag} engine directly"] = (lambda e=engine, p=prepared: e(*p))
        with torch.inference_mode():
            expected = ref(x, t, ctx).sample
            errors = {name: ((fn().float() - expected).norm() / expected.norm()).item()
                      for name, fn in variants.items()}
            for name, (front, xx, cc) in fronts.items():
                front(xx, t, cc)
                assert front.last_route.backend == name.split()[0], front.last_route
            times = time_rounds(variants, args.rounds)
            overhead = {name: front_overhead_us(front, xx, t, cc) for name, (front, xx, cc) in fronts.items()}

    base = statistics.median(times["diffusers eager fp32"])
    base16 = statistics.median(times["diffusers eager bf16"])
    print(f"mid config, latent {'x'.join(map(str, LATENT))}, {args.threads} threads, {args.rounds} alternating rounds, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("speed-up columns: against diffusers eager fp32, and against diffusers eager at the same precision;")
    print("rel. error: against diffusers eager fp32")
    print(f"{'variant':32s} {'median s':>9s} {'min':>7s} {'max':>7s} {'vs fp32':>8s} {'vs same':>8s} {'rel. error':>11s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        same = base16 if "bf16" in name else base
        print(f"{name:32s} {med:9.3f} {min(ts):7.3f} {max(ts):7.3f} {base / med:7.2f}x {same / med:7.2f}x "
              f"{errors[name]:11.1e}")
    for name, us in overhead.items():
        print(f"front overhead per call ({name}): {us:.0f} us (input checks, casts, routing)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        results.update({"latent": LATENT, "threads": args.threads, "torch": torch.__version__, "times_s": times,
                        "relative_error": errors, "front_overhead_us": overhead})
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.cold_start:
        cmd = [sys.executable, str(Path(__file__).with_name("cold_start.py")), "--preset", "mid-i2v",
               "--latent", ",".join(map(str, LATENT)), "--threads", str(args.threads)]
        if args.json:
            cmd += ["--json", str(args.json.with_name(args.json.stem + "-cold-start.json"))]
        print("\ncold starts, each route in a fresh process:", flush=True)
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
