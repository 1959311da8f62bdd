"""Cold start per route: seconds from a fresh process's start to its first output, and the steady
per-call time after it, for every way wan-build serves a call.

Routes: eager (the static model), compile=True with an empty compile cache (what a new machine or
container pays), compile=True again with the cache the first run left (a restart on the same
machine), the `inductor` artifact, the AOTInductor engine and the ONNX Runtime engine (fp32, built
once before timing; every engine route starts with an empty compile cache and temp folder, as a new
container would). Each
route runs in its own process, started with the same interpreter; "to first output" is measured by
the parent from spawning the process to the child's report after its first forward, so imports,
loading the weights and checking the engines all count.

    python bench/cold_start.py [--preset mid-i2v] [--latent 9,30,52] [--calls 3] [--json out.json]
    python bench/cold_start.py --preset tiny-t2v --latent 2,4,6 --text-tokens 16   # what the test runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, statistics, sys, time
    start = time.perf_counter()
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, spec["root"])
    import torch
    torch.set_num_threads(spec["threads"])
    from runtime import WanTransformer, get_preset
    config = get_preset(spec["preset"])
    dtype = getattr(torch, spec["dtype"])
    kwargs = {"device": spec["device"]}
    if spec["route"] in ("inductor", "aoti", "onnxruntime"):
        kwargs.update(engines=spec["engines"], backends=[spec["route"]])
    if spec["route"].startswith("compile"):
        kwargs.update(compile=True)
    model = WanTransformer.from_pretrained(spec["weights"], dtype, **kwargs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, model.config.in_channels, *spec["latent"], generator=g).to(spec["device"], dtype)
    ctx = torch.randn(1, spec["text_tokens"], model.config.text_dim, generator=g).to(spec["device"], dtype)
    t = torch.tensor([500.0], device=spec["device"])
    sync = torch.cuda.synchronize if spec["device"].startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        out = model(x, t, ctx).sample
        sync()
        first = time.perf_counter()
        print("FIRST", json.dumps({"child_s": first - start, "first_served_by": model.last_route.backend}), flush=True)
        times = []
        for _ in range(spec["calls"]):
            a = time.perf_counter()
            model(x, t, ctx)
            sync()
            times.append(time.perf_counter() - a)
    print("DONE", json.dumps({"steady_s": statistics.median(times), "route": model.last_route.backend,
                              "reason": model.last_route.reason}), flush=True)
""")

ROUTES = ("eager", "compile (empty cache)", "compile (warm cache)", "inductor", "aoti", "onnxruntime")


def run_route(route: str, spec: dict, env: dict, timeout: float) -> dict:
    spec = {**spec, "route": "compile" if route.startswith("compile") else route}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    first = None
    result: dict = {"route": route}
    deadline = start + timeout
    for line in proc.stdout:
        if line.startswith("FIRST") and first is None:
            first = time.perf_counter() - start
            result.update(json.loads(line.split(" ", 1)[1]), to_first_output_s=round(first, 2))
        elif line.startswith("DONE"):
            done = json.loads(line.split(" ", 1)[1])
            result.update(steady_s=done["steady_s"], served_by=done["route"], reason=done["reason"])
        if time.perf_counter() > deadline:
            proc.kill()
            break
    code = proc.wait()
    if code != 0 or first is None:
        result["error"] = f"exit {code}: " + (proc.stderr.read().strip().splitlines() or [""])[-1][:300]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid-i2v")
    parser.add_argument("--latent", default="9,30,52")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--calls", type=int, default=3, help="steady calls timed after the first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (engines are then built there)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--layers", type=int, default=0,
                        help="blocks of the model (default: the preset's); compile time does not grow with "
                             "them (one block's code serves all), loading and steady time do")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per route")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from builder.build import build
    from builder.init_weights import init_weights
    from builder.profiles import load_profile
    from runtime import get_preset

    config = get_preset(args.preset)
    if args.layers:
        config = config.replace(num_layers=args.layers)
    latent = [int(v) for v in args.latent.split(",")]
    frames = (latent[0] - 1) * config.vae_temporal_stride + 1
    height, width = (v * config.vae_spatial_stride for v in latent[1:])
    routes = [r for r in ROUTES if r in args.routes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_weights(config, root / "weights", seed=0, dtype=getattr(torch, args.dtype))
        backends = [r for r in ("inductor", "aoti", "onnxruntime") if r in routes]
        precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
        build_s = None
        if backends:
            (root / "p.yaml").write_text(
                f"name: cold\nmodel: {{weights: weights}}\nprecision: {precision}\nbackends: [{', '.join(backends)}]\n"
                f"shapes:\n  - {{batch: 1, frames: {frames}, height: {height}, width: {width}}}\n"
                f"text_tokens: {args.text_tokens}\ndevice: {args.device}\n")
            start = time.perf_counter()
            report = build(load_profile(root / "p.yaml"), root / "engines", echo=lambda s: None)
            build_s = {f"{r.entry.backend}": round(r.seconds, 1) for r in report.results}
            if report.failed:
                raise SystemExit(f"engine build failed: {report.failed[0].message}")
            print(f"built the engines once in {time.perf_counter() - start:.0f} s: {build_s}", flush=True)
        spec = {"root": str(ROOT), "preset": args.preset, "weights": str(root / "weights"), "latent": latent,
                "text_tokens": args.text_tokens, "engines": str(root / "engines"), "calls": args.calls,
                "threads": args.threads, "device": args.device, "dtype": args.dtype}
        results = []
        for route in routes:
            # Each route starts as on a new machine or container: an empty compile cache and an
            # empty temp folder (torch keeps its precompiled headers there), but the warm compile
            # run, which gets what the empty-cache compile run left.
            folder = root / ("compile" if route.startswith("compile") else f"route-{len(results)}")
            (folder / "tmp").mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TMPDIR": str(folder / "tmp")}
            r = run_route(route, spec, env, args.timeout)
            results.append(r)
            line = (f"{route:24s} first output {r['to_first_output_s']:7.2f} s  steady {r['steady_s']:.3f} s/call  "
                    f"(served by {r['served_by']})" if "error" not in r else f"{route:24s} FAILED: {r['error']}")
            print(line, flush=True)
    eager = next((r for r in results if r["route"] == "eager" and "error" not in r), None)
    cold = next((r for r in results if r["route"] == "compile (empty cache)" and "error" not in r), None)
    print(f"\n{config.name} ({config.num_layers} layers), {args.dtype} on {args.device}, latent {'x'.join(map(str, latent))}, {args.text_tokens} text tokens, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'route':24s} {'to first output':>16s} {'vs compile cold':>16s} {'steady s/call':>14s} {'vs eager':>9s}")
    for r in results:
        if "error" in r:
            print(f"{r['route']:24s} {'failed':>16s}")
            continue
        vs_cold = f"{r['to_first_output_s'] / cold['to_first_output_s']:15.2f}x" if cold else f"{'-':>16s}"
        vs_eager = f"{eager['steady_s'] / r['steady_s']:8.2f}x" if eager else f"{'-':>9s}"
        print(f"{r['route']:24s} {r['to_first_output_s']:15.2f}s {vs_cold} {r['steady_s']:14.3f} {vs_eager}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"preset": args.preset, "latent": latent, "text_tokens": args.text_tokens,
                                         "threads": args.threads, "torch": torch.__version__, "build_s": build_s,
                                         "routes": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
