"""Build wall time, serial vs on a local Ray cluster (`wan-build build --ray local`), for the tiny
profile and a mid-config profile; and the overhead Ray adds per entry.

Each build starts from an empty engine folder with the weights already on disk; the serial build
runs in this process, the Ray build starts its cluster inside the timed region (what a user pays
with --ray local). "+ per entry" is (Ray wall time - serial wall time) / entries: what each entry
costs more on the cluster, the cluster's start included, net of what running entries side by side
gains (a serial build's torch already uses every core; a Ray task gets the threads of its CPUs);
"cluster start" is the time to start a local cluster and run one task on it, alone.

    python bench/fleet.py [--json out.json] [--profiles tiny,mid]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from builder.build import build  # noqa: E402
from builder.init_weights import init_weights  # noqa: E402
from builder.profiles import load_profile  # noqa: E402
from runtime import get_preset  # noqa: E402

PROFILES = {
    # four entries: two experts x ONNX Runtime and AOTInductor (profiles/tiny.yaml's entries)
    "tiny": ("tiny-i2v-a14b", "precision: fp32\nbackends: [onnxruntime, aoti]\n"
             "shapes:\n  - {batch: 1, frames: 9, height: 64, width: 96}\n"),
    # three ONNX Runtime entries of the mid config of BENCHMARKING.md at three shapes
    "mid": ("mid-i2v", "precision: fp32\nbackends: onnxruntime\n"
            "shapes:\n  - {batch: 1, frames: 33, height: 240, width: 416}\n"
            "  - {batch: 1, frames: 17, height: 240, width: 416}\n  - {batch: 1, frames: 9, height: 240, width: 416}\n"),
}


def profile_file(root: Path, name: str) -> Path:
    preset, body = PROFILES[name]
    config = get_preset(preset)
    folders = init_weights(config, root / "w", seed=0)
    if len(folders) == 2:
        model = f"model:\n  experts: {{high_noise: w/transformer, low_noise: w/transformer_2, boundary: 0.9}}\n  preset: {preset}\n"
    else:
        model = f"model: {{weights: w, preset: {preset}}}\n"
    path = root / "p.yaml"
    path.write_text(f"name: bench-{name}\n{model}{body}device: cpu\n")
    return path


def timed(profile: Path, out: Path, ray: str | None) -> tuple[float, list[str]]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = build(load_profile(profile), out, echo=lambda s: None, ray=ray)
    seconds = time.perf_counter() - start
    statuses = [r.status for r in report.results]
    if report.failed:
        raise SystemExit(f"{profile}: {report.failed[0].message}")
    return seconds, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="tiny,mid")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import ray

    cpus = os.cpu_count() or 1
    rows = []
    for name in args.profiles.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            profile = profile_file(root, name)
            serial, statuses = timed(profile, root / "serial", None)
            on_ray, ray_statuses = timed(profile, root / "ray", "local")
            assert statuses == ray_statuses, (statuses, ray_statuses)
            # the cluster's own start, alone: init + the probe task a fleet build runs first
            start = time.perf_counter()
            ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
            ray.get(ray.remote(lambda: os.getpid()).remote())
            startup = time.perf_counter() - start
            ray.shutdown()
            n = len(statuses)
            rows.append({"profile": name, "entries": n, "serial_s": round(serial, 1), "ray_s": round(on_ray, 1),
                         "speedup": round(serial / on_ray, 2), "ray_startup_s": round(startup, 1),
                         "extra_s_per_entry": round((on_ray - serial) / n, 2)})
    print(f"{platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__}, ray {ray.__version__}")
    print(f"{'profile':8} {'entries':>7} {'serial':>8} {'ray local':>10} {'speedup':>8} {'cluster start':>14} "
          f"{'+ per entry':>12}")
    for r in rows:
        print(f"{r['profile']:8} {r['entries']:>7} {r['serial_s']:>7.1f}s {r['ray_s']:>9.1f}s {r['speedup']:>7.2f}x "
              f"{r['ray_startup_s']:>13.1f}s {r['extra_s_per_entry']:>10.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"cpus": cpus, "torch": torch.__version__, "ray": ray.__version__,
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
