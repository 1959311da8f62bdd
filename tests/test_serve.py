"""The video service on a local Ray Serve: concurrent requests each answered as if run alone, batching,
bad requests and a full queue with their status codes, cancel, and a replica killed mid-job."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.build import build
from builder.init_weights import init_weights
from builder.profiles import load_profile
from runtime import get_preset
from runtime.manifest import read_manifest
from runtime.service import (Jobs, RequestError, Served, ServiceConfig, VideoWorker, encode_embeds, load_npy,
                             parse_request, size_route)

pytest.importorskip("diffusers")
CONFIG = get_preset("tiny-t2v")
TEXT = 16
PROFILE = (f"name: serve\nmodel: {{weights: w, preset: tiny-t2v}}\nprecision: fp32\nbackends: onnxruntime\n"
           f"shapes:\n  - {{batch: 1, frames: 5, height: 32, width: 32}}\n  - {{batch: 4, frames: 5, height: 32, width: 32}}\n"
           f"text_tokens: {TEXT}\ndevice: cpu\n")


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    init_weights(CONFIG, root / "w", seed=3)
    (root / "p.yaml").write_text(PROFILE)
    report = build(load_profile(root / "p.yaml"), root / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built", "built"], report.table()
    return root / "out"


def body(n: int, steps: int = 3, **changes) -> dict:
    """Request `n`: its own embeddings and seed."""
    g = torch.Generator().manual_seed(1000 + n)
    out = {"prompt_embeds": encode_embeds(torch.randn(1, TEXT, CONFIG.text_dim, generator=g)),
           "negative_prompt_embeds": encode_embeds(torch.randn(1, TEXT, CONFIG.text_dim, generator=g)),
           "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": steps, "seed": n, "output": "latent"}
    out.update(changes)
    return out


# -- without Ray: the checks and the worker ---------------------------------------------------------
def test_requests_are_checked_field_by_field(engines):
    served, config = Served.of(read_manifest(engines)), ServiceConfig(engines)
    ok = parse_request(body(1), served, config, text_encoder=False)
    assert ok.prompt_embeds.shape == (1, TEXT, CONFIG.text_dim) and ok.seed == 1
    cases = [({"height": 33}, "height", "multiple of 16"), ({"num_frames": 6}, "num_frames", "4k + 1"),
             ({"num_inference_steps": 0}, "num_inference_steps", "between 1 and 200"),
             ({"seed": "x"}, "seed", "must be an integer"), ({"guidance_scale": float("nan")}, "guidance_scale", "number"),
             ({"output": "mp4"}, "output", "frames, latent"), ({"loras": ["style"]}, "loras", "not a LoRA"),
             ({"prompt": "a cat"}, "prompt", "exactly one of prompt and prompt_embeds"),
             ({"prompt_embeds": None, "prompt": "a cat"}, "prompt", "no text encoder"),
             ({"negative_prompt_embeds": None}, "negative_prompt_embeds", "required with guidance_scale > 1"),
             ({"prompt_embeds": {"shape": [1, TEXT, 7], "data": ""}}, "prompt_embeds.shape", f"{CONFIG.text_dim}]"),
             ({"prompt_embeds": {"shape": [1, TEXT, CONFIG.text_dim], "data": "AAAA"}}, "prompt_embeds.data", "bytes"),
             ({"prompt_embeds": {"shape": [1, TEXT, CONFIG.text_dim], "data": "!!"}}, "prompt_embeds.data", "base64"),
             ({"image": "x"}, "image", "text-to-video model"), ({"fps": 16}, "fps", "not a field")]
    for change, field, rule in cases:
        with pytest.raises(RequestError) as e:
            parse_request(body(1, **change), served, config, text_encoder=False)
        assert e.value.field == field and rule in str(e.value), (change, str(e.value))
    nan = torch.full((1, TEXT, CONFIG.text_dim), float("nan"))
    with pytest.raises(RequestError, match="NaN"):
        parse_request(body(1, prompt_embeds=encode_embeds(nan)), served, config, text_encoder=False)
    # a size no engine serves: eager with the reason, or refused
    odd = parse_request(body(1, height=48), served, config, text_encoder=False)
    assert size_route(ok, served, allow_eager=False) == "engine"
    assert size_route(odd, served, True, 100).startswith("eager: no engine serves 5x48x32 with 16 text tokens")
    with pytest.raises(RequestError, match="forbids eager"):
        size_route(odd, served, allow_eager=False)
    # eager stops at the largest engine size (5x32x32: 8 video tokens; 5x48x32 has 12), unless raised
    with pytest.raises(RequestError, match="is 12 video tokens; eager runs at most 8 here") as e:
        size_route(odd, served, True)
    assert e.value.field == "height"
    assert size_route(odd, served, True, max_eager_tokens=12).startswith("eager: no engine serves 5x48x32")


def test_a_cancelled_job_holds_its_place_until_no_replica_works_on_it(engines):
    jobs = Jobs(capacity=2)
    a, b = jobs.admit({}), jobs.admit({})
    assert jobs.admit({}) is None and jobs.stats()["counters"]["refused_full"] == 1
    jobs.cancel(a)  # queued, cancelled: its call is still on its way to a replica
    assert jobs.get(a)["status"] == "cancelled" and jobs.admit({}) is None
    assert jobs.start([a, b], 2) == [b]  # the replica skips it, and lets go of it
    c = jobs.admit({})
    assert c is not None and jobs.admit({}) is None
    jobs.cancel(b)  # running, cancelled: held until the replica's call ends
    assert jobs.admit({}) is None
    jobs.finish(b, "succeeded", result=b"x")
    assert jobs.get(b)["status"] == "cancelled" and jobs.result(b) is None  # a cancelled job stays cancelled
    assert jobs.admit({}) is not None


def test_jobs_with_other_negative_embedding_lengths_are_not_batched_together(engines):
    served, config = Served.of(read_manifest(engines)), ServiceConfig(engines)
    short = body(1, prompt_embeds=None, prompt="a fox")
    long = {**short, "negative_prompt_embeds": encode_embeds(torch.randn(1, TEXT + 4, CONFIG.text_dim))}
    one, other = (parse_request(b, served, config, text_encoder=True) for b in (short, long))
    assert one.group_key() != other.group_key()
    assert one.group_key() == parse_request(dict(short), served, config, text_encoder=True).group_key()


def test_the_worker_batches_where_an_engine_of_that_batch_exists(engines):
    """Six jobs of one size: a batch-4 call and two alone (engines of batch 1 and 4 only); each job's
    latents equal the same request run alone (fp32: under 1e-5)."""
    worker = VideoWorker(ServiceConfig(engines))
    jobs, alone = Jobs(100), Jobs(100)
    requests = [(jobs.admit({}), parse_request(body(s), worker.served, worker.config, False)) for s in range(6)]
    plan = worker.plan(requests)
    assert [len(g) for g in plan] == [4, 1, 1]
    for group in plan:
        worker.run(group, jobs)
    assert [jobs.get(j)["batch"] for j, _ in requests] == [4, 4, 4, 4, 1, 1]
    for job_id, request in requests:
        solo = alone.admit({})
        worker.run([(solo, request)], alone)
        a, b = load_npy(jobs.result(job_id)), load_npy(alone.result(solo))
        assert a.shape == (CONFIG.out_channels, 2, 4, 4)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
        assert jobs.get(job_id)["transformer_calls"] == {"onnxruntime": 6}  # 3 steps x (cond, uncond)
    # two jobs of one size and another step count: no batch-2 engine, so three calls of one
    other = parse_request(body(9, steps=2), worker.served, worker.config, False)
    assert [len(g) for g in worker.plan(requests[:2] + [("x", other)])] == [1, 1, 1]
    worker.config = ServiceConfig(engines, batching=False)
    assert [len(g) for g in worker.plan(requests)] == [1] * 6


def test_a_diffusers_pipeline_folder_serves_what_diffusers_computes(engines, tmp_path):
    """--pipeline FOLDER: diffusers' own pipeline (saved here without a text encoder), its transformer
    replaced by our front on the engines; the job's latents and frames equal diffusers' pipeline with
    diffusers' transformer on the same weights."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    reference = diffusers.WanTransformer3DModel.from_pretrained(engines.parent / "w").eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=reference,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    worker = VideoWorker(ServiceConfig(engines, pipeline=str(tmp_path / "pipe")))
    jobs = Jobs(10)
    for output, kind in (("latent", "latent"), ("frames", "np")):
        request = parse_request(body(4, output=output), worker.served, worker.config, worker.text_encoder)
        job = jobs.admit({})
        worker.run([(job, request)], jobs)
        assert jobs.get(job)["status"] == "succeeded" and jobs.get(job)["transformer_calls"] == {"onnxruntime": 6}
        ours = load_npy(jobs.result(job))
        with torch.no_grad():
            want = pipe(prompt_embeds=request.prompt_embeds, negative_prompt_embeds=request.negative_prompt_embeds,
                        height=32, width=32, num_frames=5, num_inference_steps=3, output_type=kind,
                        generator=[torch.Generator().manual_seed(4)]).frames[0]
        if output == "latent":
            want = want.float().numpy()
            assert np.linalg.norm(ours - want) / np.linalg.norm(want) < 1e-5
        else:
            want = (np.clip(want, 0, 1) * 255).round().astype(np.uint8)
            assert ours.shape == (5, 32, 32, 3) and np.abs(ours.astype(int) - want.astype(int)).max() <= 1


def test_an_image_to_video_service_with_two_experts_computes_what_diffusers_does(tmp_path):
    """The tiny Wan2.2 I2V-A14B form (two experts, image latents in the input channels): the image is
    required and checked; the job's latents equal diffusers' WanImageToVideoPipeline with diffusers'
    two transformers on the same weights, image and seed; each call ran on an engine."""
    import base64
    import io

    import diffusers
    from PIL import Image

    config = get_preset("tiny-i2v-a14b")
    init_weights(config, tmp_path / "w", seed=3)
    (tmp_path / "p.yaml").write_text(
        "name: i2v\nmodel:\n  experts: {high_noise: w/transformer, low_noise: w/transformer_2, boundary: 0.9}\n"
        "  preset: tiny-i2v-a14b\nprecision: fp32\nbackends: onnxruntime\n"
        f"shapes:\n  - {{batch: 1, frames: 5, height: 32, width: 32}}\ntext_tokens: {TEXT}\ndevice: cpu\n")
    assert not build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None).failed
    worker = VideoWorker(ServiceConfig(tmp_path / "out"))
    pixels = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    g = torch.Generator().manual_seed(8)
    payload = {"prompt_embeds": encode_embeds(torch.randn(1, TEXT, config.text_dim, generator=g)),
               "negative_prompt_embeds": encode_embeds(torch.randn(1, TEXT, config.text_dim, generator=g)),
               "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4, "seed": 2, "output": "latent",
               "image": base64.b64encode(png.getvalue()).decode()}
    for bad, rule in ((None, "is required: this is an image-to-video model"), ("aGVsbG8=", "not a readable")):
        with pytest.raises(RequestError, match=rule):
            parse_request({**payload, "image": bad}, worker.served, worker.config, False)
    request = parse_request(payload, worker.served, worker.config, False)
    jobs = Jobs(10)
    pair = [(jobs.admit({}), request), (jobs.admit({}), request)]
    assert [len(group) for group in worker.plan(pair)] == [1, 1]  # image jobs run one per call
    worker.run(pair[:1], jobs)
    job = jobs.get(pair[0][0])
    assert job["status"] == "succeeded" and job["transformer_calls"] == {"onnxruntime": 8}, job
    ours = load_npy(jobs.result(pair[0][0]))
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=config.out_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    ref = diffusers.WanTransformer3DModel
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None, vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), boundary_ratio=0.9,
        transformer=ref.from_pretrained(tmp_path / "w", subfolder="transformer").eval(),
        transformer_2=ref.from_pretrained(tmp_path / "w", subfolder="transformer_2").eval())
    with torch.no_grad():
        want = pipe(image=request.image, prompt_embeds=request.prompt_embeds,
                    negative_prompt_embeds=request.negative_prompt_embeds, height=32, width=32, num_frames=5,
                    num_inference_steps=4, output_type="latent", generator=[torch.Generator().manual_seed(2)]).frames
    want = want[0].float().numpy()
    assert ours.shape == want.shape and np.linalg.norm(ours - want) / np.linalg.norm(want) < 1e-5


def test_serve_s_bad_options_are_one_line(engines, tmp_path):
    import subprocess
    import sys

    from runtime import serving
    from runtime.errors import WanBuildError

    out = subprocess.run([sys.executable, "-m", "builder.cli", "serve", str(engines), "--lora", "style"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: --lora 'style': give NAME=FILE or NAME=FILE:STRENGTH"
    for config, message in ((ServiceConfig(tmp_path / "none"), "no manifest.json"),
                            (ServiceConfig(engines, cache="mag"), "give fbc or fbc:THRESHOLD"),
                            (ServiceConfig(engines, replicas=0), "--replicas must be >= 1"),
                            (ServiceConfig(engines, pipeline=str(tmp_path)), "not a diffusers pipeline folder")):
        with pytest.raises(WanBuildError, match=re.escape(message)):
            serving.start(config, echo=lambda s: None)
    assert not ray.is_initialized()  # refused before any cluster started


def test_named_loras_of_the_deployment_compute_what_diffusers_does(engines, tmp_path):
    """--lora style=FILE:0.8: a job naming it runs with the LoRA merged (equal to diffusers' pipeline
    with diffusers' model and the same LoRA as a PEFT adapter), the next job without it on the base
    weights again (equal to the job run before any LoRA)."""
    import diffusers

    from .test_lora import diffusers_with, make_lora

    lora = make_lora(CONFIG, tmp_path / "style.safetensors", "original", seed=4)
    worker = VideoWorker(ServiceConfig(engines, loras={"style": ((str(lora), 0.8),)}))
    jobs = Jobs(10)
    plain = parse_request(body(3), worker.served, worker.config, False)
    styled = parse_request(body(3, loras=["style"]), worker.served, worker.config, False)
    ids = [jobs.admit({}) for _ in range(3)]
    for job_id, request in zip(ids, (plain, styled, plain)):
        worker.run([(job_id, request)], jobs)
        assert jobs.get(job_id)["status"] == "succeeded", jobs.get(job_id)
    before, with_lora, after = (load_npy(jobs.result(j)) for j in ids)
    assert np.array_equal(before, after)  # the base weights restored exactly
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                 transformer=diffusers_with(engines.parent / "w", [(lora, 0.8)]),
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    with torch.no_grad():
        want = pipe(prompt_embeds=styled.prompt_embeds, negative_prompt_embeds=styled.negative_prompt_embeds,
                    height=32, width=32, num_frames=5, num_inference_steps=3, output_type="latent",
                    generator=[torch.Generator().manual_seed(3)]).frames[0].float().numpy()
    assert np.linalg.norm(with_lora - want) / np.linalg.norm(want) < 1e-5
    assert np.linalg.norm(with_lora - before) / np.linalg.norm(before) > 1e-3  # the LoRA did change it


# -- on Ray Serve ------------------------------------------------------------------------------------
ray = pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, url: str):
        self.url = url

    def request(self, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, payload) -> tuple[int, dict]:
        status, data = self.request("POST", "/v1/videos", json.dumps(payload).encode())
        return status, json.loads(data)

    def job(self, job_id: str) -> dict:
        return json.loads(self.request("GET", f"/v1/videos/{job_id}")[1])

    def wait(self, job_ids, seconds: float = 180) -> dict[str, dict]:
        deadline, out = time.monotonic() + seconds, {}
        while time.monotonic() < deadline:
            out = {j: self.job(j) for j in job_ids}
            if all(job["status"] in ("succeeded", "failed", "cancelled") for job in out.values()):
                return out
            time.sleep(0.2)
        raise AssertionError(f"jobs not finished in {seconds} s: {[j['status'] for j in out.values()]}")


@pytest.fixture(scope="module")
def service(engines):
    from runtime import serving

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False,
             namespace=serving.NAMESPACE)
    config = ServiceConfig(engines, replicas=2, queue=8, batch_wait_s=0.5, max_eager_tokens=12)  # a wide window: batches form under load too
    url = serving.start(config, port=_free_port(), echo=lambda s: None)
    client = Client(url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if client.request("GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    yield client, config
    serving.stop()
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.mark.slow
def test_sixteen_concurrent_requests_are_each_answered_as_if_alone(service, engines):
    client, _ = service
    payloads = [body(s, steps=3 if s % 5 else 2) for s in range(16)]
    answers: list = [None] * 16

    def send(i):
        answers[i] = client.post(payloads[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(a is not None and a[0] == 202 for a in answers), [a and a[0] for a in answers]
    ids = [a[1]["id"] for a in answers]
    jobs = client.wait(ids)
    assert [jobs[j]["status"] for j in ids] == ["succeeded"] * 16, [jobs[j]["error"] for j in ids]
    worker = VideoWorker(ServiceConfig(engines, batching=False))
    store = Jobs(100)
    for job_id, payload in zip(ids, payloads):
        status, data = client.request("GET", f"/v1/videos/{job_id}/content")
        assert status == 200
        got = load_npy(data)
        solo = store.admit({})
        worker.run([(solo, parse_request(payload, worker.served, worker.config, False))], store)
        want = load_npy(store.result(solo))
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
        job = jobs[job_id]
        assert job["progress"] == {"step": payload["num_inference_steps"], "steps": payload["num_inference_steps"]}
        assert job["route"] == "engine" and set(job["transformer_calls"]) == {"onnxruntime"}
        assert job["replica"]["pid"] > 0
    # Which of them ran batched depends on how Ray Serve's router and the batch window met them (on a
    # loaded machine, sometimes none): the grouping itself is checked deterministically in
    # test_the_worker_batches_where_an_engine_of_that_batch_exists, its effect in bench/serve.py.
    assert all(jobs[j]["batch"] in (1, 4) for j in ids)  # only batches an engine was built for
    metrics = client.request("GET", "/metrics")[1].decode()
    assert 'wan_build_jobs_total{status="succeeded"} 16' in metrics


@pytest.mark.slow
def test_bad_requests_and_unknown_jobs_get_their_status_codes(service):
    client, _ = service
    status, answer = client.post(body(1, num_frames=6))
    assert status == 422 and answer["error"]["field"] == "num_frames" and "4k + 1" in answer["error"]["message"]
    status, data = client.request("POST", "/v1/videos", b"{not json")
    assert status == 400 and json.loads(data)["error"]["field"] == "body"
    assert client.request("GET", "/v1/videos/video_nope")[0] == 404
    assert client.request("GET", "/v1/videos/video_nope/content")[0] == 404
    # a size without an engine runs eager, and says so
    status, answer = client.post(body(1, height=4096, width=4096))  # would not fit where engines were planned
    assert status == 422 and answer["error"]["field"] == "height" and "video tokens" in answer["error"]["message"]
    status, answer = client.post(body(2, height=48))
    assert status == 202 and answer["route"].startswith("eager: no engine serves 5x48x32")
    job = client.wait([answer["id"]])[answer["id"]]
    assert job["status"] == "succeeded" and job["transformer_calls"] == {"eager": 6}
    health = json.loads(client.request("GET", "/health")[1])
    assert health["status"] == "ok" and health["replicas"] == 2


@pytest.mark.slow
def test_a_full_queue_answers_429_and_cancel_stops_jobs(service):
    """Capacity: 2 replicas x batch 4 + a queue of 8 = 16 jobs queued or running."""
    client, _ = service
    answers = [client.post(body(100 + i, steps=200)) for i in range(18)]
    statuses = [a[0] for a in answers]
    assert statuses.count(202) == 16 and statuses[16:] == [429, 429], statuses
    assert "queue is full" in answers[-1][1]["error"]["message"]
    ids = [a[1]["id"] for a in answers if a[0] == 202]
    first = ids[0]
    deadline = time.monotonic() + 60
    while client.job(first)["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.request("GET", f"/v1/videos/{first}/content")[0] == 409  # not finished
    for job_id in ids:
        status, data = client.request("POST", f"/v1/videos/{job_id}/cancel")
        assert status == 200
    jobs = client.wait(ids, 120)
    assert all(j["status"] == "cancelled" for j in jobs.values())
    assert all(j["progress"]["step"] < 200 for j in jobs.values())
    # room again
    status, answer = client.post(body(5))
    assert status == 202 and client.wait([answer["id"]])[answer["id"]]["status"] == "succeeded"


@pytest.mark.slow
def test_a_replica_killed_mid_job_loses_no_job(service):
    client, _ = service
    status, answer = client.post(body(7, steps=150))
    assert status == 202
    job_id = answer["id"]
    deadline = time.monotonic() + 60
    job = client.job(job_id)
    while (job["status"] != "running" or job["progress"]["step"] < 5) and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.job(job_id)
    pid = job["replica"]["pid"]
    os.kill(pid, signal.SIGKILL)
    job = client.wait([job_id], 180)[job_id]
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2 and job["replica"]["pid"] != pid
