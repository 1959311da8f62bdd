"""Why does an AOTInductor package crash at load on a GPU image? One line per variant.

Each variant runs in processes of its own (a crash in one hides nothing else), with faulthandler on
and TORCH_SHOW_CPP_STACKTRACES=1, and prints a marker after every stage, so the line says which
call crashed and how (exit code or signal), with the last lines of the crash's stack.

Variants (the model is a small MLP, then, with --wan, a tiny Wan static model):
  form          embedded (weights in the .so), user-managed (ours: weights handed in, not copied),
                copied (handed in, copied), on-disk (weights beside the .so in the package)
  loader        torch._inductor.aoti_load_package, or the package loader class directly
  process       load in the compiling process, or in a fresh one
  cuda-first    the CUDA context created before the load
  options       no package (.so only, torch._export.aot_load), emit_multi_arch_kernel, embed_kernel_binary
  cpu           the same on the CPU of this machine (is it CUDA or the image?)

    python bench/aoti_probe.py --device cuda [--wan] [--json out.json]
    python bench/aoti_probe.py --device cpu --quick        # what the test runs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One stage per marker: compiled, loaded, constants, ran <rel>.
CHILD = textwrap.dedent("""
    import faulthandler, json, os, sys
    faulthandler.enable()
    import torch
    spec = json.loads(sys.argv[1])
    device, form, stage = spec["device"], spec["form"], spec["stage"]
    torch.manual_seed(0)
    if spec["wan"]:
        sys.path.insert(0, spec["root"])
        from runtime import StaticShape, StaticWanTransformer, get_preset
        c = get_preset("tiny-t2v")
        m = StaticWanTransformer(c, StaticShape(1, 2, 4, 6, 8)).eval().to(device)
        args = m.example_inputs(1)
        constants = m.constants()
    else:
        m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).to(device).eval()
        args = (torch.randn(8, 64, device=device),)
        constants = dict(m.state_dict())
    if spec.get("cuda_first") and device == "cuda":
        torch.empty(1, device="cuda"); torch.cuda.synchronize(); print("cuda context", flush=True)
    path = spec["path"]
    if stage in ("compile", "both"):
        cfg = {} if form == "embedded" else {"aot_inductor.package_constants_in_so": False}
        if form == "on-disk":
            cfg = {"aot_inductor.package_constants_in_so": False,
                   "aot_inductor.package_constants_on_disk_format": "binary_blob"}
        cfg.update(spec.get("options", {}))
        with torch.no_grad():
            ep = torch.export.export(m, args)
            if spec.get("so_only"):
                path = torch._inductor.aot_compile(ep.module(), args, options={**cfg, "aot_inductor.package": False})
                json.dump({"path": path}, open(spec["path"] + ".json", "w"))
            else:
                torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=cfg)
        print("compiled", flush=True)
    if stage in ("load", "both"):
        if spec.get("so_only"):
            path = json.load(open(spec["path"] + ".json"))["path"]
            runner = torch._export.aot_load(path, device)
            run = runner
        elif spec.get("loader") == "class":
            index = 0 if device == "cuda" else -1
            loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, index)
            print("loaded", flush=True)
            names = loader.get_constant_fqns()
            if form != "embedded":
                loader.load_constants({n: constants[n] for n in names}, False, True, form == "user-managed")
            print("constants", flush=True)
            run = lambda *a: loader.run(list(a))
        else:
            runner = torch._inductor.aoti_load_package(path)
            print("loaded", flush=True)
            if form != "embedded":
                runner.load_constants({n: constants[n] for n in runner.get_constant_fqns()}, check_full_update=True,
                                      user_managed=form == "user-managed")
            print("constants", flush=True)
            run = runner
        with torch.no_grad():
            out = run(*args)
            out = out[0] if isinstance(out, (list, tuple)) else out
            ref = m(*args)
        print("ran", ((out.float() - ref.float()).norm() / ref.float().norm()).item(), flush=True)
""")


FORMS = ("embedded", "user-managed", "copied", "on-disk")


def variants(device: str, quick: bool) -> list[dict]:
    out = [{"name": f"form={f}", "form": f} for f in FORMS]
    out += [{"name": "loader=class", "form": "user-managed", "loader": "class"},
            {"name": "process=fresh", "form": "user-managed", "fresh": True},
            {"name": "options=so-only", "form": "embedded", "so_only": True}]
    if device == "cuda":
        out += [{"name": "cuda-first", "form": "user-managed", "cuda_first": True},
                {"name": "options=multi-arch", "form": "user-managed",
                 "options": {"aot_inductor.emit_multi_arch_kernel": True}},
                {"name": "options=embed-kernels", "form": "user-managed",
                 "options": {"aot_inductor.embed_kernel_binary": True}}]
    return out[:2] + out[-1:] if quick else out


def run_child(spec: dict, timeout: float) -> tuple[int, str, str]:
    env = {**os.environ, "TORCH_SHOW_CPP_STACKTRACES": "1", "PYTHONFAULTHANDLER": "1"}
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return -1, "", "timed out"
    return r.returncode, r.stdout, r.stderr


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def probe(spec: dict, timeout: float) -> dict:
    """Compile and load one variant; returns the stage reached and, on a crash, the stack's tail."""
    spec = {**spec}
    stages = []
    if spec.get("fresh"):
        steps = [("compile", spec), ("load", spec)]
    else:
        steps = [("both", spec)]
    result = {"name": spec["name"]}
    for stage, s in steps:
        code, out, err = run_child({**s, "stage": stage}, timeout)
        stages += [line.split()[0] for line in out.splitlines() if line.strip()]
        ran = [line for line in out.splitlines() if line.startswith("ran ")]
        if ran:
            result["relative_error"] = float(ran[-1].split()[1])
        if code != 0:
            stack = [line for line in err.strip().splitlines() if line.strip()][-12:]
            result.update(status=describe_exit(code), after=stages[-1] if stages else "start", stack=stack)
            return result
    result.update(status="ok", after=stages[-1] if stages else "start")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--wan", action="store_true", help="also probe a tiny Wan static model")
    parser.add_argument("--quick", action="store_true", help="three variants only (the test)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per child process")
    parser.add_argument("--forms", help="comma-separated package forms: only their plain variants, on --device only"
                        " (the benchmark's pre-flight check)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    forms = set(args.forms.split(",")) if args.forms else None
    unknown = (forms or set()) - set(FORMS)
    if unknown:
        parser.error(f"--forms: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FORMS)}")
    import torch

    print(f"aoti probe: torch {torch.__version__}, CUDA {torch.version.cuda}, device {args.device}", flush=True)
    devices = [args.device] + (["cpu"] if args.device == "cuda" and not forms else [])
    results = []
    for device in devices:
        for model in (False, True) if args.wan else (False,):
            chosen = variants(device, args.quick or device != args.device)
            if forms:
                chosen = [v for v in variants(device, False) if v["name"] in {f"form={f}" for f in forms}]
            for v in chosen:
                folder = tempfile.mkdtemp(prefix="aoti-probe-")
                spec = {**v, "device": device, "wan": model, "root": str(ROOT), "path": f"{folder}/p.pt2",
                        "name": f"{device} {'wan' if model else 'mlp'} {v['name']}"}
                r = probe(spec, args.timeout)
                results.append(r)
                err = f" rel {r['relative_error']:.1e}" if "relative_error" in r else ""
                crash = "" if r["status"] == "ok" else f" | {' / '.join(r['stack'][-3:])[:300]}"
                print(f"aoti probe {r['name']:40s} {r['status']:8s} after {r['after']}{err}{crash}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
