"""The video service's parts that need no Ray: requests checked field by field, the jobs' states, and
the worker that runs a diffusers Wan pipeline with our front and engines (`runtime.serving` puts
them on Ray Serve; `wan-build serve` starts it).

Requests (`POST /v1/videos`, JSON):

    {"prompt_embeds": {"shape": [1, L, D], "data": "<base64 float32>"},   # or "prompt": "..." (text encoder)
     "negative_prompt_embeds": {...},                                       # or "negative_prompt"
     "image": "<base64 PNG>",                                               # image-to-video models only
     "height": 480, "width": 832, "num_frames": 81, "num_inference_steps": 40, "guidance_scale": 5.0,
     "seed": 0, "loras": ["style"], "output": "frames"}                     # or "latent"

Each is checked before it queues (`parse_request`: a `RequestError` names the field and the rule),
and its size against the engines: a size no engine serves runs eager with the reason in the job, or
is refused when the deployment forbids eager. The worker groups jobs of one size, step count,
guidance, LoRA set and output into one pipeline call of batch B where an engine of batch B exists
for that size (diffusers then calls the transformer with batch B for cond and for uncond); each
job keeps its own seed (a generator per sample), so its latents start as they would alone.
"""

from __future__ import annotations

import base64
import io
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from .config import WanConfig, latent_size
from .errors import InputError, WanBuildError
from .manifest import Manifest, read_manifest

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
OUTPUTS = ("frames", "latent")
MAX_STEPS = 200
MAX_EMBED_BYTES = 64 << 20


class RequestError(InputError):
    """A request field breaks a rule: `field` names it, the message says the rule and the fix."""

    def __init__(self, field_name: str, message: str, status: int = 422):
        super().__init__(f"{field_name}: {message}")
        self.field, self.status = field_name, status


# -- the deployment ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceConfig:
    engines: Path  # an engine folder (its manifest names the experts' weights)
    pipeline: str = "tiny"  # "tiny": a random tiny VAE, no text encoder (prompt embeddings only); or a diffusers folder
    replicas: int = 1
    gpus_per_replica: float = 0.0  # 0: CPU replicas; -1: 1 where the cluster has GPUs (`serving.start`)
    cpus_per_replica: float = 1.0
    allow_eager: bool = True  # sizes no engine serves: run eager (True) or refuse them
    max_eager_tokens: int | None = None  # eager sizes up to this many video tokens; None: the largest engine's
    batching: bool = True
    max_batch: int | None = None  # None: the largest engine batch of the folder
    batch_wait_s: float = 0.02  # how long a replica's first call waits for others to batch with
    queue: int = 16  # accepted jobs waiting beyond those running, over all replicas; more get 429
    loras: Mapping[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)  # name -> [(file, strength)]
    cache: str | None = None  # "fbc" or "fbc:THRESHOLD": diffusers' First Block Cache through the front
    device: str = "auto"
    results_kept: int = 256  # finished jobs kept for status and result (oldest dropped first)
    retries: int = 2  # a job whose replica died is run again this many times, then reported failed

    def check(self) -> None:
        if self.replicas < 1:
            raise InputError(f"--replicas must be >= 1 (got {self.replicas})")
        if self.queue < 0:
            raise InputError(f"--queue must be >= 0 (got {self.queue})")
        if not 0 <= self.batch_wait_s <= 10:
            raise InputError(f"--batch-wait must be between 0 and 10 seconds (got {self.batch_wait_s})")
        if self.max_eager_tokens is not None and self.max_eager_tokens < 0:
            raise InputError(f"--max-eager-tokens must be >= 0 (got {self.max_eager_tokens})")
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError(f"--max-batch must be >= 1 (got {self.max_batch})")
        if self.cache is not None and not re.fullmatch(r"fbc(:\d*\.?\d+)?", self.cache):
            raise InputError(f"--cache {self.cache!r}: give fbc or fbc:THRESHOLD (e.g. fbc:0.05)")


@dataclass(frozen=True)
class Served:
    """What the engine folder serves: (batch, latent frames, height, width, text tokens) per expert."""
    config: WanConfig
    shapes: frozenset[tuple[int, int, int, int, int]]
    experts: tuple[str, ...]

    @classmethod
    def of(cls, manifest: Manifest) -> "Served":
        first = next(iter(manifest.experts.values())).config
        config = WanConfig.from_diffusers(first, name=str(first.get("name", "diffusers")))
        shapes = frozenset((e.shape.batch, e.shape.latent_frames, e.shape.latent_height, e.shape.latent_width,
                            e.shape.text_tokens) for e in manifest.entries.values() if e.stage is None)
        return cls(config, shapes, tuple(manifest.experts))

    def batches(self, latent, tokens: int) -> list[int]:
        key = (latent.frames, latent.height, latent.width)
        return sorted(b for b, f, h, w, t in self.shapes if (f, h, w) == key and t == tokens)

    def describe(self) -> str:
        sizes = sorted({(b, f, h, w, t) for b, f, h, w, t in self.shapes})
        return ", ".join(f"{_pixels(self.config, f, h, w)} b{b} ({t} text tokens)" for b, f, h, w, t in sizes) or "none"


def _pixels(config: WanConfig, f: int, h: int, w: int) -> str:
    st, ss = config.vae_temporal_stride, config.vae_spatial_stride
    return f"{(f - 1) * st + 1}x{h * ss}x{w * ss}"


def needs_image(config: WanConfig) -> bool:
    """Image-to-video models: CLIP image tokens (Wan2.1) or image latents in the input channels (Wan2.2)."""
    return config.image_dim is not None or config.in_channels != config.out_channels


# -- requests -----------------------------------------------------------------------------------------
@dataclass
class VideoRequest:
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    output: str
    loras: tuple[str, ...]
    prompt: str | None = None
    negative_prompt: str | None = None
    prompt_embeds: torch.Tensor | None = field(default=None, repr=False)
    negative_prompt_embeds: torch.Tensor | None = field(default=None, repr=False)
    image: Any = field(default=None, repr=False)  # PIL image

    @property
    def text_tokens(self) -> int | None:
        return None if self.prompt_embeds is None else self.prompt_embeds.shape[1]

    def group_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call (batch = number of jobs)."""
        negative = None if self.negative_prompt_embeds is None else tuple(self.negative_prompt_embeds.shape)
        return (self.height, self.width, self.num_frames, self.num_inference_steps, self.guidance_scale, self.output,
                self.loras, self.text_tokens, negative, self.prompt is None, self.negative_prompt is None,
                self.image is None)


def _int(data: Mapping, name: str, default: int | None, low: int, high: int) -> int:
    value = data.get(name, default)
    if value is None:
        raise RequestError(name, "is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be an integer (got {value!r})")
    if not low <= value <= high:
        raise RequestError(name, f"must be between {low} and {high} (got {value})")
    return value


def _embeds(data: Mapping, name: str, config: WanConfig) -> torch.Tensor | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) - {"shape", "data"} or not {"shape", "data"} <= set(value):
        raise RequestError(name, 'must be {"shape": [1, tokens, text_dim], "data": "<base64 of float32 values>"}')
    shape = value["shape"]
    if (not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                   for s in shape)):
        raise RequestError(f"{name}.shape", f"must be three integers [1, tokens, text_dim] (got {shape!r})")
    if shape[0] != 1 or not 1 <= shape[1] <= 4096 or shape[2] != config.text_dim:
        raise RequestError(f"{name}.shape", f"must be [1, 1..4096, {config.text_dim}] for this model (got {shape})")
    if not isinstance(value["data"], str) or len(value["data"]) > MAX_EMBED_BYTES * 4 // 3 + 4:
        raise RequestError(f"{name}.data", "must be a base64 string of at most 64 MiB")
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except ValueError:
        raise RequestError(f"{name}.data", "is not valid base64") from None
    need = math.prod(shape) * 4
    if len(raw) != need:
        raise RequestError(f"{name}.data", f"holds {len(raw)} bytes; shape {shape} in float32 needs {need}")
    tensor = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(shape)
    if not torch.isfinite(tensor).all():
        raise RequestError(f"{name}.data", "holds NaN or infinite values")
    return tensor


def encode_embeds(tensor: torch.Tensor) -> dict[str, Any]:
    """A [1, tokens, dim] tensor as a request carries it."""
    t = tensor.detach().to(torch.float32).contiguous().cpu()
    return {"shape": list(t.shape), "data": base64.b64encode(t.numpy().tobytes()).decode()}


KNOWN = {"prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "image", "height", "width",
         "num_frames", "num_inference_steps", "guidance_scale", "seed", "loras", "output"}


def parse_request(data: Any, served: Served, config: ServiceConfig, text_encoder: bool) -> VideoRequest:
    """A request body checked field by field (RequestError names the first bad one)."""
    if not isinstance(data, Mapping):
        raise RequestError("body", "must be a JSON object")
    unknown = sorted(set(data) - KNOWN)
    if unknown:
        raise RequestError(unknown[0], f"is not a field of a video request (fields: {', '.join(sorted(KNOWN))})")
    model = served.config
    st, ss = model.vae_temporal_stride, model.vae_spatial_stride
    step = ss * model.patch_size[1]
    height = _int(data, "height", None, step, 4096)
    width = _int(data, "width", None, step, 4096)
    for name, value in (("height", height), ("width", width)):
        if value % step:
            raise RequestError(name, f"must be a multiple of {step} (got {value}; try {value // step * step or step})")
    frames = _int(data, "num_frames", None, 1, 1025)
    if (frames - 1) % st:
        raise RequestError("num_frames", f"must be {st}k + 1 (got {frames}; try {(frames - 1) // st * st + 1})")
    steps = _int(data, "num_inference_steps", 40, 1, MAX_STEPS)
    seed = _int(data, "seed", 0, 0, 2**63 - 1)
    guidance = data.get("guidance_scale", 5.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= 50 \
            or not math.isfinite(guidance):
        raise RequestError("guidance_scale", f"must be a number between 0 and 50 (got {guidance!r})")
    output = data.get("output", "frames")
    if output not in OUTPUTS:
        raise RequestError("output", f"must be one of {', '.join(OUTPUTS)} (got {output!r})")
    loras = data.get("loras", [])
    if not isinstance(loras, list) or not all(isinstance(n, str) for n in loras):
        raise RequestError("loras", "must be a list of LoRA names")
    for name in loras:
        if name not in config.loras:
            raise RequestError("loras", f"{name!r} is not a LoRA of this deployment (it has: "
                                        f"{', '.join(sorted(config.loras)) or 'none'})")
    request = VideoRequest(height, width, frames, steps, float(guidance), seed, output, tuple(loras))
    for name in ("prompt", "negative_prompt"):
        value = data.get(name)
        if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > 10000):
            raise RequestError(name, "must be a non-empty string of at most 10000 characters")
    request.prompt, request.negative_prompt = data.get("prompt"), data.get("negative_prompt")
    request.prompt_embeds = _embeds(data, "prompt_embeds", model)
    request.negative_prompt_embeds = _embeds(data, "negative_prompt_embeds", model)
    if (request.prompt is None) == (request.prompt_embeds is None):
        raise RequestError("prompt", "give exactly one of prompt and prompt_embeds")
    if request.negative_prompt is not None and request.negative_prompt_embeds is not None:
        raise RequestError("negative_prompt", "give at most one of negative_prompt and negative_prompt_embeds")
    if not text_encoder:
        if request.prompt is not None:
            raise RequestError("prompt", "this deployment has no text encoder: send prompt_embeds")
        if request.negative_prompt is not None:
            raise RequestError("negative_prompt", "this deployment has no text encoder: send negative_prompt_embeds")
        if guidance > 1 and request.negative_prompt_embeds is None:
            raise RequestError("negative_prompt_embeds", "is required with guidance_scale > 1 on a deployment "
                                                         "without a text encoder")
    if request.prompt_embeds is not None and request.negative_prompt_embeds is not None \
            and request.negative_prompt_embeds.shape != request.prompt_embeds.shape:
        raise RequestError("negative_prompt_embeds.shape", f"must equal prompt_embeds.shape "
                                                           f"{list(request.prompt_embeds.shape)}")
    image = data.get("image")
    if needs_image(model):
        if image is None:
            raise RequestError("image", "is required: this is an image-to-video model (base64 PNG or JPEG)")
        request.image = _image(image)
    elif image is not None:
        raise RequestError("image", "this is a text-to-video model; drop the image")
    return request


def _image(value: Any):
    if not isinstance(value, str) or len(value) > 64 << 20:
        raise RequestError("image", "must be a base64 PNG or JPEG of at most 48 MiB")
    try:
        from PIL import Image

        raw = base64.b64decode(value, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image.convert("RGB")
    except ImportError:
        raise RequestError("image", "image requests need Pillow on the service (pip install pillow)", 500) from None
    except Exception:
        raise RequestError("image", "is not a readable base64 PNG or JPEG") from None


def video_tokens(config: WanConfig, frames: int, height: int, width: int) -> int:
    """Tokens of one latent video (what attention's cost grows with)."""
    pt, ph, pw = config.patch_size
    return (frames // pt) * (height // ph) * (width // pw)


def size_route(request: VideoRequest, served: Served, allow_eager: bool, max_eager_tokens: int | None = None) -> str:
    """The route the request's size gets: "engine" when a batch-1 engine serves it, else "eager: why";
    RequestError when eager is forbidden, or when the size is larger than eager may run here (by
    default the largest engine size: what the deployment's memory was planned for)."""
    latent = latent_size(served.config, request.num_frames, request.height, request.width)
    tokens = request.text_tokens if request.text_tokens is not None else 512
    if 1 in served.batches(latent, tokens):
        return "engine"
    why = (f"no engine serves {request.num_frames}x{request.height}x{request.width} with {tokens} text tokens "
           f"(engines: {served.describe()})")
    if not allow_eager:
        raise RequestError("height", f"{why}; this deployment forbids eager, so send a size it serves")
    limit = max_eager_tokens if max_eager_tokens is not None else max(
        (video_tokens(served.config, f, h, w) for _, f, h, w, _ in served.shapes), default=0)
    have = video_tokens(served.config, latent.frames, latent.height, latent.width)
    if have > limit:
        raise RequestError("height", f"{request.num_frames}x{request.height}x{request.width} is {have} video tokens; "
                                     f"eager runs at most {limit} here (the largest engine size; the deployment's "
                                     f"--max-eager-tokens raises it); {why}")
    return f"eager: {why}"


# -- jobs -------------------------------------------------------------------------------------------
class Jobs:
    """Every job's state, bounded: at most `capacity` held (more: `admit` says no), and `kept` finished
    ones. A job is held from its admission until a replica lets go of it (finished, or skipped as
    cancelled), so a cancelled job frees its place only once no replica still works on it.
    Thread-safe; on Ray it lives in one actor that every replica reports to."""

    def __init__(self, capacity: int, kept: int = 256):
        self.capacity, self.kept = capacity, kept
        self._jobs: dict[str, dict[str, Any]] = {}
        self._results: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.counters: dict[str, float] = {"requests": 0, "refused_full": 0, "steps": 0, "step_seconds": 0.0,
                                           **{f"jobs_{s}": 0 for s in FINAL}, "retried": 0, "batched_calls": 0,
                                           "batched_jobs": 0}
        self.routes: dict[str, int] = {}

    def admit(self, summary: dict[str, Any]) -> str | None:
        """A new job's id, or None when the queue is full."""
        with self._lock:
            self.counters["requests"] += 1
            active = sum(j["held"] for j in self._jobs.values())
            if active >= self.capacity:
                self.counters["refused_full"] += 1
                return None
            job_id = f"video_{uuid.uuid4().hex[:24]}"
            self._jobs[job_id] = {"id": job_id, "object": "video", "status": "queued", "created_at": time.time(),
                                  "progress": {"step": 0, "steps": summary.get("num_inference_steps")},
                                  "request": summary, "route": summary.get("route"), "attempts": 0,
                                  "error": None, "transformer_calls": {}, "batch": None, "held": True}
            return job_id

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else {**job, "progress": dict(job["progress"])}

    def result(self, job_id: str) -> bytes | None:
        with self._lock:
            return self._results.get(job_id)

    def start(self, job_ids: Iterable[str], batch: int) -> list[str]:
        """Mark jobs running; returns those still wanted (not cancelled or finished)."""
        out = []
        with self._lock:
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is None or job["status"] in FINAL:
                    if job is not None:
                        job["held"] = False  # the replica skips it: its place is free
                    continue
                job.update(status="running", started_at=time.time(), batch=batch)
                job["attempts"] += 1
                out.append(job_id)
            if batch > 1:
                self.counters["batched_calls"] += 1
                self.counters["batched_jobs"] += batch
        return out

    def place(self, job_ids: Iterable[str], where: Mapping[str, Any]) -> None:
        """Record which replica (host, pid) runs these jobs."""
        with self._lock:
            for job_id in job_ids:
                if job_id in self._jobs:
                    self._jobs[job_id]["replica"] = dict(where)

    def requeue(self, job_id: str, reason: str) -> bool:
        """A job whose replica died goes back to queued (True), unless it is finished or cancelled."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job["status"] in FINAL:
                return False
            job.update(status="queued", error=f"retrying: {reason}")
            job["progress"]["step"] = 0
            self.counters["retried"] += 1
            return True

    def progress(self, job_ids: Iterable[str], step: int, steps: int, seconds: float) -> None:
        with self._lock:
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is not None and job["status"] == "running":
                    job["progress"] = {"step": step, "steps": steps}
            self.counters["steps"] += 1
            self.counters["step_seconds"] += seconds

    def finish(self, job_id: str, status: str, *, result: bytes | None = None, error: str | None = None,
               calls: Mapping[str, int] | None = None) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return
            job["held"] = False
            if job["status"] in FINAL:  # cancelled meanwhile: it stays cancelled
                return
            job.update(status=status, finished_at=time.time(), error=error)
            if calls:
                job["transformer_calls"] = dict(calls)
                for route, n in calls.items():
                    self.routes[route] = self.routes.get(route, 0) + n
            if result is not None:
                self._results[job_id] = result
            self.counters[f"jobs_{status}"] += 1
            finished = [j for j in self._jobs.values() if j["status"] in FINAL and not j["held"]]
            for old in sorted(finished, key=lambda j: j["finished_at"])[:max(0, len(finished) - self.kept)]:
                self._jobs.pop(old["id"], None)
                self._results.pop(old["id"], None)

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job["status"] not in FINAL:
                job.update(status="cancelled", finished_at=time.time())
                self.counters["jobs_cancelled"] += 1
            return {**job}

    def release(self, job_id: str) -> None:
        """No replica works on the job any more (its call was lost after it was cancelled)."""
        with self._lock:
            if job_id in self._jobs:
                self._jobs[job_id]["held"] = False

    def orphan(self, reason: str) -> int:
        """Fail the queued jobs nobody will start (the API that drove them restarted); running ones
        finish on their replica. Returns how many failed."""
        with self._lock:
            queued = [j for j in self._jobs.values() if j["status"] == "queued"]
        for job in queued:
            self.finish(job["id"], "failed", error=reason)
        return len(queued)

    def cancelled(self, job_ids: Iterable[str]) -> list[str]:
        with self._lock:
            return [j for j in job_ids if self._jobs.get(j, {}).get("status") == "cancelled"]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            states = {s: 0 for s in STATES}
            for job in self._jobs.values():
                states[job["status"]] += 1
            return {"counters": dict(self.counters), "states": states, "routes": dict(self.routes),
                    "capacity": self.capacity, "held": sum(j["held"] for j in self._jobs.values())}


def prometheus(stats: Mapping[str, Any]) -> str:
    """The service's counters in Prometheus' text format."""
    c = stats["counters"]
    lines = ["# HELP wan_build_requests_total Video requests received.", "# TYPE wan_build_requests_total counter",
             f"wan_build_requests_total {c['requests']:g}",
             "# HELP wan_build_refused_total Requests refused with 429 (queue full).",
             "# TYPE wan_build_refused_total counter", f"wan_build_refused_total {c['refused_full']:g}",
             "# HELP wan_build_jobs_total Finished jobs by status.", "# TYPE wan_build_jobs_total counter"]
    lines += [f'wan_build_jobs_total{{status="{s}"}} {c[f"jobs_{s}"]:g}' for s in FINAL]
    lines += ["# HELP wan_build_jobs Jobs by current state.", "# TYPE wan_build_jobs gauge"]
    lines += [f'wan_build_jobs{{state="{s}"}} {n}' for s, n in stats["states"].items()]
    lines += ["# HELP wan_build_steps_total Denoising steps run (one per batched pipeline step).",
              "# TYPE wan_build_steps_total counter", f"wan_build_steps_total {c['steps']:g}",
              "# HELP wan_build_step_seconds_total Seconds spent in denoising steps.",
              "# TYPE wan_build_step_seconds_total counter", f"wan_build_step_seconds_total {c['step_seconds']:.6f}",
              "# HELP wan_build_transformer_calls_total Transformer calls by route.",
              "# TYPE wan_build_transformer_calls_total counter"]
    lines += [f'wan_build_transformer_calls_total{{route="{r}"}} {n}' for r, n in sorted(stats["routes"].items())]
    lines += ["# HELP wan_build_retried_total Jobs run again after their replica died.",
              "# TYPE wan_build_retried_total counter", f"wan_build_retried_total {c['retried']:g}",
              "# HELP wan_build_batched_jobs_total Jobs served in a batched pipeline call.",
              "# TYPE wan_build_batched_jobs_total counter", f"wan_build_batched_jobs_total {c['batched_jobs']:g}"]
    return "\n".join(lines) + "\n"


# -- the worker: one replica's pipeline --------------------------------------------------------------
class VideoWorker:
    """A diffusers Wan pipeline whose transformer(s) are our front on the folder's engines."""

    def __init__(self, config: ServiceConfig):
        import diffusers

        from .dynamic import WanTransformer

        config.check()
        self.config = config
        manifest = read_manifest(config.engines)
        self.served = Served.of(manifest)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        names = list(manifest.experts)
        self.fronts = {name: WanTransformer.from_pretrained(manifest.experts[name].weights, engines=config.engines,
                                                            device=self.device)
                       for name in names}
        self._calls: dict[str, int] = {}
        for front in self.fronts.values():
            front.register_forward_hook(self._count)
        if config.cache is not None:
            threshold = float(config.cache.split(":", 1)[1]) if ":" in config.cache else 0.05
            for front in self.fronts.values():
                front.enable_cache(diffusers.hooks.FirstBlockCacheConfig(threshold=threshold))
        model = self.served.config
        if model.image_dim is not None:
            raise WanBuildError("the service runs text-to-video models and Wan2.2-form image-to-video models (no "
                                "CLIP image encoder); this folder's model needs CLIP image tokens")
        cls = diffusers.WanImageToVideoPipeline if needs_image(model) else diffusers.WanPipeline
        transformers = {"transformer": self.fronts[names[0]]}
        if len(names) == 2:
            transformers["transformer_2"] = self.fronts[names[1]]
        extra = {"boundary_ratio": manifest.boundary} if manifest.boundary is not None else {}
        if config.pipeline == "tiny":
            if model.per_token_timesteps:
                raise WanBuildError("--pipeline tiny has the Wan2.1 VAE's geometry; a TI2V model (the Wan2.2 VAE, "
                                    "per-token timesteps) needs its diffusers pipeline folder: --pipeline FOLDER")
            torch.manual_seed(0)
            vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=model.out_channels, dim_mult=[1, 1, 1, 1],
                                             num_res_blocks=1, temperal_downsample=[False, True, True]).eval()
            parts = dict(tokenizer=None, text_encoder=None, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
            if needs_image(model):
                parts.update(image_encoder=None, image_processor=None)
            self.pipe = cls(**parts, **transformers, **extra)
        else:
            folder = Path(config.pipeline)
            if not (folder / "model_index.json").is_file():
                raise WanBuildError(f"--pipeline {folder}: not a diffusers pipeline folder (no model_index.json); "
                                    "give the folder of a Wan pipeline (its VAE, text encoder, scheduler) or 'tiny'")
            # diffusers checks a passed component's class (ModelMixin): load the rest without the
            # transformers (None: their weights are not read), then put the fronts in
            import json

            index = json.loads((folder / "model_index.json").read_text())
            absent = {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}
            self.pipe = cls.from_pretrained(folder, **absent, **{k: None for k in transformers})
            for key, front in transformers.items():
                setattr(self.pipe, key, front)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.text_encoder = getattr(self.pipe, "text_encoder", None) is not None
        self._lock = threading.Lock()

    def _count(self, module, args, output) -> None:
        route = getattr(module, "last_route", None)
        key = "eager" if route is None else route.backend
        self._calls[key] = self._calls.get(key, 0) + 1

    def batch_sizes(self, request: VideoRequest) -> list[int]:
        """Batches an engine of every expert serves for this request's size (1 is always possible).
        Image-to-video requests: 1 (diffusers' WanImageToVideoPipeline does not take a batch of images:
        a list is refused, and a tensor batch breaks its latent conditioning, seen with diffusers 0.42)."""
        if request.image is not None:
            return [1]
        latent = latent_size(self.served.config, request.num_frames, request.height, request.width)
        tokens = request.text_tokens if request.text_tokens is not None else 512
        return sorted(set(self.served.batches(latent, tokens)) | {1})

    def plan(self, jobs: list[tuple[str, VideoRequest]]) -> list[list[tuple[str, VideoRequest]]]:
        """Groups of jobs that run as one pipeline call: equal keys, split into batches an engine serves
        (largest first); with batching off, one job per call."""
        if not self.config.batching:
            return [[job] for job in jobs]
        groups: dict[tuple, list[tuple[str, VideoRequest]]] = {}
        for job in jobs:
            groups.setdefault(job[1].group_key(), []).append(job)
        out = []
        for members in groups.values():
            sizes = [b for b in self.batch_sizes(members[0][1]) if self.config.max_batch is None
                     or b <= self.config.max_batch]
            while members:
                take = max(b for b in sizes if b <= len(members))
                out.append(members[:take])
                members = members[take:]
        return out

    def run(self, group: list[tuple[str, VideoRequest]], jobs: "Jobs | Any",
            call: Callable = lambda f, *a, **k: f(*a, **k), notify: Callable | None = None) -> None:
        """One pipeline call for `group`, reporting to `jobs` (a Jobs, or its Ray actor through `call`,
        and `notify` for reports that need no answer, such as each step's progress)."""
        notify = notify or call
        ids = call(jobs.start, [j for j, _ in group], len(group))
        group = [(j, r) for j, r in group if j in ids]
        if not group:
            return
        with self._lock:  # one pipeline call at a time per replica
            self._calls = {}
            first = group[0][1]
            try:
                for front in self.fronts.values():
                    front.set_loras([pair for name in first.loras for pair in self.config.loras[name]])
                last = [time.perf_counter()]

                def on_step(pipe, step, timestep, kwargs):
                    now = time.perf_counter()
                    notify(jobs.progress, ids, step + 1, first.num_inference_steps, now - last[0])
                    last[0] = now
                    if len(call(jobs.cancelled, ids)) == len(ids):
                        pipe._interrupt = True
                    return kwargs

                out = self.pipe(**self._arguments(group), callback_on_step_end=on_step)
                frames = out.frames
                calls = dict(self._calls)
                for i, (job_id, request) in enumerate(group):
                    sample = frames[i]
                    array = sample.float().cpu().numpy() if isinstance(sample, torch.Tensor) else sample
                    if request.output == "frames":
                        import numpy as np

                        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
                    call(jobs.finish, job_id, "succeeded", result=_npy(array), calls=calls)
            except Exception as e:  # the group's jobs fail with one line; the replica goes on
                text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                message = text if isinstance(e, WanBuildError) else f"{type(e).__name__}: {text}"
                for job_id, _ in group:
                    call(jobs.finish, job_id, "failed", error=message, calls=dict(self._calls))

    def _arguments(self, group: list[tuple[str, VideoRequest]]) -> dict[str, Any]:
        first = group[0][1]
        args: dict[str, Any] = dict(height=first.height, width=first.width, num_frames=first.num_frames,
                                    num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                                    output_type="latent" if first.output == "latent" else "np",
                                    generator=[torch.Generator().manual_seed(r.seed) for _, r in group])
        if first.prompt_embeds is not None:
            args["prompt_embeds"] = torch.cat([r.prompt_embeds for _, r in group]).to(self.device)
        else:
            args["prompt"] = [r.prompt for _, r in group]
        if first.negative_prompt_embeds is not None:
            args["negative_prompt_embeds"] = torch.cat([r.negative_prompt_embeds for _, r in group]).to(self.device)
        elif any(r.negative_prompt for _, r in group):
            args["negative_prompt"] = [r.negative_prompt or "" for _, r in group]
        if first.image is not None:
            args["image"] = first.image  # image-to-video jobs run one per call (`batch_sizes`)
        return args


def _npy(array) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes):
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)
