"""Swapping a LoRA in place vs rebuilding engines for the merged weights, side by side in one run.

The model is the mid config of BENCHMARKING.md (`mid-i2v`), with a rank-R LoRA on every linear
layer of every block. Times: `set_loras([A])` from the base, `A -> B`, `set_loras([])`, and the
rebuild a LoRA change would otherwise cost: merging into a checkpoint (`wan-build lora merge`) plus
building one ONNX Runtime and one AOTInductor entry at one shape. Each swap is timed `--repeats`
times (median); the rebuild once.

    python bench/lora_swap.py [--rank 64] [--repeats 5] [--json out.json]
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

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid-i2v")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from builder.build import build
    from builder.init_weights import init_weights
    from builder.lora_tools import merge_loras_into
    from builder.profiles import load_profile
    from runtime import WanTransformer, get_preset
    from runtime.static import parameter_shapes

    torch.set_num_threads(args.threads)
    config = get_preset(args.preset)
    shapes = parameter_shapes(config)
    targets = [n[:-len(".weight")] for n, s in shapes.items() if n.startswith("blocks.") and len(s) == 2]

    def lora(path: Path, seed: int) -> Path:
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for module in targets:
            out, inp = shapes[f"{module}.weight"]
            tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(args.rank, inp, generator=g) * 0.01
            tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out, args.rank, generator=g) * 0.01
        save_file(tensors, str(path))
        return path

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_weights(config, root / "weights", seed=0)
        a, b = lora(root / "a.safetensors", 1), lora(root / "b.safetensors", 2)
        model = WanTransformer.from_pretrained(root / "weights")
        swaps = {"base -> A": [], "A -> B": [], "B -> base": []}
        for _ in range(args.repeats):
            swaps["base -> A"].append(timed(lambda: model.set_loras([(a, 1.0)])))
            swaps["A -> B"].append(timed(lambda: model.set_loras([(b, 1.0)])))
            swaps["B -> base"].append(timed(lambda: model.set_loras([])))
        rebuild = {"merge into a checkpoint": timed(lambda: merge_loras_into(root / "weights", [(a, 1.0)],
                                                                            root / "merged", echo=lambda s: None))}
        for backend in ("onnxruntime", "aoti"):
            (root / f"{backend}.yaml").write_text(
                f"name: swap\nmodel: {{weights: merged}}\nprecision: fp32\nbackends: {backend}\n"
                "shapes:\n  - {frames: 9, height: 240, width: 416}\ntext_tokens: 512\ndevice: cpu\n")
            rebuild[f"build one {backend} entry"] = timed(
                lambda: build(load_profile(root / f"{backend}.yaml"), root / f"out-{backend}", echo=lambda s: None))

    lora_mb = sum(shapes[f"{m}.weight"][0] + shapes[f"{m}.weight"][1] for m in targets) * args.rank * 4 / 1e6
    print(f"{args.preset}: {len(targets)} linear layers, rank {args.rank} ({lora_mb:.1f} MB per LoRA, fp32), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads")
    medians = {k: statistics.median(v) for k, v in swaps.items()}
    rebuilt = sum(rebuild.values())
    print(f"{'step':32s} {'seconds':>9s} {'x rebuild':>10s}")
    for name, s in list(medians.items()) + list(rebuild.items()):
        print(f"{name:32s} {s:9.3f} {s / rebuilt:10.4f}")
    print(f"{'rebuild in all':32s} {rebuilt:9.3f} {1.0:10.4f}")
    print(f"a swap (A -> B) takes {medians['A -> B'] / rebuilt:.2%} of a rebuild of one shape's two entries")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "rank": args.rank, "swaps_s": swaps,
                                         "rebuild_s": rebuild, "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
