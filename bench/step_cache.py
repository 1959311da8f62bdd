"""Step caching on the CPU mid config: a classifier-free-guided denoising loop per cache policy, ours
vs diffusers' own hooks vs no cache, side by side in one run.

The loop is what diffusers' Wan pipelines run (FlowMatchEulerDiscreteScheduler, cond and uncond
calls in their cache contexts, the cache reset at the end); latents of the mid config (`mid-i2v`:
16 noise channels plus 20 condition channels), seeded random weights. Runs, in this order:
diffusers without a cache; ours with `MagCacheConfig(calibrate=True)` (skips nothing: the uncached
reference, and the checkpoint's magnitude ratios); then for First-Block-Cache and MagCache (with
those ratios) diffusers' hook and ours, eager, and ours on engines built for the shape: an `inductor`
entry (its blocks run apart) and the stage engines of `cache_stages: true` (ONNX Runtime, AOTInductor:
only the stages a step needs run).
Reported per run: wall time, time against diffusers uncached, calls that skipped blocks, and the
final latents' relative error against the uncached run and against diffusers with the same policy.
Seeded random weights give no quality verdict: the latent error is the only quality figure here.

    python bench/step_cache.py [--steps 40] [--latent 3,30,52] [--threshold-fbc 0.05]
                               [--engines inductor,onnxruntime,aoti] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid-i2v")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--latent", default="3,30,52", help="latent frames,height,width (BENCHMARKING's is 9,30,52)")
    parser.add_argument("--threshold-fbc", type=float, default=0.05, help="First-Block-Cache threshold (diffusers' default)")
    parser.add_argument("--threshold-mag", type=float, default=0.06, help="MagCache threshold (diffusers' default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-engine", action="store_true", help="build and run no engine")
    parser.add_argument("--engines", default="inductor,onnxruntime",
                        help="backends to run cached calls on: inductor (its entry), onnxruntime and aoti (stage engines)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, help="blocks of the model (default: the preset's), e.g. 4 of a 14B's 40")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    from builder.build import build
    from builder.init_weights import init_weights
    from builder.profiles import load_profile
    from runtime import WanTransformer, get_preset

    torch.set_num_threads(args.threads)
    config = get_preset(args.preset)
    if args.layers:
        config = config.replace(num_layers=args.layers)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    f, h, w = (int(v) for v in args.latent.split(","))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, config.out_channels, f, h, w, generator=g).to(device)
    condition = torch.randn(1, config.in_channels - config.out_channels, f, h, w, generator=g).to(device, dtype)
    prompt = torch.randn(1, 512, config.text_dim, generator=g).to(device, dtype)
    negative = torch.randn(1, 512, config.text_dim, generator=g).to(device, dtype)

    def denoise(model) -> tuple[torch.Tensor, float]:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
        scheduler.set_timesteps(args.steps)
        latents = noise.clone()
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                x = torch.cat([latents.to(dtype), condition], dim=1)
                fields = {"step_index": i, "num_inference_steps": args.steps}
                with model.cache_context("cond", **fields):
                    cond = model(x, t.expand(1), prompt, return_dict=False)[0]
                with model.cache_context("uncond", **fields):
                    uncond = model(x, t.expand(1), negative, return_dict=False)[0]
                guided = (uncond + 5.0 * (cond - uncond)).float()
                latents = scheduler.step(guided, t, latents, return_dict=False)[0]
        sync()
        seconds = time.perf_counter() - start
        model._reset_stateful_cache()
        return latents, seconds

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_weights(config, root / "weights", seed=0, dtype=dtype)
        theirs = WanTransformer3DModel.from_pretrained(root / "weights", torch_dtype=dtype).to(device).eval()
        ours = WanTransformer.from_pretrained(root / "weights", dtype, device=device)
        engines = {}
        if not args.no_engine:
            video = ((f - 1) * config.vae_temporal_stride + 1, h * config.vae_spatial_stride, w * config.vae_spatial_stride)
            backends = args.engines.split(",")
            (root / "p.yaml").write_text(
                f"name: cache\nmodel: {{weights: weights}}\nprecision: {PRECISIONS[args.dtype]}\n"
                f"backends: [{', '.join(backends)}]\ncache_stages: true\n"
                f"shapes:\n  - {{frames: {video[0]}, height: {video[1]}, width: {video[2]}}}\ntext_tokens: 512\n"
                f"device: {device.type}\n")
            report = build(load_profile(root / "p.yaml"), root / "engines", echo=lambda s: None)
            for b in backends:
                results = [r for r in report.results if r.entry.backend == b and (b == "inductor") == (r.entry.stage is None)]
                if all(r.status == "built" for r in results):
                    engines[b] = WanTransformer.from_pretrained(root / "weights", dtype, device=device,
                                                                engines=root / "engines", backends=[b])
                else:
                    print(f"no {b} engines: " + "; ".join(r.message for r in results if r.status != "built"))

        baseline, base_s = denoise(theirs)
        rows.append(("none", "diffusers", base_s, 0, 2 * args.steps, 0.0, None))
        calibrate = MagCacheConfig(calibrate=True, num_inference_steps=args.steps)
        ours.enable_cache(calibrate)
        policy = ours.cache_policy
        reference, s = denoise(ours)
        ours.disable_cache()
        ratios = policy.calibration["cond"]
        rows.append(("none (MagCache calibrate)", "ours eager", s, 0, policy.calls,
                     rel(reference, baseline), None))

        def err(x):
            return rel(x, reference)

        policies = [("First-Block-Cache", FirstBlockCacheConfig(threshold=args.threshold_fbc)),
                    ("MagCache", MagCacheConfig(threshold=args.threshold_mag, num_inference_steps=args.steps,
                                                mag_ratios=ratios))]
        for name, cfg in policies:
            theirs.enable_cache(cfg)
            expected, s = denoise(theirs)
            theirs.disable_cache()
            rows.append((name, "diffusers", s, None, 2 * args.steps, err(expected), None))
            runs = [("ours eager", None, ours)] + [
                (f"ours {b} {'engine' if b == 'inductor' else 'stages'}", b, m) for b, m in engines.items()]
            for label, backend, model in runs:
                model.enable_cache(cfg)
                policy = model.cache_policy
                got, s = denoise(model)
                model.disable_cache()
                if backend is not None and model.last_route.backend != backend:
                    raise SystemExit(f"the cached calls did not run on the {backend} engines: {model.last_route}")
                rows.append((name, label, s, policy.skipped, policy.calls, err(got), rel(got, expected)))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{config.name}, {config.num_layers} blocks, latent {f}x{h}x{w}, {args.steps} steps with CFG "
          f"({2 * args.steps} calls), {args.dtype}, torch {torch.__version__}, {where}, {args.threads} threads")
    print(f"{'policy':28s} {'run':24s} {'seconds':>8s} {'x none':>7s} {'skipped':>9s} {'err vs none':>12s} "
          f"{'vs diffusers':>13s}")
    for policy, run, s, skipped, calls, e, d in rows:
        skip = "-" if skipped is None else f"{skipped}/{calls}"
        print(f"{policy:28s} {run:24s} {s:8.2f} {s / base_s:7.2f} {skip:>9s} {e:12.2e} "
              f"{'-' if d is None else f'{d:.1e}':>13s}")
    print("x none: against diffusers without a cache; err vs none: final latents against ours uncached; "
          "vs diffusers: against diffusers' hook with the same config (the same skip decisions give ~1e-7)")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "latent": [f, h, w], "steps": args.steps,
                                         "threads": args.threads, "torch": torch.__version__, "mag_ratios": ratios,
                                         "rows": [dict(zip(("policy", "run", "seconds", "skipped", "calls",
                                                            "error_vs_uncached", "error_vs_diffusers"), r))
                                                  for r in rows]}, indent=2) + "\n")


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


if __name__ == "__main__":
    main()
