"""The linear part of one Wan block at its real shapes: bf16 vs INT8 W8A8 vs INT4 weight-only, side by
side in one run (issue 14's goal: int8 at least 1.4x bf16 on an H100/H200, whose int8 and FP8 rates
match). The ten linear layers of a block (q, k, v, out of self-attention; q, out of cross-attention;
k, v on the 512 text tokens; the FFN's two), each variant eager and, on CUDA, under torch.compile
(which fuses INT8's per-token activation quantization into one kernel). Error: each layer's output
against bf16's, mean and max.

    python bench/int8_linear.py [--preset wan2.1-t2v-14b] [--tokens 32760] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import get_preset  # noqa: E402
from runtime.int4 import Int4Linear  # noqa: E402
from runtime.int8 import Int8Linear  # noqa: E402


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-t2v-14b")
    parser.add_argument("--tokens", type=int, default=32760, help="video tokens (14B 480p 81 frames: 32,760)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config, device = get_preset(args.preset), torch.device(args.device)
    d, f, n = config.dim, config.ffn_dim, args.tokens
    torch.manual_seed(0)
    shapes = {"attn1.to_q": (d, d, n), "attn1.to_k": (d, d, n), "attn1.to_v": (d, d, n), "attn1.to_out": (d, d, n),
              "attn2.to_q": (d, d, n), "attn2.to_out": (d, d, n), "attn2.to_k": (d, d, 512), "attn2.to_v": (d, d, 512),
              "ffn.0": (d, f, n), "ffn.2": (f, d, n)}
    layers = {k: nn.Linear(i, o).to(device, torch.bfloat16) for k, (i, o, _) in shapes.items()}
    inputs = {k: torch.randn(rows, i, device=device).to(torch.bfloat16) for k, (i, _, rows) in shapes.items()}
    variants = {"bf16": layers, "int8 W8A8": {k: Int8Linear.from_linear(v) for k, v in layers.items()}}
    int4_problem = None
    try:
        variants["int4 weight-only"] = {k: Int4Linear.from_linear(v) for k, v in layers.items()}
    except Exception as e:  # noqa: BLE001 - shapes that are no whole number of groups, a torch without the op
        int4_problem = f"{type(e).__name__}: {e}"
    flops = sum(2 * rows * i * o for i, o, rows in shapes.values())

    def call(mods):
        return [mods[k](inputs[k]) for k in shapes]

    with torch.no_grad():
        reference = call(layers)
        runs = {name: (lambda mods=mods: call(mods)) for name, mods in variants.items()}
        if device.type == "cuda" and not args.no_compile:
            for name, mods in list(variants.items()):
                compiled = torch.compile(lambda mods=mods: call(mods), fullgraph=False)
                runs[f"{name} compiled"] = compiled
        rows = {}
        for name, fn in runs.items():
            ms = timed_ms(fn, device, args.repeats)
            outs = fn()
            errors = [((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(outs, reference)]
            rows[name] = {"ms": ms, "tflops": flops / ms / 1e9, "error_mean": sum(errors) / len(errors),
                          "error_max": max(errors)}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{config.name} linear part of one block, {n} tokens, {where}, torch {torch.__version__}")
    print(f"{'variant':26s} {'ms':>8s} {'TFLOP/s':>8s} {'x bf16':>7s} {'err mean':>9s} {'err max':>9s}")
    for name, r in rows.items():
        base = rows["bf16 compiled" if name.endswith("compiled") and "bf16 compiled" in rows else "bf16"]["ms"]
        print(f"{name:26s} {r['ms']:8.2f} {r['tflops']:8.1f} {base / r['ms']:7.2f} {r['error_mean']:9.1e} "
              f"{r['error_max']:9.1e}")
    if int4_problem:
        print(f"int4 not measured: {int4_problem}")
    print("x bf16: bf16's time over the variant's (compiled against compiled); error: each layer's output vs bf16's")
    if args.json:
        args.json.write_text(json.dumps({"preset": config.name, "tokens": n, "device": where, "torch": torch.__version__,
                                         "rows": rows, "int4_problem": int4_problem}, indent=2) + "\n")


if __name__ == "__main__":
    main()
