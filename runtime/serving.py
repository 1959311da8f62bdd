"""The video service on Ray Serve: `wan-build serve ENGINES [--ray ADDRESS] [--replicas N]`.

    POST   /v1/videos               a job (202 + its record); 422 names a bad field; 429 when the queue is full
    GET    /v1/videos/{id}          status, progress (step / steps), route, transformer calls by backend
    GET    /v1/videos/{id}/content  the result as a .npy file (frames uint8 [F, H, W, 3], or latents)
    POST   /v1/videos/{id}/cancel   (or DELETE /v1/videos/{id}) cancel: queued jobs never start, running
                                    ones stop at the next step
    GET    /health, GET /metrics    liveness and the service's counters (Prometheus text)

Three parts, all Ray's: one `Jobs` actor holds every job's state (so any replica and the API see the
same), the `Generator` deployment (one replica per GPU, or per CPU slot) runs a `VideoWorker` and
takes its calls through `serve.batch`, which hands a replica the calls that arrived together (the
worker groups them into batched pipeline calls where an engine of that batch exists), and the `Api`
ingress checks each request before it queues. A job whose replica dies is run again (up to
`retries` times) by another replica, or reported failed with the reason: an accepted job is never
silently lost. Ray Serve restarts dead replicas.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at definition
# (the request class is local to make_app, and the replicas rebuild the routes from a pickle).
import asyncio
import json
import os
import socket
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .errors import InputError, WanBuildError
from .manifest import read_manifest
from .service import (FINAL, Jobs, RequestError, Served, ServiceConfig, VideoWorker, parse_request, prometheus,
                      size_route)

NAMESPACE = "wan-build"
JOBS_ACTOR = "wan-build-jobs"
APP_NAME = "wan-build"
RAY_HINT = "pip install 'wan-build[ray]'"
MAX_BODY = 256 << 20


class ServeError(WanBuildError):
    """The service cannot start; the message says why and what to do."""


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ServeError(f"wan-build serve runs on Ray Serve: {RAY_HINT} ({e})") from None
    return ray, serve


def batch_limit(config: ServiceConfig, served: Served) -> int:
    """The most calls a replica takes as one batch: the largest engine batch (or --max-batch), 1 without batching."""
    largest = max((b for b, *_ in served.shapes), default=1)
    return max(1, min(largest, config.max_batch or largest)) if config.batching else 1


def capacity(config: ServiceConfig, served: Served) -> int:
    """Jobs held at once before 429: a batch per replica plus the queue."""
    return config.replicas * batch_limit(config, served) + config.queue


def has_text_encoder(config: ServiceConfig) -> bool:
    if config.pipeline == "tiny":
        return False
    index = Path(config.pipeline) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("text_encoder", [None, None])[0] is not None
    except (OSError, ValueError, AttributeError, IndexError, TypeError):
        return False


def summary(body: dict[str, Any], route: str) -> dict[str, Any]:
    """What a job record shows of its request (embeddings by shape only)."""
    out = {k: v for k, v in body.items() if k not in ("prompt_embeds", "negative_prompt_embeds", "image")}
    for k in ("prompt_embeds", "negative_prompt_embeds"):
        if isinstance(body.get(k), dict):
            out[k] = {"shape": body[k].get("shape")}
    if body.get("image") is not None:
        out["image"] = "(given)"
    out.setdefault("num_inference_steps", 40)
    out["route"] = route
    return out


def make_app(config: ServiceConfig):
    """The Ray Serve application of `config` (ingress bound to the generator deployment)."""
    ray, serve = _ray()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    config.check()
    served = Served.of(read_manifest(config.engines))
    text_encoder = has_text_encoder(config)
    limit = capacity(config, served)
    batch_size = batch_limit(config, served)

    def jobs_actor():
        remote = ray.remote(num_cpus=0)(Jobs)
        return remote.options(name=JOBS_ACTOR, namespace=NAMESPACE, get_if_exists=True,
                              lifetime="detached").remote(limit, config.results_kept)

    actor_options: dict[str, Any] = {"num_cpus": config.cpus_per_replica}
    if config.gpus_per_replica:
        actor_options["num_gpus"] = config.gpus_per_replica

    @serve.deployment(num_replicas=config.replicas, ray_actor_options=actor_options,
                      max_ongoing_requests=max(2 * batch_size, 2), health_check_period_s=5,
                      health_check_timeout_s=60, graceful_shutdown_timeout_s=5)
    class Generator:
        def __init__(self, cfg: ServiceConfig):
            self.worker = VideoWorker(cfg)
            self.jobs = jobs_actor()
            self.where = {"host": socket.gethostname(), "pid": os.getpid()}
            self.generate.set_max_batch_size(batch_size)
            self.generate.set_batch_wait_timeout_s(cfg.batch_wait_s)

        def _call(self, method, *args, **kwargs):
            return ray.get(method.remote(*args, **kwargs))

        def _notify(self, method, *args, **kwargs) -> None:
            method.remote(*args, **kwargs)  # the actor runs its calls in order; no answer awaited

        def _run(self, items: list[tuple[str, dict]]) -> None:
            jobs = []
            for job_id, body in items:
                try:
                    jobs.append((job_id, parse_request(body, self.worker.served, self.worker.config,
                                                       self.worker.text_encoder)))
                except InputError as e:
                    self._call(self.jobs.finish, job_id, "failed", error=str(e))
            for group in self.worker.plan(jobs):
                self._call(self.jobs.place, [j for j, _ in group], self.where)
                self.worker.run(group, self.jobs, self._call, self._notify)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # both set from the config at start
        async def generate(self, items: list[tuple[str, dict]]) -> list[str]:
            await asyncio.to_thread(self._run, items)
            return ["done"] * len(items)

        async def __call__(self, job_id: str, body: dict) -> str:
            return await self.generate((job_id, body))

    app = FastAPI(title="wan-build video service", version="1")

    def error(status: int, message: str, field: str | None = None, headers: dict | None = None):
        body = {"error": {"message": message, **({"field": field} if field else {})}}
        return JSONResponse(body, status_code=status, headers=headers)

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    @serve.ingress(app)
    class Api:
        def __init__(self, generator):
            self.generator = generator
            self.jobs = jobs_actor()
            self.tasks: set = set()
            # a restarted API replica: the queued jobs the previous one drove are nobody's now
            ray.get(self.jobs.orphan.remote("the service's API restarted before this job started; submit it again"))

        async def _drive(self, job_id: str, body: dict) -> None:
            """Run the job; when its replica dies, again elsewhere, up to `retries` times."""
            last = None
            for attempt in range(config.retries + 1):
                try:
                    await self.generator.remote(job_id, body)
                except Exception as e:  # the replica died or Serve lost the call
                    last = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                    job = await self.jobs.get.remote(job_id)
                    if job is None or job["status"] in FINAL:
                        await self.jobs.release.remote(job_id)
                        return
                    if attempt < config.retries and await self.jobs.requeue.remote(job_id, last):
                        continue
                    await self.jobs.finish.remote(job_id, "failed", error=f"its replica died {attempt + 1} time(s); "
                                                                         f"last: {last}")
                    return
                job = await self.jobs.get.remote(job_id)
                if job is not None and job["status"] not in FINAL:  # the call returned without an outcome
                    await self.jobs.finish.remote(job_id, "failed", error="the replica returned without a result")
                return

        @app.post("/v1/videos", status_code=202)
        async def create(self, request: Request):
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                return error(413, f"the body is {length} bytes; at most {MAX_BODY} are taken", "body")
            raw = bytearray()
            async for chunk in request.stream():  # also bounds a chunked body, which has no length
                raw += chunk
                if len(raw) > MAX_BODY:
                    return error(413, f"the body is over {MAX_BODY} bytes", "body")
            try:
                body = json.loads(bytes(raw))
            except ValueError as e:
                return error(400, f"not valid JSON ({e})", "body")
            try:
                parsed = parse_request(body, served, config, text_encoder)
                route = size_route(parsed, served, config.allow_eager, config.max_eager_tokens)
            except RequestError as e:
                return error(e.status, str(e), e.field)
            job_id = await self.jobs.admit.remote(summary(body, route))
            if job_id is None:
                return error(429, f"the queue is full ({limit} jobs queued or running); retry later", None,
                             {"Retry-After": "5"})
            task = asyncio.get_running_loop().create_task(self._drive(job_id, body))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return JSONResponse(await self.jobs.get.remote(job_id), status_code=202)

        @app.get("/v1/videos/{job_id}")
        async def status(self, job_id: str):
            job = await self.jobs.get.remote(job_id)
            return error(404, f"no video job {job_id!r} (finished jobs are kept for the last "
                              f"{config.results_kept})", "id") if job is None else job

        @app.get("/v1/videos/{job_id}/content")
        async def content(self, job_id: str):
            job = await self.jobs.get.remote(job_id)
            if job is None:
                return error(404, f"no video job {job_id!r}", "id")
            if job["status"] != "succeeded":
                return error(409, f"job {job_id} is {job['status']}; its content exists once it succeeded", "id")
            data = await self.jobs.result.remote(job_id)
            return Response(data, media_type="application/x-npy",
                            headers={"Content-Disposition": f'attachment; filename="{job_id}.npy"'})

        @app.post("/v1/videos/{job_id}/cancel")
        async def cancel(self, job_id: str):
            job = await self.jobs.cancel.remote(job_id)
            return error(404, f"no video job {job_id!r}", "id") if job is None else job

        @app.delete("/v1/videos/{job_id}")
        async def delete(self, job_id: str):
            return await self.cancel(job_id)

        @app.get("/health")
        async def health(self):
            stats = await self.jobs.stats.remote()
            return {"status": "ok", "replicas": config.replicas, "served": served.describe(),
                    "capacity": stats["capacity"], "jobs": stats["states"], "eager_allowed": config.allow_eager,
                    "batching": config.batching}

        @app.get("/metrics")
        async def metrics(self):
            return PlainTextResponse(prometheus(await self.jobs.stats.remote()))

    return Api.bind(Generator.bind(config))


def start(config: ServiceConfig, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          echo=print) -> str:
    """Deploy the service (on the cluster at `address`, or a local one) and return its URL."""
    ray, serve = _ray()
    config.check()
    read_manifest(config.engines)  # a bad folder fails here, with its reason, before anything starts
    if config.pipeline != "tiny" and not (Path(config.pipeline) / "model_index.json").is_file():
        raise ServeError(f"--pipeline {config.pipeline}: not a diffusers pipeline folder (no model_index.json); give "
                         "the folder of a Wan pipeline (VAE, text encoder, scheduler) or 'tiny'")
    if not ray.is_initialized():
        kwargs = {"namespace": NAMESPACE, "logging_level": "warning", "include_dashboard": False}
        try:
            ray.init(address=address, **kwargs) if address not in (None, "local") else ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ServeError(f"--ray {address}: cannot join a Ray cluster there ({e}); start one with "
                             "`ray start --head`, or leave --ray out for a cluster on this machine") from None
    served = Served.of(read_manifest(config.engines))
    if config.pipeline == "tiny" and not served.config.name.startswith("tiny"):
        raise ServeError(f"--pipeline tiny is a random test VAE for the tiny models; {config.engines} holds "
                         f"{served.config.name}: give --pipeline with its diffusers pipeline folder")
    if config.gpus_per_replica < 0:
        config = replace(config, gpus_per_replica=1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
    _drop_store(ray)  # a new deployment starts with a new job store (and the capacity of this config)
    serve.start(http_options={"host": host, "port": port})
    echo(f"deploying {config.replicas} replica(s) of the Wan pipeline on {config.engines}")
    serve.run(make_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def _drop_store(ray) -> None:
    """Kill the job store actor and wait until its name is free (a new deployment then gets a new one)."""
    import time

    try:
        ray.kill(ray.get_actor(JOBS_ACTOR, namespace=NAMESPACE))
    except ValueError:  # none
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            ray.get_actor(JOBS_ACTOR, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.1)


def stop(shutdown: bool = False) -> None:
    """Take the application and its job store down; with `shutdown`, Serve and this Ray connection
    too (a cluster this process started ends with it)."""
    ray, serve = _ray()
    if not ray.is_initialized():
        return
    try:
        serve.delete(APP_NAME, _blocking=not shutdown)  # a shutdown does not wait for replicas to drain
    except Exception:  # already gone
        pass
    _drop_store(ray)
    if shutdown:
        ray.shutdown()


def config_json(config: ServiceConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(replace(config)).items()}
