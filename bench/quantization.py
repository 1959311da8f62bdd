"""Quantization error, one run: FP8 (Model Optimizer's calibration, what the TensorRT FP8 entry
computes) and NVFP4 (this project's emulation of the TensorRT NVFP4 entry, max-calibrated) against
the unquantized model, plus the per-layer and weight-only parts; then, through the front on seeded
weights written to disk: INT8 W8A8 (`quantize="int8"`) in fp32 and bf16, with the time per forward
of int8, fp32 and bf16 side by side, INT4 weight-only (`quantize="int4"`), and every GGUF type
`wan-build gguf` writes, with the bytes of weights each model holds. Runs on the CPU.

Random weights are not a trained Wan: trained activations have outliers that random ones lack, so
these numbers bound the arithmetic, not the quality of a real checkpoint.

    python bench/quantization.py [--preset mid-i2v] [--latent 9,30,52] [--seeds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.quantize.nvfp4 import emulate, fake_quantize, global_scale, observe_input_amax  # noqa: E402
from runtime import StaticShape, StaticWanTransformer, get_preset  # noqa: E402
from runtime.fp8 import fp8_layer_names, kept_blocks  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mid-i2v")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--latent", default="9,30,52", help="latent frames,height,width")
    parser.add_argument("--seeds", type=int, default=4, help="calibration batches (fixed seeds)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    config = get_preset(args.preset)
    if args.layers:
        config = config.replace(num_layers=args.layers)
    latent = tuple(int(v) for v in args.latent.split(","))
    torch.manual_seed(0)
    shape = StaticShape(1, *latent, 512, config.image_tokens if config.image_dim else 0)
    model = StaticWanTransformer(config, shape).eval()
    names = fp8_layer_names(model, config.num_layers)
    batches = [model.example_inputs(seed=s) for s in range(1, args.seeds + 1)]
    held_out = model.example_inputs(seed=1234)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
           "preset": config.name, "layers": config.num_layers, "latent": latent,
           "tokens": shape.tokens(config), "quantized_layers": len(names),
           "kept_blocks_each_end": kept_blocks(config.num_layers)}
    with torch.no_grad():
        reference = model(*held_out)

        t0 = time.perf_counter()
        amax = observe_input_amax(model, names, batches)
        with emulate(model, amax):
            out["nvfp4_model"] = rel(model(*held_out), reference)
        weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
        for n in names:  # weight-only: how much of it the 4-bit weights alone cost
            w = model.get_submodule(n).weight
            w.copy_(fake_quantize(w, global_scale(w.abs().amax())))
        out["nvfp4_weights_only_model"] = rel(model(*held_out), reference)
        for n in names:
            model.get_submodule(n).weight.copy_(weights[n])
        out["nvfp4_weight_per_layer_mean"] = sum(
            rel(fake_quantize(w, global_scale(w.abs().amax())), w) for w in weights.values()) / len(weights)
        out["nvfp4_seconds"] = time.perf_counter() - t0

    try:
        from builder.quantize.fp8 import calibrate_fp8

        t0 = time.perf_counter()
        calibration = calibrate_fp8(model, batches, held_out)
        out["fp8_model"] = calibration.relative_error
        out["fp8_seconds"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - Model Optimizer missing: report NVFP4 alone
        out["fp8_model"] = f"not measured: {type(e).__name__}: {e}"

    out.update(front_types(config, latent))

    print(f"{config.name}, {config.num_layers} layers, latent {latent} ({out['tokens']} tokens), "
          f"{len(names)} quantized linear layers (first/last {out['kept_blocks_each_end']} blocks kept)")
    for key in ("fp8_model", "nvfp4_model", "nvfp4_weights_only_model", "nvfp4_weight_per_layer_mean"):
        value = out[key]
        print(f"  {key:30s} {value:.3e}" if isinstance(value, float) else f"  {key:30s} {value}")
    print(f"  {'through the front':30s} {'rel. error':>10s} {'s/forward':>10s} {'x fp32':>7s} {'weights held':>13s}")
    for name, row in out["front"].items():
        seconds = row.get("seconds")
        print(f"  {name:30s} {row['error']:10.3e} " + (f"{seconds:10.3f} {seconds / out['front']['fp32']['seconds']:7.2f}"
                                                     if seconds else f"{'-':>10s} {'-':>7s}")
              + f" {row['weights_bytes'] / 1e6:10.1f} MB")
    print("  error: against the fp32 model on the same weights and inputs; GGUF types: the file wan-build gguf "
          "writes, served by the front with its weights kept quantized")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def front_types(config, latent) -> dict:
    """INT8 and GGUF through `WanTransformer` on seeded weights written to a temporary folder."""
    import tempfile

    from builder.gguf_tools import WRITE_TYPES, write_gguf
    from builder.init_weights import init_weights
    from runtime import WanTransformer
    from runtime.errors import WanBuildError

    x_shape = (1, config.in_channels, *latent)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(x_shape, generator=g), torch.tensor([500.0])
    ctx = torch.randn(1, 512, config.text_dim, generator=g)
    image = torch.randn(1, config.image_tokens, config.image_dim, generator=g) if config.image_dim else None

    def timed(model, dtype, reps=3):
        args = (x.to(dtype), t, ctx.to(dtype)) + ((image.to(dtype),) if image is not None else ())
        with torch.no_grad():
            out = model(*args).sample
            start = time.perf_counter()
            for _ in range(reps):
                model(*args)
        return out.float(), (time.perf_counter() - start) / reps

    def held(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        init_weights(config, Path(tmp) / "w", seed=0)
        fp32 = WanTransformer.from_pretrained(Path(tmp) / "w")
        reference, seconds = timed(fp32, torch.float32)
        rows["fp32"] = {"error": 0.0, "seconds": seconds, "weights_bytes": held(fp32)}
        for name, dtype, quantize in (("bf16", torch.bfloat16, None), ("int8 (fp32 elsewhere)", torch.float32, "int8"),
                                      ("int8 (bf16 elsewhere)", torch.bfloat16, "int8")):
            model = WanTransformer.from_pretrained(Path(tmp) / "w", dtype, quantize=quantize)
            got, seconds = timed(model, dtype)
            rows[name] = {"error": rel(got, reference), "seconds": seconds, "weights_bytes": held(model)}
        try:
            model = WanTransformer.from_pretrained(Path(tmp) / "w", torch.bfloat16, quantize="int4")
        except WanBuildError as e:  # rows that are no whole number of 128-value groups (the tiny presets)
            rows["int4 (bf16 activations)"] = {"error": float("nan"), "weights_bytes": 0, "note": str(e)}
        else:
            got, seconds = timed(model, torch.bfloat16)
            rows["int4 (bf16 activations)"] = {"error": rel(got, reference), "seconds": seconds,
                                               "weights_bytes": held(model)}
        try:
            import gguf  # noqa: F401
        except ImportError:
            return {"front": rows, "gguf": "not measured: pip install gguf"}
        for kind in WRITE_TYPES:
            path = Path(tmp) / f"m-{kind}.gguf"
            write_gguf(Path(tmp) / "w", kind, path, echo=lambda s: None)
            model = WanTransformer.from_pretrained(path, preset=config)  # its head_dim is not read off a file
            got, seconds = timed(model, torch.float32, reps=1)
            rows[f"GGUF {kind}"] = {"error": rel(got, reference), "seconds": seconds, "weights_bytes": held(model),
                                    "file_bytes": path.stat().st_size}
    return {"front": rows}


if __name__ == "__main__":
    main()
