"""Host memory of an engine build, per backend and precision and per phase, as a multiple of the
weights' bytes.

Each build runs in a fresh process. The process's peak resident set (VmHWM) is reset at the start
of every phase the build announces (writing "5" to /proc/self/clear_refs) and read at its end, so
each phase's own peak is measured exactly, not sampled: loading the weights, the eager reference,
the export, writing the ONNX file, storing the weights file, the parity session, the compile, the
manifest. The weights' bytes are those of the entry's precision.

    python bench/build_memory.py                              # mid-size model, about 1.1 GB of fp32
    python bench/build_memory.py --precisions fp32,bf16 --json out.json
    python bench/build_memory.py --layers 2 --backends onnxruntime          # the test's size
The default model: Wan2.1 T2V-1.3B's structure with as many of its 30 blocks as make about 1.2 GB of
weights at each precision (6 blocks in fp32, 12 in 16-bit), stored in that precision's dtype.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, re, sys, time
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, spec["root"])

    def hwm():
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    import torch
    torch.set_num_threads(spec["threads"])
    from builder.build import build
    from builder.profiles import load_profile
    phases, current = [], ["start (imports)"]
    start = time.perf_counter()

    def echo(line):
        name = line.split(": ", 1)[1] if line.startswith("[") and ": " in line else line
        name = name.split(" (", 1)[0].split(";")[0].split(" from ", 1)[0].strip()
        if name.startswith(("built in", "failed in", "parity rel")):
            return
        phases.append({"phase": current[0], "peak_bytes": hwm(), "at_s": round(time.perf_counter() - start, 1)})
        current[0] = name
        reset()

    reset()
    report = build(load_profile(spec["profile"]), spec["out"], echo=echo)
    phases.append({"phase": current[0], "peak_bytes": hwm(), "at_s": round(time.perf_counter() - start, 1)})
    print("RESULT", json.dumps({"phases": phases, "status": [r.status for r in report.results],
                                "messages": [r.message for r in report.results]}))
""")


def weights_bytes(config, precision: str) -> float:
    from builder.planning.plan import weight_bytes

    return weight_bytes(config, precision)


def measure(backend: str, precision: str, root: Path, weights: Path, config, frames: int, height: int, width: int,
            threads: int) -> dict:
    out = root / f"out-{backend}-{precision}"
    profile = root / f"p-{backend}-{precision}.yaml"
    profile.write_text(f"name: mem\nmodel: {{weights: {weights}}}\nprecision: {precision}\nbackends: [{backend}]\n"
                       f"shapes:\n  - {{batch: 1, frames: {frames}, height: {height}, width: {width}}}\n"
                       "text_tokens: 64\ndevice: cpu\n")
    spec = {"root": str(ROOT), "profile": str(profile), "out": str(out), "threads": threads}
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(root / f"inductor-{backend}-{precision}")}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env,
                       timeout=3600)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        return {"backend": backend, "precision": precision, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    result = json.loads(line.split(" ", 1)[1])
    w = weights_bytes(config, precision)
    peak = max(p["peak_bytes"] for p in result["phases"])
    return {"backend": backend, "precision": precision, "weights_bytes": w, "peak_bytes": peak,
            "peak_x_weights": peak / w, "status": result["status"], "messages": result["messages"],
            "phases": [{**p, "x_weights": p["peak_bytes"] / w} for p in result["phases"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--layers", type=int, help="blocks of the model; default: as many as make about "
                        "--weights-gb of weights at each precision")
    parser.add_argument("--weights-gb", type=float, default=1.2, help="the mid-size model's weights (default 1.2)")
    parser.add_argument("--backends", default="onnxruntime,aoti,inductor")
    parser.add_argument("--precisions", default="fp32,fp16,bf16")
    parser.add_argument("--video", default="5,64,96", help="frames,height,width of the one shape built")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-dtype", choices=("match", "fp32"), default="match",
                        help="match: the checkpoint is stored in each precision's dtype, as Wan ships bf16 "
                             "weights for bf16 builds; fp32: one fp32 checkpoint converted at load")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from builder.init_weights import init_weights
    from runtime import get_preset

    from builder.planning.plan import weight_bytes

    base = get_preset(args.preset)

    def layers_for(precision: str) -> int:
        if args.layers:
            return args.layers
        per_block = weight_bytes(base.replace(num_layers=2), precision) - weight_bytes(base.replace(num_layers=1),
                                                                                       precision)
        rest = weight_bytes(base.replace(num_layers=1), precision) - per_block
        return max(1, min(base.num_layers, round((args.weights_gb * 1e9 - rest) / per_block)))

    frames, height, width = (int(v) for v in args.video.split(","))
    results = []
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for precision in args.precisions.split(","):
            config = base.replace(num_layers=layers_for(precision))
            stored = "fp32" if args.checkpoint_dtype == "fp32" else precision
            weights = root / f"weights-{stored}-{config.num_layers}"
            if not weights.exists():
                init_weights(config, weights, seed=0, dtype=dtypes[stored])
            for backend in args.backends.split(","):
                r = measure(backend, precision, root, weights, config, frames, height, width, args.threads)
                r["layers"] = config.num_layers
                results.append(r)
                if "error" in r:
                    print(f"{backend:12s} {precision}: FAILED {r['error']}", flush=True)
                    continue
                if r["status"] != ["built"]:
                    print(f"{backend:12s} {precision}: {r['status'][0]} ({'; '.join(r['messages'])[:160]})", flush=True)
                    r["error"] = r["status"][0]
                    r.pop("phases")
                    continue
                print(f"{backend:12s} {precision}: peak {r['peak_bytes'] / 1e9:.2f} GB = {r['peak_x_weights']:.2f}x "
                      f"the weights ({r['weights_bytes'] / 1e9:.2f} GB, {config.num_layers} blocks), {r['status']}",
                      flush=True)
    print(f"\n{base.name}'s structure, {', '.join(f'{p}: {layers_for(p)} blocks' for p in args.precisions.split(','))}, "
          f"video {args.video}, checkpoint dtype {args.checkpoint_dtype}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; peak RSS per phase as a multiple of the weights' bytes")
    names = []
    for r in results:
        for p in r.get("phases", []):
            if p["phase"] not in names:
                names.append(p["phase"])
    results_all, results = results, [r for r in results if "error" not in r]
    header = f"{'phase':44s}" + "".join(f"{r['backend'] + ' ' + r['precision']:>18s}" for r in results)
    print(header)
    for name in names:
        cells = []
        for r in results:
            found = [p for p in r.get("phases", []) if p["phase"] == name]
            cells.append(f"{max(p['x_weights'] for p in found):17.2f}x" if found else f"{'':18s}")
        print(f"{name[:44]:44s}" + "".join(cells))
    print(f"{'peak':44s}" + "".join(f"{r.get('peak_x_weights', float('nan')):17.2f}x" for r in results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"preset": args.preset, "video": args.video,
                                         "torch": torch.__version__, "results": results_all}, indent=2) + "\n")


if __name__ == "__main__":
    main()
