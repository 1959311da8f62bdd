"""Quantization error, one run: FP8 (Model Optimizer's calibration, what the TensorRT FP8 entry
computes) and NVFP4 (this project's emulation of the TensorRT NVFP4 entry, max-calibrated) against
the unquantized model, plus the per-layer and weight-only parts. Runs on the CPU.

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

    print(f"{config.name}, {config.num_layers} layers, latent {latent} ({out['tokens']} tokens), "
          f"{len(names)} quantized linear layers (first/last {out['kept_blocks_each_end']} blocks kept)")
    for key in ("fp8_model", "nvfp4_model", "nvfp4_weights_only_model", "nvfp4_weight_per_layer_mean"):
        value = out[key]
        print(f"  {key:30s} {value:.3e}" if isinstance(value, float) else f"  {key:30s} {value}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
