"""`wan-build`: the command line. Each command parses, calls one library function, prints.

A user's mistake (a `WanBuildError`) is printed as one line on stderr with exit code 1; set
WAN_BUILD_DEBUG=1 to see its traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, TypeVar

import typer

from runtime.errors import InputError, WanBuildError

WORKFLOW = """Build fixed-shape engines of the Wan 2.x video transformer, and plan what to build.

\b
The whole workflow, on a tiny model (any machine):
  wan-build init-weights tiny-i2v-a14b --out engines/weights/tiny-i2v-a14b
  wan-build build profiles/tiny.yaml          # engines into engines/tiny
  wan-build list engines/tiny
  wan-build verify engines/tiny --print-digest

\b
Then, in Python:
  from runtime import load_engines
  model = load_engines("engines/tiny", trusted="sha256:...")   # the digest verify printed

Paths on the command line are relative to the current folder; paths inside a profile are
relative to the profile's own folder. WAN_BUILD_DEBUG=1 shows tracebacks of user errors.
"""

app = typer.Typer(
    name="wan-build",
    help=WORKFLOW,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: switches print as `--json`, not `--json <bool>`
)

T = TypeVar("T")


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("wan-build")
        except metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        typer.echo(f"wan-build {version}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version,
                                          is_eager=True)] = False,
) -> None:
    """Build fixed-shape engines of the Wan 2.x video transformer, and plan what to build."""


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except WanBuildError as e:
        if os.environ.get("WAN_BUILD_DEBUG"):
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def plan(
    preset: Annotated[str, typer.Option(help="Model preset, e.g. wan2.2-i2v-a14b (see `wan-build presets`).")],
    frames: Annotated[int | None, typer.Option(help="Video frames (4k+1); default: the model's standard.")] = None,
    height: Annotated[int | None, typer.Option(help="Video height in pixels; default: the model's standard.")] = None,
    width: Annotated[int | None, typer.Option(help="Video width in pixels; default: the model's standard.")] = None,
    batch: Annotated[int, typer.Option(help="Samples per forward (1 per CFG branch in diffusers).")] = 1,
    precision: Annotated[str, typer.Option(help="bf16, fp16, fp32, fp8 or nvfp4, for the memory breakdown.")] = "bf16",
    gpu: Annotated[str | None, typer.Option(help="GPU to check, e.g. h100, rtx4090 (see `wan-build gpus`).")] = None,
    gpu_memory: Annotated[float | None, typer.Option(help="Or just its memory in GB, e.g. 24.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps per video; default: the model's.")] = None,
) -> None:
    """Latent shape, tokens, parameters, memory term by term and FLOPs; with --gpu, what fits on it.

    Example: wan-build plan --preset wan2.2-i2v-a14b --frames 81 --height 480 --width 832 --gpu h100
    """
    from runtime.config import MAX_BATCH, get_preset
    from runtime.precision import PRECISIONS

    from .planning.costs import (best_fit, build_memory_report, costs, custom_gpu, find_gpu, gpu_report,
                                 serving_memory, standard_sizes)
    from .planning.plan import plan as make_plan
    from .planning.plan import weight_bytes

    def go() -> list[str]:
        config = get_preset(preset)
        if precision not in PRECISIONS:
            raise WanBuildError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 1 <= batch <= MAX_BATCH:
            raise WanBuildError(f"--batch {batch} must lie in 1..{MAX_BATCH} (samples per forward; 1 per CFG "
                                "branch in diffusers)")
        if steps is not None and not 1 <= steps <= 10_000:
            raise WanBuildError(f"--steps {steps} must lie in 1..10000 (denoising steps per video)")
        if gpu_memory is not None and not (math.isfinite(gpu_memory) and 0 < gpu_memory <= 100_000):
            raise WanBuildError(f"--gpu-memory {gpu_memory} must be a GPU's memory in GB, e.g. 24")
        f, h, w = standard_sizes(config)[0]
        p = make_plan(config, frames or f, height or h, width or w, batch)
        c = costs(config, p.shape, steps)
        lines = p.lines()
        lines.append(f"per video      {c.per_video:.3g} FLOPs ({c.steps} steps x 2 forwards for CFG)")
        lines.append(f"GPU memory to serve this size in {precision}"
                     + (" (both experts resident)" if config.experts > 1 else "") + ":")
        lines += serving_memory(config, p.shape, precision).lines()
        per_engine = weight_bytes(config, precision) / 1e9
        lines.append(f"engines        each loaded TensorRT or ONNX Runtime engine holds its own {per_engine:.1f} GB copy "
                     "of an expert's weights (on top of the above); AOTInductor, inductor and eager share the model's; "
                     "from_pretrained(max_loaded_engines=N) caps the copies (default 2)")
        lines += build_memory_report(config, p.shape, precision)
        if gpu is None and gpu_memory is None:
            return lines
        if gpu is not None and gpu_memory is not None:
            raise WanBuildError("give --gpu or --gpu-memory, not both")
        card = find_gpu(gpu) if gpu is not None else custom_gpu(gpu_memory)
        lines.append("")
        sizes = standard_sizes(config)
        if (p.video not in sizes):
            sizes = [p.video] + sizes
        lines += gpu_report(config, card, sizes)
        fit = best_fit(config, p.shape, card)
        lines.append(f"verdict: {p.video[0]}x{p.video[1]}x{p.video[2]} batch {batch} on {card.name}: {fit.describe()}")
        if fit.mode == "no":
            smaller = [s for s in sizes if best_fit(config, make_plan(config, *s, batch).shape, card).mode != "no"]
            lines.append("  would fit: " + (", ".join(f"{s[0]}x{s[1]}x{s[2]}" for s in smaller) if smaller else
                                            "no standard size of this model; a GPU with more memory"))
        elif fit.precision != precision and card.supports(precision):
            lines.append(f"  {precision} itself needs more memory than this GPU has in every mode")
        return lines

    typer.echo("\n".join(_run(go)))


@app.command()
def gpus() -> None:
    """List the GPUs the planner knows: memory, compute capability, FP8/INT8/NVFP4, bf16 rate.

    Example: wan-build gpus
    """
    from .planning.costs import gpus as table

    for g in table():
        support = [p for p in ("fp8", "int8", "nvfp4") if g.supports(p)]
        rate = f"{g.bf16_tflops:g} TFLOP/s bf16 (datasheet)" + (
            f", {g.measured_bf16_tflops:g} measured" if g.measured_bf16_tflops else "")
        typer.echo(f"{g.name:14s} {g.memory_gb:5g} GB  cc {g.compute_capability:4s}  {rate:42s} "
                   f"{', '.join(support) or '-'}")


@app.command()
def matrix(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="A markdown table (as in the README).")] = False,
) -> None:
    """Which Wan use cases fit which GPUs, and in what precision.

    Example: wan-build matrix --markdown
    """
    from .planning import matrix as m

    table = m.compute()
    if json_out:
        typer.echo(m.render_json(table))
    else:
        typer.echo("\n".join(m.render_markdown(table) if markdown else m.render_text(table)))


@app.command()
def presets() -> None:
    """List the model presets.

    Example: wan-build presets
    """
    from runtime.config import PRESETS

    from .planning.plan import parameter_count

    for name, c in PRESETS.items():
        kind = ("two experts, " if c.experts > 1 else "") + (
            "CLIP image tokens, " if c.image_dim else "") + ("per-token t, " if c.per_token_timesteps else "")
        typer.echo(f"{name:18s} dim {c.dim:5d} x {c.num_layers:2d} layers, {c.in_channels} -> {c.out_channels} ch, "
                   f"{kind}{parameter_count(c):,} parameters")


lora_app = typer.Typer(help="LoRA files: what one holds and fits, and merging them into a checkpoint.",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(lora_app, name="lora")


def _lora_arg(text: str) -> tuple[str, float]:
    """FILE or FILE:STRENGTH."""
    path, _, tail = text.rpartition(":")
    if path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


@lora_app.command("inspect")
def lora_inspect(
    file: Annotated[Path, typer.Argument(help="A LoRA .safetensors file (diffusers/PEFT, original Wan or musubi).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Layout, rank, alpha, targeted layers, and which presets the LoRA fits.

    Example: wan-build lora inspect lightx2v_distill_rank64.safetensors
    """
    from .lora_tools import describe_inspection, inspect_lora

    info = _run(lambda: inspect_lora(file))
    typer.echo(json.dumps(info, indent=2) if as_json else "\n".join(describe_inspection(info)))


@lora_app.command("merge")
def lora_merge(
    weights: Annotated[Path, typer.Argument(help="The checkpoint: a transformer folder or a .safetensors file.")],
    lora: Annotated[list[str], typer.Option("--lora", help="FILE or FILE:STRENGTH; repeat for several.")],
    out: Annotated[Path, typer.Option(help="Folder for the merged transformer (diffusers layout).")],
    subfolder: Annotated[str | None, typer.Option(help="transformer or transformer_2 of a pipeline folder.")] = None,
) -> None:
    """Merge LoRAs into a checkpoint, for tools that cannot merge them (and for engines whose numbers
    depend on the weights, such as calibrated FP8).

    Example: wan-build lora merge ckpt/transformer --lora style.safetensors:0.8 --out merged/transformer
    """
    from .lora_tools import merge_loras_into

    folder = _run(lambda: merge_loras_into(weights, [_lora_arg(x) for x in lora], out, subfolder, echo=typer.echo))
    typer.echo(f"wrote {folder}")


@app.command("gguf")
def gguf_write(
    weights: Annotated[Path, typer.Argument(help="The checkpoint: a transformer folder or a .safetensors file.")],
    type_: Annotated[str, typer.Option("--type", help="Q8_0, Q5_1, Q5_0, Q4_1 or Q4_0.")],
    out: Annotated[Path, typer.Option(help="The .gguf file to write.")],
    subfolder: Annotated[str | None, typer.Option(help="transformer or transformer_2 of a pipeline folder.")] = None,
) -> None:
    """Write a checkpoint as a GGUF file (original Wan key layout, as community files): the blocks'
    linear weights in --type, norms, biases, modulation and embeddings kept in F32.

    Example: wan-build gguf ckpt/transformer --type Q8_0 --out wan2.1-t2v-14b-Q8_0.gguf
    """
    from .gguf_tools import write_gguf

    counts = _run(lambda: write_gguf(weights, type_, out, subfolder, echo=typer.echo))
    typer.echo(f"wrote {out} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))} tensors)")


@app.command("init-weights")
def init_weights(
    preset: Annotated[str, typer.Argument(help="Model preset, e.g. tiny-i2v-a14b.")],
    out: Annotated[Path, typer.Option(help="Folder to write (diffusers layout).")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same weights.")] = 0,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
) -> None:
    """Write seeded random weights of a preset in diffusers layout (for demos and CI).

    Two-expert presets get `transformer/` (high noise) and `transformer_2/` (low noise). --out is
    relative to the current folder; this one is where profiles/tiny.yaml looks.

    Example: wan-build init-weights tiny-i2v-a14b --out engines/weights/tiny-i2v-a14b
    """
    import torch

    from runtime.config import get_preset

    from .init_weights import init_weights as write

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def go() -> list[Path]:
        if dtype not in dtypes:
            raise WanBuildError(f"--dtype {dtype!r} is not one of {', '.join(dtypes)}")
        if out.exists() and not out.is_dir():
            raise WanBuildError(f"--out {out} is a file; give a folder to write the weights into")
        return write(get_preset(preset), out, seed, dtypes[dtype])

    for folder in _run(go):
        typer.echo(f"wrote {folder}")


@app.command()
def build(
    profile: Annotated[Path, typer.Argument(help="Profile YAML, e.g. profiles/tiny.yaml (relative to the current "
                                                 "folder; paths inside it are relative to the profile).")],
    out: Annotated[Path | None, typer.Option(help="Engine folder (default: engines/<profile name>, relative to "
                                                  "the current folder).")] = None,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help=(
        "Keep engines that fail their parity check (marked in the manifest; the runtime refuses them unless "
        "asked)."))] = False,
    rebuild_manifest: Annotated[bool, typer.Option("--rebuild-manifest", help=(
        "When manifest.json is unreadable or of another format, move it aside and rebuild it from the entry "
        "folders (each entry's files are checked); also recovers entry folders the manifest does not list."))] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON (progress goes to stderr).")] = False,
    ray: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help=(
        "Build the entries as tasks on a Ray cluster: 'local' (started here), 'auto' (the cluster this "
        "machine joined with `ray start`) or the head's HOST:PORT. Needs wan-build[ray] on every node and "
        "the weights at the same path there."))] = None,
    retries: Annotated[int, typer.Option(help="With --ray: submit an entry again this many times when its "
                                              "worker dies.")] = 1,
    cpus_per_entry: Annotated[int, typer.Option(help="With --ray: CPUs each CPU-built entry asks for.")] = 1,
) -> None:
    """Build every (expert x shape x precision x backend) engine of a profile.

    Entries already built and still valid are kept; each finished entry is recorded at once, so an
    interrupted build resumes. Progress says which entry, which stage and about how long is left.
    Exit 1 if any entry failed.

    Example: wan-build build profiles/tiny.yaml --out engines/tiny
    Example: wan-build build profiles/wan2.2-i2v-a14b-720p.yaml --ray auto
    """
    from .build import build as run_build
    from .profiles import load_profile

    echo = (lambda line: typer.echo(line, err=True)) if json_out else typer.echo
    report = _run(lambda: run_build(load_profile(profile), out, allow_mismatch=allow_mismatch,
                                    rebuild_manifest=rebuild_manifest, echo=echo, ray=ray, retries=retries,
                                    cpus_per_entry=cpus_per_entry))
    if json_out:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        typer.echo("")
        typer.echo("\n".join(report.table()))
        typer.echo(f"{report.folder}: " + ", ".join(f"{n} {s}" for s, n in report.counts().items()))
    if report.failed:
        raise typer.Exit(1)


@app.command()
def serve(
    target: Annotated[Path, typer.Argument(help="Engine folder, or a profile YAML (its folder: engines/<name>).")],
    ray: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help=(
        "The Ray cluster to deploy on: 'auto' or the head's HOST:PORT; default: a cluster started here."))] = None,
    replicas: Annotated[int, typer.Option(help="Pipeline replicas (one per GPU on a GPU cluster).")] = 1,
    pipeline: Annotated[str, typer.Option(help=(
        "A diffusers Wan pipeline folder (its VAE, text encoder, scheduler; the transformer comes from the "
        "engines), or 'tiny' (a random tiny VAE, prompt embeddings only; tiny test models)."))] = "tiny",
    host: Annotated[str, typer.Option(help="HTTP address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    gpus_per_replica: Annotated[float | None, typer.Option(help="GPUs each replica takes (default: 1 where "
                                                                "the cluster has GPUs, else 0).")] = None,
    cpus_per_replica: Annotated[float, typer.Option(help="CPUs each replica takes.")] = 1.0,
    eager: Annotated[bool, typer.Option("--eager/--no-eager", help=(
        "Serve sizes no engine was built for in eager PyTorch (the response says so), or refuse them."))] = True,
    batching: Annotated[bool, typer.Option("--batching/--no-batching", help=(
        "Group requests of one size and settings into one batched call where an engine of that batch "
        "exists."))] = True,
    max_batch: Annotated[int | None, typer.Option(help="Largest batch (default: the largest engine batch).")] = None,
    max_eager_tokens: Annotated[int | None, typer.Option(help=(
        "Largest size, in video tokens, served eager (default: the largest engine size)."))] = None,
    batch_wait: Annotated[float, typer.Option(help="Seconds a replica's first call waits for others to batch "
                                                   "with.")] = 0.02,
    queue: Annotated[int, typer.Option(help="Accepted jobs waiting beyond those running; more get 429.")] = 16,
    lora: Annotated[list[str] | None, typer.Option(help=(
        "A LoRA requests may name: NAME=FILE[:STRENGTH] (repeat a NAME to stack files).") )] = None,
    cache: Annotated[str | None, typer.Option(help="Step caching: fbc or fbc:THRESHOLD (First Block Cache).")] = None,
) -> None:
    """Serve a Wan pipeline on its engines over HTTP, on Ray Serve (POST /v1/videos).

    Jobs: POST /v1/videos, GET /v1/videos/{id} (status, progress), GET /v1/videos/{id}/content,
    POST /v1/videos/{id}/cancel; GET /health and /metrics. Runs until interrupted.

    Example: wan-build serve engines/wan22-t2v --pipeline ckpt/Wan2.2-T2V-A14B-Diffusers --replicas 8 --ray auto
    """
    import time

    from runtime.service import ServiceConfig

    def start() -> tuple[str, object]:
        from runtime import serving

        folder = target
        if target.suffix in (".yaml", ".yml"):
            from .profiles import load_profile

            folder = Path("engines") / load_profile(target, check_weights=False).name
        loras: dict[str, list[tuple[str, float]]] = {}
        for item in lora or []:
            name, sep, spec = item.partition("=")
            path, _, strength = spec.rpartition(":") if ":" in spec else (spec, "", "1")
            try:
                value = float(strength)
            except ValueError:
                value = None
            if not sep or not name or not path or value is None:
                raise InputError(f"--lora {item!r}: give NAME=FILE or NAME=FILE:STRENGTH")
            if not Path(path).is_file():
                raise InputError(f"--lora {item!r}: {path} is not a file")
            loras.setdefault(name, []).append((path, value))
        gpus = gpus_per_replica
        config = ServiceConfig(folder, pipeline=pipeline, replicas=replicas,
                               gpus_per_replica=gpus if gpus is not None else -1.0, cpus_per_replica=cpus_per_replica,
                               allow_eager=eager, max_eager_tokens=max_eager_tokens, batching=batching,
                               max_batch=max_batch, batch_wait_s=batch_wait,
                               queue=queue, loras={k: tuple(v) for k, v in loras.items()}, cache=cache)
        return serving.start(config, ray, host, port), serving

    import signal

    url, serving = _run(start)
    typer.echo(f"serving on {url} (POST {url}/v1/videos; GET {url}/health); Ctrl-C stops it")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # a service manager's stop: shut down as on Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import threading

        typer.echo("stopping the service")
        # bounded: when the signal reached the whole process group, Ray's own processes may be gone already
        stopper = threading.Thread(target=serving.stop, kwargs={"shutdown": True}, daemon=True)
        stopper.start()
        stopper.join(30)
        if stopper.is_alive():
            typer.echo("Ray did not answer within 30 s; exiting without it", err=True)
            os._exit(1)


@app.command("list")
def list_(
    folder: Annotated[Path, typer.Argument(help="Engine folder, e.g. engines/tiny.")],
) -> None:
    """List the engines of a folder: expert, shape, backend, precision, size, parity.

    Reads the manifest only; nothing is loaded.

    Example: wan-build list engines/tiny
    """
    from .catalog import list_entries, require_folder

    typer.echo("\n".join(_run(lambda: list_entries(require_folder(folder)))))


@app.command()
def verify(
    folder: Annotated[Path, typer.Argument(help="Engine folder, e.g. engines/tiny.")],
    print_digest: Annotated[bool, typer.Option("--print-digest", help=(
        "After a passing verification, print only the manifest's digest (sha256:...) to pin with "
        "load_engines(folder, trusted=...)."))] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Re-hash every engine file in full, then LOAD AND RUN every engine against eager PyTorch.

    An engine folder is code (AOTInductor packages are shared libraries, TensorRT plans can carry
    plugins): verify loads only entries whose files match the manifest's sha256, from the bytes it
    checked, and needs the weights the manifest names. Exit 1 if any engine fails.

    Example: wan-build verify engines/tiny --print-digest
    """
    from .catalog import require_folder, verify as run_verify, verify_table

    result = _run(lambda: run_verify(require_folder(folder), echo=lambda s: None))
    if json_out:
        typer.echo(json.dumps({"folder": str(folder), "digest": result.digest, "passed": result.passed,
                               "hashed": {"files": result.hashed.files, "bytes": result.hashed.bytes,
                                          "seconds": round(result.hashed.seconds, 3)},
                               "entries": [{"id": r.id, "status": r.status, "detail": r.detail}
                                           for r in result.results]}, indent=2))
    elif print_digest and result.passed:
        typer.echo(result.digest)
    else:
        typer.echo("\n".join(verify_table(result.results)))
        typer.echo(f"checked: {result.hashed.describe()}")
        if result.passed:
            typer.echo(f"manifest digest: {result.digest} (pin it: load_engines(folder, trusted=...))")
    if not result.passed:
        if print_digest:
            typer.echo("error: verification failed; no digest printed (run without --print-digest for the "
                       "table)", err=True)
        raise typer.Exit(1)


@app.command()
def doctor() -> None:
    """This machine: GPU and compute capability, torch and CUDA, TensorRT, ONNX Runtime providers,
    Model Optimizer, and which backends and precisions it can build and run.

    Example: wan-build doctor
    """
    from .doctor import report

    typer.echo("\n".join(report()))


@app.command()
def wizard(
    use_case: Annotated[str | None, typer.Option(help="Use case name or number (see `wan-build matrix`).")] = None,
    gpu: Annotated[str | None, typer.Option(help="GPU name (e.g. h100) or memory in GB (e.g. 24).")] = None,
    resolutions: Annotated[str | None, typer.Option(help="Comma-separated: 480p, 720p (704p for TI2V-5B).")] = None,
    orientations: Annotated[str | None, typer.Option(help="landscape, portrait or both.")] = None,
    batch: Annotated[int | None, typer.Option(help="1 for diffusers pipelines, 2 if you batch the CFG pair.")] = None,
    precision: Annotated[str | None, typer.Option(help="bf16, fp8 or nvfp4 (default: the best that fits).")] = None,
    backends: Annotated[str | None, typer.Option(help="Comma-separated: tensorrt, aoti, onnxruntime.")] = None,
    weights: Annotated[str | None, typer.Option(help="Checkpoint folder (relative to the profile).")] = None,
    name: Annotated[str | None, typer.Option(help="Profile name (names the engine folder).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the profile YAML.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Take the default for every question not given.")] = False,
) -> None:
    """Answer a few questions (or pass flags), see the plan, get a valid profile YAML.

    Example: wan-build wizard --use-case "Wan2.2 I2V 480p" --gpu h100 --yes
    """
    from .planning.wizard import Answers, run_wizard

    def ask(question: str, default: str) -> str:
        return default if yes else typer.prompt(question, default=default)

    answers = Answers(use_case, gpu, resolutions, orientations, batch, precision, backends, weights, name, out)
    _run(lambda: run_wizard(answers, ask, typer.echo))


@app.command()
def demo(
    profile: Annotated[Path, typer.Option(help="The tiny profile to build.")] = Path("profiles/tiny.yaml"),
) -> None:
    """The main job on a tiny built-in model, on the CPU: weights, engines, routed calls.

    Example: wan-build demo
    """
    from .demo import run_demo

    _run(lambda: run_demo(profile, echo=typer.echo))


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
