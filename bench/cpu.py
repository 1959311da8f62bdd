"""CPU benchmark: diffusers eager vs our static model, side by side in one run.

The mid config of BENCHMARKING.md (4 heads x 128, ffn 1536, 4 layers, 36 input channels, text dim
512, 512 text tokens, latent 9 x 30 x 52 = 3,510 tokens, batch 1, fp32, 2 threads). Variants run in
alternating rounds (A B A B ...) so machine noise hits all alike; the result is the ratio of medians.

    python bench/cpu.py [--rounds 5] [--threads 2] [--json docs/benchmarks/cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.init_weights import init_weights  # noqa: E402
from runtime import WanTransformer, get_preset  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the raw times here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import WanTransformer3DModel

    config = get_preset("mid-i2v")
    with tempfile.TemporaryDirectory() as tmp:
        init_weights(config, Path(tmp), seed=0)
        ref = WanTransformer3DModel.from_pretrained(tmp).eval()
        ours = WanTransformer.from_pretrained(tmp)
        x, t, ctx = inputs(config)
        with torch.inference_mode():
            expected = ref(x, t, ctx).sample
            error = ((ours(x, t, ctx).sample - expected).norm() / expected.norm()).item()
            variants = {
                "diffusers eager": lambda: ref(x, t, ctx).sample,
                "wan-build eager (static)": lambda: ours(x, t, ctx).sample,
            }
            times = time_rounds(variants, args.rounds)

    base = statistics.median(times["diffusers eager"])
    print(f"mid config, latent {'x'.join(map(str, LATENT))}, {args.threads} threads, {args.rounds} alternating rounds, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'variant':28s} {'median s':>9s} {'min':>7s} {'max':>7s} {'speed-up vs diffusers':>22s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} {med:9.3f} {min(ts):7.3f} {max(ts):7.3f} {base / med:21.2f}x")
    print(f"relative error of ours vs diffusers: {error:.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"latent": LATENT, "threads": args.threads, "torch": torch.__version__,
                                         "times_s": times, "relative_error": error}, indent=2) + "\n")


if __name__ == "__main__":
    main()
