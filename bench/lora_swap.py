"""Swapping a LoRA on a model served by engines vs rebuilding those engines, side by side in one run.

The model is the mid config of BENCHMARKING.md (`mid-i2v`), with a rank-R LoRA on every linear
layer of every block. The rebuild a LoRA change would cost without weight-independent engines:
merging into a checkpoint (`wan-build lora merge`) plus building one entry per backend at one
shape (ONNX Runtime, AOTInductor, inductor). Those entries, built from the merged checkpoint, then
serve the base checkpoint with LoRAs swapped in place (they take the model's weights): per backend,
`set_loras` (merge), the first call after it (which hands the engine the new tensors, or reopens
an ONNX Runtime session) and a steady call, each the median of `--repeats` swaps A -> B -> A; every
call is checked to run on the engine and to match eager on the merged weights.

    python bench/lora_swap.py [--rank 64] [--repeats 3] [--json out.json]
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--swap-only", action="store_true",
                        help="time the swaps alone on a model made on --device (no checkpoint, no builds): the GPU check, "
                             "e.g. --swap-only --preset wan2.1-t2v-14b --device cuda --dtype bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, help="blocks of the model (default: the preset's)")
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
    if args.layers:
        config = config.replace(num_layers=args.layers)
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

    if args.swap_only:
        swap_only(args, config, lora, targets)
        return
    backends = ("onnxruntime", "aoti", "inductor")
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
        for backend in backends:
            (root / f"{backend}.yaml").write_text(
                f"name: swap\nmodel: {{weights: merged}}\nprecision: fp32\nbackends: {backend}\n"
                "shapes:\n  - {frames: 9, height: 240, width: 416}\ntext_tokens: 512\ndevice: cpu\n")
            rebuild[f"build one {backend} entry"] = timed(
                lambda: build(load_profile(root / f"{backend}.yaml"), root / f"out-{backend}", echo=lambda s: None))

        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, config.in_channels, 3, 30, 52, generator=g)
        t = torch.tensor([500.0])
        ctx = torch.randn(1, 512, config.text_dim, generator=g)
        image = torch.randn(1, 257, config.image_dim, generator=g) if config.image_dim else None
        references = {}
        for name, loras in (("A", [(a, 1.0)]), ("B", [(b, 1.0)])):
            eager = WanTransformer.from_pretrained(root / "weights", loras=loras)
            with torch.no_grad():
                references[name] = eager(x, t, ctx, image).sample
        served: dict[str, dict[str, list[float]]] = {}
        errors: dict[str, float] = {}
        for backend in backends:
            front = WanTransformer.from_pretrained(root / "weights", engines=root / f"out-{backend}",
                                                   backends=[backend])
            times = served[backend] = {"set_loras": [], "first call after": [], "steady call": []}

            def call(name: str) -> None:
                with torch.no_grad():
                    out = front(x, t, ctx, image).sample
                if front.last_route.backend != backend:
                    raise SystemExit(f"{backend}: the call ran {front.last_route}")
                ref = references[name]
                errors[backend] = max(errors.get(backend, 0.0), ((out - ref).norm() / ref.norm()).item())

            front.set_loras([(a, 1.0)])
            call("A")
            for _ in range(args.repeats):
                for name, path in (("B", b), ("A", a)):
                    times["set_loras"].append(timed(lambda: front.set_loras([(path, 1.0)])))
                    times["first call after"].append(timed(lambda: call(name)))
                    times["steady call"].append(timed(lambda: call(name)))

    lora_mb = sum(shapes[f"{m}.weight"][0] + shapes[f"{m}.weight"][1] for m in targets) * args.rank * 4 / 1e6
    print(f"{args.preset}: {len(targets)} linear layers, rank {args.rank} ({lora_mb:.1f} MB per LoRA, fp32), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads")
    medians = {k: statistics.median(v) for k, v in swaps.items()}
    rebuilt = sum(rebuild.values())
    print(f"{'step (eager model)':40s} {'seconds':>9s} {'x rebuild':>10s}")
    for name, s in list(medians.items()) + list(rebuild.items()):
        print(f"{name:40s} {s:9.3f} {s / rebuilt:10.4f}")
    print(f"{'rebuild in all':40s} {rebuilt:9.3f} {1.0:10.4f}")
    print(f"\n{'swap on engines (medians)':24s} {'set_loras':>10s} {'1st call':>9s} {'steady':>8s} {'overhead':>9s} "
          f"{'x rebuild':>10s} {'rel.err':>8s}")
    for backend, times in served.items():
        m = {k: statistics.median(v) for k, v in times.items()}
        overhead = m["set_loras"] + m["first call after"] - m["steady call"]
        entry = rebuild[f"build one {backend} entry"] + rebuild["merge into a checkpoint"]
        print(f"{backend:24s} {m['set_loras']:10.3f} {m['first call after']:9.3f} {m['steady call']:8.3f} "
              f"{overhead:9.3f} {overhead / entry:10.4f} {errors[backend]:8.1e}")
    print("overhead = set_loras + first call after - steady call; x rebuild: against merging and building that "
          "backend's entry; rel.err: largest against eager on the merged weights")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "rank": args.rank, "swaps_s": swaps,
                                         "rebuild_s": rebuild, "served_s": served, "relative_error": errors,
                                         "torch": torch.__version__, "threads": args.threads}, indent=2) + "\n")


def swap_only(args, config, lora, targets) -> None:
    """`set_loras` on a model made on the device (random weights, no checkpoint): base -> A, A -> B,
    B -> base, each timed to the device's completion, medians of `--repeats`."""
    import torch

    from runtime import WanTransformer

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.device(device):
        model = WanTransformer(config)
    model = model.to(dtype).requires_grad_(False)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        a, b = lora(Path(tmp) / "a.safetensors", 1), lora(Path(tmp) / "b.safetensors", 2)
        swaps: dict[str, list[float]] = {"base -> A": [], "A -> B": [], "B -> base": []}

        def timed(loras) -> float:
            sync()
            start = time.perf_counter()
            model.set_loras(loras)
            sync()
            return time.perf_counter() - start

        for _ in range(args.repeats):
            swaps["base -> A"].append(timed([(a, 1.0)]))
            swaps["A -> B"].append(timed([(b, 1.0)]))
            swaps["B -> base"].append(timed([]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{config.name}, {config.num_layers} blocks ({weights_gb:.1f} GB {args.dtype}), a rank-{args.rank} LoRA on "
          f"{len(targets)} linear layers, {name}, torch {torch.__version__}")
    print(f"{'swap (read the file, merge, cast)':36s} {'median s':>9s} {'all':>24s}")
    for key, values in swaps.items():
        print(f"{key:36s} {statistics.median(values):9.3f} {', '.join(f'{v:.3f}' for v in values):>24s}")
    if args.json:
        args.json.write_text(json.dumps({"preset": config.name, "layers": config.num_layers, "rank": args.rank,
                                         "device": name, "dtype": args.dtype, "weights_gb": weights_gb,
                                         "swaps_s": swaps, "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
