"""The video service on the CPU tiny model: latency p50/p99 and throughput at 1, 4 and 16 concurrent
requests, with and without batching, and the time the service adds over the same pipeline call run
in-process.

A local Ray cluster, `replicas` CPU replicas of the tiny text-to-video pipeline on ONNX Runtime
engines of batch 1 and 4 (5 frames, 32x32, 16 text tokens). A request's latency runs from its POST
to the poll that sees it finished (polled every 10 ms, so up to 10 ms late). Each level sends
`rounds` x concurrency requests, `concurrency` at a time; throughput is requests / wall time.

    python bench/serve.py [--replicas 2] [--steps 4] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from builder.build import build  # noqa: E402
from builder.init_weights import init_weights  # noqa: E402
from builder.profiles import load_profile  # noqa: E402
from runtime import get_preset  # noqa: E402
from runtime.service import Jobs, ServiceConfig, VideoWorker, encode_embeds, parse_request  # noqa: E402

TEXT = 16
PROFILE = ("name: bench-serve\nmodel: {weights: w, preset: tiny-t2v}\nprecision: fp32\nbackends: onnxruntime\n"
           "shapes:\n  - {batch: 1, frames: 5, height: 32, width: 32}\n  - {batch: 4, frames: 5, height: 32, width: 32}\n"
           f"text_tokens: {TEXT}\ndevice: cpu\n")


def payload(i: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(i)
    dim = get_preset("tiny-t2v").text_dim
    return {"prompt_embeds": encode_embeds(torch.randn(1, TEXT, dim, generator=g)),
            "negative_prompt_embeds": encode_embeds(torch.randn(1, TEXT, dim, generator=g)),
            "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": steps, "seed": i, "output": "latent"}


def call(url: str, method: str, path: str, data: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, method=method, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def one(url: str, body: dict) -> float:
    start = time.perf_counter()
    job = call(url, "POST", "/v1/videos", body)
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.01)
        job = call(url, "GET", f"/v1/videos/{job['id']}")
    if job["status"] != "succeeded":
        raise SystemExit(f"job failed: {job['error']}")
    return time.perf_counter() - start


def level(url: str, concurrency: int, rounds: int, steps: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()
    for r in range(rounds):
        def run(i, r=r):
            t = one(url, payload(r * 100 + i, steps))
            with lock:
                latencies.append(t)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    return {"concurrency": concurrency, "requests": len(latencies), "p50_s": statistics.median(latencies),
            "p99_s": p99, "throughput_per_s": len(latencies) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import ray
    from ray import serve

    from runtime import serving

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_weights(get_preset("tiny-t2v"), root / "w", seed=3)
        (root / "p.yaml").write_text(PROFILE)
        report = build(load_profile(root / "p.yaml"), root / "out", echo=lambda s: None)
        assert not report.failed, report.table()
        # the same job run in-process, alone: what the service adds is measured against this
        worker = VideoWorker(ServiceConfig(root / "out", batching=False))
        jobs = Jobs(1000)
        direct = []
        for i in range(5):
            request = parse_request(payload(i, args.steps), worker.served, worker.config, False)
            job = jobs.admit({})
            start = time.perf_counter()
            worker.run([(job, request)], jobs)
            direct.append(time.perf_counter() - start)
        direct_s = statistics.median(direct[1:])
        del worker
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="error", log_to_driver=False,
                 namespace=serving.NAMESPACE)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        results = {}
        for batching in (True, False):
            config = ServiceConfig(root / "out", replicas=args.replicas, batching=batching, queue=64)
            url = serving.start(config, port=port, echo=lambda s: None)
            for _ in range(3):  # warm: every replica has served
                one(url, payload(999, args.steps))
            results[batching] = [level(url, c, args.rounds, args.steps) for c in (1, 4, 16)]
            serving.stop()
        serve.shutdown()
        ray.shutdown()
    alone = results[True][0]["p50_s"]
    print(f"tiny-t2v 5x32x32, {args.steps} steps (x2 CFG calls), {args.replicas} CPU replicas, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), ray {ray.__version__}")
    print(f"in-process pipeline call: {direct_s * 1000:.0f} ms; through the service at concurrency 1: "
          f"{alone * 1000:.0f} ms p50 (+{(alone - direct_s) * 1000:.0f} ms per request, "
          f"{(alone - direct_s) * 1000 / args.steps:.0f} ms per step)")
    print(f"{'batching':9} {'concurrent':>10} {'requests':>8} {'p50':>8} {'p99':>8} {'req/s':>7} {'vs no batching':>15}")
    for batching in (True, False):
        for row, other in zip(results[batching], results[not batching]):
            ratio = row["throughput_per_s"] / other["throughput_per_s"]
            print(f"{'on' if batching else 'off':9} {row['concurrency']:>10} {row['requests']:>8} "
                  f"{row['p50_s'] * 1000:>6.0f}ms {row['p99_s'] * 1000:>6.0f}ms {row['throughput_per_s']:>7.2f} "
                  f"{ratio if batching else 1.0:>14.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"direct_s": direct_s, "steps": args.steps, "replicas": args.replicas,
                                         "batching": results[True], "no_batching": results[False]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
