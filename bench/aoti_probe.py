"""Which AOTInductor package form loads on this machine's torch/CUDA? Each form runs in its own
process, so a crash in one does not hide the others.

    python bench/aoti_probe.py [--forms embedded,user-managed,copied,on-disk] [--device cuda|cpu]
"""

import argparse
import subprocess
import sys
import textwrap

CODE = textwrap.dedent("""
    import sys, tempfile, torch
    form, device = sys.argv[1], sys.argv[2]
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).to(device).eval()
    x = torch.randn(8, 64, device=device)
    cfg = {} if form == "embedded" else {"aot_inductor.package_constants_in_so": False}
    if form == "on-disk":
        cfg["aot_inductor.package_constants_on_disk_format"] = "binary_blob"
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=tempfile.mkdtemp() + "/p.pt2",
                                                        inductor_configs=cfg)
    print("compiled", flush=True)
    runner = torch._inductor.aoti_load_package(path)
    print("loaded", flush=True)
    if form != "embedded":
        c = dict(m.state_dict())
        runner.load_constants({n: c[n] for n in runner.get_constant_fqns()}, check_full_update=True,
                              user_managed=form == "user-managed")
    out = runner(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    print("ok", ((out - m(x)).norm() / m(x).norm()).item(), flush=True)
""")

parser = argparse.ArgumentParser()
parser.add_argument("--forms", default="embedded,user-managed,copied,on-disk")
parser.add_argument("--device", default="cuda")
args = parser.parse_args()
for form in args.forms.split(","):
    r = subprocess.run([sys.executable, "-c", CODE, form, args.device], capture_output=True, text=True, timeout=300)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"aoti probe {form:13s}: exit {r.returncode}, last line: {last}", flush=True)
