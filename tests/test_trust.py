"""Engines as an adversary meets them: odd input layouts, bit rot, damaged stores, bad records, lost
manifests, dtype and device moves, full disks, hostile folders, pinned digests, planted links.

Every engine answer is compared with the eager model (itself checked against diffusers elsewhere);
every fault must end in a refusal with its reason, a one-line error, or a clean rebuild, never in a
wrong answer, lost work or code run from a file that failed its check.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import builder.build.folder as folder_module
from builder.build import build
from builder.catalog import verify
from builder.init_weights import init_weights
from builder.profiles import load_profile
from runtime import WanTransformer, get_preset, load_engines
from runtime.backends import Engine
from runtime.integrity import sha256_file
from runtime.manifest import EngineError, ManifestError

from .conftest import cpu_statuses, make_entry, relative_error

CONFIG = get_preset("tiny-t2v")
LATENT = (2, 4, 6)  # 5 frames x 32 x 48 pixels
TEXT = 16


def profile_text(name="trust", precision="[fp32, fp16]", backends="[onnxruntime, aoti]", batch=2, height=32):
    return (f"name: {name}\nmodel: {{weights: w}}\nprecision: {precision}\nbackends: {backends}\n"
            f"shapes:\n  - {{batch: {batch}, frames: 5, height: {height}, width: 48}}\ntext_tokens: {TEXT}\n"
            "device: cpu\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tiny-t2v, batch 2 (a CFG pair batched), fp32 and fp16, both CPU backends."""
    root = tmp_path_factory.mktemp("trust")
    init_weights(CONFIG, root / "w", seed=11)
    (root / "p.yaml").write_text(profile_text())
    report = build(load_profile(root / "p.yaml"), root / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == cpu_statuses(report), report.table()
    return root


def copy(built: Path, tmp_path: Path) -> Path:
    shutil.copytree(built / "out", tmp_path / "out")
    return tmp_path / "out"


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def entry_of(folder: Path, backend: str, precision: str = "fp32") -> dict:
    return next(e for e in manifest_of(folder)["entries"].values()
                if e["backend"] == backend and e["precision"] == precision)


def inputs(seed=0, batch=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CONFIG.in_channels, *LATENT, generator=g).to(dtype)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, TEXT, CONFIG.text_dim, generator=g).to(dtype)
    return x, t, ctx


def eager(built: Path, *args, dtype=torch.float32):
    with torch.no_grad():
        return WanTransformer.from_pretrained(built / "w", dtype)(*args).sample


def flip_byte_keep_time(path: Path, offset: int | None = None) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def spy_loads(monkeypatch) -> list[str]:
    """sha256 of every AOTInductor package this process loads from now on (loads still happen): at
    torch's package loader class, which every way of loading a package goes through."""
    loaded = []
    real = torch._C._aoti.AOTIModelPackageLoader

    def spy(path, *args):
        loaded.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        return real(path, *args)
    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", spy)
    return loaded


# -- 1. every input layout, every backend ---------------------------------------------------------------
def _views(x, t, ctx):
    """(name, call arguments): the same values as (x, t, ctx) in the layouts real callers produce."""
    other = lambda v, *perm: v.permute(*perm).contiguous().permute(*perm)  # noqa: E731 - same values, other strides
    bigger = lambda v: torch.cat([torch.zeros_like(v[:1]), v])[1:]  # noqa: E731 - a view at an offset
    return [
        ("hidden_states transposed", (other(x, 0, 1, 2, 4, 3), t, ctx)),
        ("hidden_states sliced", (torch.stack([x, x], -1)[..., 0], t, ctx)),
        ("hidden_states offset", (bigger(x), t, ctx)),
        ("context transposed", (x, t, other(ctx, 0, 2, 1))),
        ("context sliced", (x, t, torch.stack([ctx, ctx], 1)[:, 0])),
        ("context expanded", (x, t, ctx[:1].expand(2, -1, -1))),
        ("hidden_states expanded", (x[:1].expand(2, -1, -1, -1, -1), t, ctx)),
        ("timestep scalar", (x, float(t[0]), ctx)),
        ("timestep [1]", (x, t[:1], ctx)),
        ("timestep 0-d tensor", (x, t[0], ctx)),
        ("timestep expanded", (x, t[:1].expand(2), ctx)),
        ("timestep strided", (x, torch.stack([t, t], 1)[:, 1], ctx)),
    ]


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_every_input_layout_gives_the_eager_answer(built, backend):
    """The AOTInductor engine computed on the wrong elements for expanded, transposed and sliced inputs
    (relative error 0.06-1.2) while saying it was built for the shape."""
    model = WanTransformer.from_pretrained(built / "w", engines=built / "out", backends=[backend])
    x, t, ctx = inputs(seed=1)
    for name, args in _views(x, t, ctx):
        with torch.no_grad():
            out = model(*args).sample
        assert model.last_route.backend == backend, (name, model.last_route)
        contiguous = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        if isinstance(contiguous[1], float) or contiguous[1].numel() == 1:
            contiguous = (contiguous[0], torch.full((2,), float(torch.as_tensor(args[1]).reshape(-1)[0])),
                          contiguous[2])
        assert relative_error(out, eager(built, *contiguous)) < 1e-5, name


def test_engines_receive_fresh_contiguous_aligned_tensors():
    """What every backend (TensorRT included, which reads raw pointers) is handed by the Engine base."""
    from runtime.static import StaticShape

    seen = []

    class Recorder(Engine):
        def run(self, *inputs):
            seen.extend(inputs)
            return inputs[0]

    shape = StaticShape(2, *LATENT, TEXT)
    engine = Recorder(make_entry(CONFIG, shape, "tensorrt"), torch.device("cpu"))
    x, t, ctx = inputs()
    for name, (a, b, c) in _views(x, t, ctx):
        b = torch.as_tensor(b).reshape(-1).expand(2) if not isinstance(b, torch.Tensor) or b.numel() == 1 else b
        seen.clear()
        engine(a, b, c)
        for given, got in zip((a, b, c), seen):
            assert got.is_contiguous() and got.stride() == torch.empty(got.shape).stride(), name
            assert got.data_ptr() % 64 == 0 and torch.equal(got, given), name
    with pytest.raises(ValueError, match="the engine was built for"):
        engine(x[:1], t[:1], ctx[:1])


# -- 2. bit rot and files changed in place ------------------------------------------------------------
@pytest.mark.parametrize("backend,name", [("aoti", "engine.pt2"), ("onnxruntime", "model.onnx.data")])
def test_a_byte_flipped_with_its_time_kept_is_refused(built, tmp_path, backend, name):
    folder = copy(built, tmp_path)
    entry = entry_of(folder, backend)
    flip_byte_keep_time(folder / entry["id"] / name)
    model = WanTransformer.from_pretrained(built / "w", engines=folder, backends=[backend])
    x, t, ctx = inputs(seed=2)
    with torch.no_grad():
        out = model(x, t, ctx).sample
    assert model.last_route.backend == "eager" and "fails its sha256 check" in model.last_route.reason
    assert relative_error(out, eager(built, x, t, ctx)) == 0  # the same eager model, the same memory
    assert model.engines.verification.files >= 1 and model.engines.verification.seconds >= 0
    status = next(r for r in verify(folder, echo=lambda s: None).results if r.id == entry["id"])
    assert status.status == "failed" and "sha256" in status.detail


def test_weights_changed_in_place_get_a_new_fingerprint(built, tmp_path):
    """The checkpoint edited in place with its time kept: it is seen as other weights (a new
    fingerprint), so only entries that take the model's weights serve it, on the changed weights,
    equal to eager on them (an engine holding the old weights would answer for those)."""
    shutil.copytree(built / "w", tmp_path / "w")
    file = tmp_path / "w" / "diffusion_pytorch_model.safetensors"
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    before = WanTransformer.from_pretrained(tmp_path / "w", engines=built / "out")
    flip_byte_keep_time(file, header + 100)  # inside the first tensor's data
    after = WanTransformer.from_pretrained(tmp_path / "w", engines=built / "out")
    x, t, ctx = inputs(seed=3)
    with torch.no_grad():
        before(x, t, ctx)
        out = after(x, t, ctx).sample
    assert before.last_route.backend != "eager"
    assert before.engines.own_weights and not after.engines.own_weights
    assert after.last_route.backend != "eager" and "another checkpoint" in after.last_route.reason
    with torch.no_grad():
        assert relative_error(out, WanTransformer.from_pretrained(tmp_path / "w")(x, t, ctx).sample) < 1e-5


def test_a_file_copied_over_another_is_hashed_anew(tmp_path):
    """rm + cp -a: same size, same time, maybe the same inode number; the digest is the new file's."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"A" * 4096)
    b.write_bytes(b"B" * 4096)
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    assert sha256_file(a) == hashlib.sha256(b"A" * 4096).hexdigest()
    a.unlink()
    subprocess.run(["cp", "-a", str(b), str(a)], check=True)
    assert sha256_file(a) == hashlib.sha256(b"B" * 4096).hexdigest()


# -- 3. the shared weights store ---------------------------------------------------------------------------
def test_a_damaged_stored_weights_file_is_replaced_not_linked(built, tmp_path):
    """A new entry of the same weights would link the stored copy; a damaged one is replaced first."""
    folder = copy(built, tmp_path)
    digest = entry_of(folder, "onnxruntime")["files"]["model.onnx.data"]["sha256"]  # the fp32 weights
    store = folder / ".weights" / f"{digest}.onnx.data"
    flip_byte_keep_time(store, store.stat().st_size - 3)  # a low byte of the last weight: parity would pass
    (tmp_path / "p.yaml").write_text(profile_text(precision="fp32", backends="onnxruntime", height=48))
    shutil.copytree(built / "w", tmp_path / "w")
    lines = []
    report = build(load_profile(tmp_path / "p.yaml"), folder, echo=lines.append)
    assert [r.status for r in report.results] == ["built"], report.table()
    assert any("are damaged" in line and "replacing them" in line for line in lines), "\n".join(lines)
    assert hashlib.sha256(store.read_bytes()).hexdigest() == digest  # the store holds the true bytes again
    entry = manifest_of(folder)["entries"][report.results[0].entry.id]
    assert entry["files"]["model.onnx.data"]["sha256"] == digest
    assert (folder / entry["id"] / "model.onnx.data").stat().st_ino == store.stat().st_ino


# -- 4. what the manifest says about quality ------------------------------------------------------------
def _rewrite(folder: Path, edit) -> None:
    manifest = manifest_of(folder)
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_mismatched_entry_is_refused_unless_asked_for(built, tmp_path, caplog):
    folder = copy(built, tmp_path)
    eid = entry_of(folder, "aoti")["id"]

    def mismatch(m):
        m["entries"][eid]["allow_mismatch"] = True
        m["entries"][eid]["parity"].update(relative=0.3, passed=False)
    _rewrite(folder, mismatch)
    x, t, ctx = inputs(seed=4)
    model = WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"])
    with torch.no_grad():
        model(x, t, ctx)
    assert model.last_route.backend == "eager" and "failed its parity check at build" in model.last_route.reason
    opted = WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"], allow_mismatch=True)
    with torch.no_grad():
        opted(x, t, ctx)
    assert opted.last_route.backend == "aoti" and "SERVED DESPITE FAILED PARITY (rel 3.00e-01" in opted.last_route.reason
    assert "although it failed its parity check at build (rel 3.00e-01" in caplog.text


def test_an_entry_listing_no_files_is_refused(built, tmp_path, monkeypatch):
    folder = copy(built, tmp_path)
    entry = entry_of(folder, "aoti")
    package = entry["files"]["engine.pt2"]["sha256"]
    _rewrite(folder, lambda m: m["entries"][entry["id"]].update(files={}))
    loads = spy_loads(monkeypatch)
    model = WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"])
    with torch.no_grad():
        model(*inputs())
    assert model.last_route.backend == "eager" and "lists no engine.pt2" in model.last_route.reason
    result = next(r for r in verify(folder, echo=lambda s: None).results if r.id == entry["id"])
    assert result.status == "failed" and "lists no engine.pt2" in result.detail
    assert package not in loads


# -- 5. a manifest that cannot be read is never replaced -------------------------------------------------
@pytest.mark.parametrize("damage,message", [
    (b"{ not json", "not valid JSON"),
    (json.dumps({"format": 99, "entries": {}}).encode(), "written by a newer wan-build (manifest format 99"),
    (json.dumps({"format": 2, "experts": {}, "entries": [1, 2]}).encode(), "entries must be a JSON object"),
])
def test_an_unreadable_manifest_stops_the_build_and_can_be_rebuilt(built, tmp_path, damage, message):
    folder = copy(built, tmp_path)
    shutil.copytree(built / "w", tmp_path / "w")
    before = set(manifest_of(folder)["entries"])
    (folder / "manifest.json").write_bytes(damage)
    # another shape than the folder's entries: without --rebuild-manifest they would vanish from it
    (tmp_path / "p.yaml").write_text(profile_text(precision="fp32", backends="onnxruntime", height=48))
    profile = load_profile(tmp_path / "p.yaml")
    with pytest.raises(ManifestError, match=f"{re.escape(message)}.*--rebuild-manifest"):
        build(profile, folder, echo=lambda s: None)
    assert (folder / "manifest.json").read_bytes() == damage
    lines = []
    report = build(profile, folder, rebuild_manifest=True, echo=lines.append)
    assert [r.status for r in report.results] == ["built"]
    after = set(manifest_of(folder)["entries"])
    assert before < after and len(after) == len(before) + 1  # nothing lost, the new entry added
    assert list(folder.glob("manifest.json.unreadable-*"))[0].read_bytes() == damage
    assert sum("recovered entry" in line for line in lines) == len(before)


def test_entries_of_other_shapes_survive_a_build(built, tmp_path):
    folder = copy(built, tmp_path)
    shutil.copytree(built / "w", tmp_path / "w")
    before = set(manifest_of(folder)["entries"])
    (tmp_path / "p.yaml").write_text(profile_text(precision="fp32", backends="onnxruntime", height=48))
    build(load_profile(tmp_path / "p.yaml"), folder, echo=lambda s: None)
    assert before < set(manifest_of(folder)["entries"])


def test_rebuilding_a_manifest_checks_each_recovered_entry(built, tmp_path):
    folder = copy(built, tmp_path)
    shutil.copytree(built / "w", tmp_path / "w")
    damaged = entry_of(folder, "aoti")["id"]
    flip_byte_keep_time(folder / damaged / "engine.pt2")
    had = len(manifest_of(folder)["entries"])
    (folder / "manifest.json").unlink()
    (tmp_path / "p.yaml").write_text(profile_text(precision="fp32", backends="onnxruntime", height=48))
    lines = []
    build(load_profile(tmp_path / "p.yaml"), folder, rebuild_manifest=True, echo=lines.append)
    entries = manifest_of(folder)["entries"]
    assert damaged not in entries and len(entries) == had  # all but the damaged one recovered, + 1 built
    assert any(f"entry folder {damaged}: not recovered" in line and "sha256" in line for line in lines)
    assert (folder / damaged).is_dir()  # left for the user to look at


# -- 6. one malformed entry is refused alone -------------------------------------------------------------
def test_a_malformed_entry_is_refused_alone_and_kept(built, tmp_path):
    folder = copy(built, tmp_path)
    bad = entry_of(folder, "aoti")["id"]
    _rewrite(folder, lambda m: m["entries"][bad].pop("shape"))
    model = WanTransformer.from_pretrained(built / "w", engines=folder)
    x, t, ctx = inputs(seed=5)
    with torch.no_grad():
        out = model(x, t, ctx).sample
    assert model.last_route.backend == "onnxruntime"  # the rest of the folder serves
    assert relative_error(out, eager(built, x, t, ctx)) < 1e-5
    with pytest.raises(ManifestError, match=f"entries.{bad}.* lacks 'shape'"):
        WanTransformer.from_pretrained(built / "w", engines=folder, strict=True)
    shutil.copytree(built / "w", tmp_path / "w")
    (tmp_path / "p.yaml").write_text(profile_text(precision="fp32", backends="onnxruntime"))
    build(load_profile(tmp_path / "p.yaml"), folder, echo=lambda s: None)
    assert "shape" not in manifest_of(folder)["entries"][bad]  # written back as it was, not dropped


def test_entries_not_an_object_leaves_the_folder_loadable(built, tmp_path):
    folder = copy(built, tmp_path)
    _rewrite(folder, lambda m: m.update(entries=list(m["entries"].values())))
    model = WanTransformer.from_pretrained(built / "w", engines=folder)
    with torch.no_grad():
        model(*inputs())
    assert model.last_route.backend == "eager" and "entries must be a JSON object" in model.last_route.reason


# -- 7. the model's dtype and device decide -------------------------------------------------------------
def test_routing_follows_to_dtype(built):
    model = WanTransformer.from_pretrained(built / "w", engines=built / "out", backends=["aoti"])
    x, t, ctx = inputs(seed=6)
    with torch.no_grad():
        model(x, t, ctx)
        assert model.last_route.backend == "aoti" and "fp32" in model.last_route.reason
        model.to(torch.float16)
        out = model(x.half(), t, ctx.half()).sample
        assert model.last_route.backend == "aoti" and "fp16" in model.last_route.reason
        assert out.dtype == torch.float16
        assert relative_error(out, eager(built, x.half(), t, ctx.half(), dtype=torch.float16)) < 1e-2
        model.to(torch.bfloat16)
        model(x, t, ctx)
        assert model.last_route.backend == "eager"
        assert "engines for this shape are fp16, fp32, this model runs bf16" in model.last_route.reason
        model.to(torch.float64)
        model(x, t, ctx)
        assert model.last_route.backend == "eager" and "unsupported dtype" in model.last_route.reason
        model.to(torch.float32)
        model(x, t, ctx)
        assert model.last_route.backend == "aoti"


def test_an_entry_for_another_device_is_refused_before_loading(built, tmp_path, monkeypatch):
    """A package compiled for CUDA, given to a CPU model, is refused up front with that reason (guards a
    removed device check in the AOTInductor backend's compatibility rule)."""
    folder = copy(built, tmp_path)
    eid = entry_of(folder, "aoti")["id"]
    _rewrite(folder, lambda m: m["entries"][eid].update(device={"type": "cuda", "name": "H200",
                                                                 "compute_capability": "9.0"}))
    loads = spy_loads(monkeypatch)
    model = WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"])
    with torch.no_grad():
        model(*inputs())
    assert "compiled for cuda, the model runs on cpu" in model.last_route.reason and loads == []


def test_a_failed_load_is_tried_once(built, tmp_path, monkeypatch):
    """Guards an engine that fails to load being retried on every call (one attempt, one refusal)."""
    folder = copy(built, tmp_path)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("simulated loader failure")
    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", broken)
    model = WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"])
    with torch.no_grad():
        for _ in range(3):
            model(*inputs())
            assert model.last_route.backend == "eager" and "simulated loader failure" in model.last_route.reason
    assert len(calls) == 1 and sum(model.engines.load_attempts.values()) == 1
    assert len([r for r in model.engines.refusals.values() if "failed to load" in r[1]]) == 1


# -- 8. full disks ----------------------------------------------------------------------------------------
def test_a_failed_manifest_write_keeps_the_old_one_and_no_temp_file(tmp_path, monkeypatch):
    from runtime.manifest import Manifest

    (tmp_path / "manifest.json").write_bytes(b"old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(folder_module.os, "write", full)
    with pytest.raises(folder_module.FolderError, match="No space left on device.*nothing was replaced"):
        folder_module.write_manifest(tmp_path, Manifest("t"))
    assert (tmp_path / "manifest.json").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_full_disk_mid_entry_fails_that_entry_alone(built, tmp_path, monkeypatch):
    shutil.copytree(built / "w", tmp_path / "w")
    (tmp_path / "p.yaml").write_text(profile_text(precision="fp32", backends="[onnxruntime, inductor]"))
    real = os.write

    def full_for_parity(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".parity.json." + str(os.getpid()) + ".tmp") and \
                "fp16" not in str(full_for_parity.__dict__.get("done", "")):
            full_for_parity.done = "fp16"  # the first entry's write fails, the next one's works
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(folder_module.os, "write", full_for_parity)
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == ["failed", "built"], report.table()
    assert "No space left on device" in report.results[0].message and "\n" not in report.results[0].message
    out = tmp_path / "out"
    assert len(manifest_of(out)["entries"]) == 1
    assert not list(out.glob(".partial-*")) and not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_a_file_size_limit_fails_entries_without_aborting(built, tmp_path):
    """Writes beyond RLIMIT_FSIZE fail as a full disk does (EFBIG); AOTInductor's own archive writer
    used to abort the process here."""
    shutil.copytree(built / "w", tmp_path / "w")
    (tmp_path / "p.yaml").write_text(profile_text(precision="fp32", backends="aoti"))
    script = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))\n"
              "from builder.cli import app\nsys.argv = ['wan-build'] + sys.argv[1:]\napp()\n")
    r = subprocess.run([sys.executable, "-c", script, "build", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stdout + r.stderr and "1 failed" in r.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["entries"] == {}
    assert not list((tmp_path / "out").glob(".partial-*")) and not list((tmp_path / "out").rglob("*.tmp"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1.2 MB tmpfs: a real full disk (needs the right to mount, as root on the build machines)."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()[:80]}); the file-size-limit test covers it")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_fails_the_entry_with_one_line(built, tmp_path, small_disk):
    """The AOTInductor package (2 MB) does not fit: before, torch's archive writer aborted the process."""
    shutil.copytree(built / "w", tmp_path / "w")
    (tmp_path / "p.yaml").write_text(profile_text(precision="fp32", backends="aoti"))
    r = subprocess.run([sys.executable, "-m", "builder.cli", "build", str(tmp_path / "p.yaml"), "--out",
                        str(small_disk / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "No space left on device" in r.stdout and "Traceback" not in r.stdout + r.stderr
    assert json.loads((small_disk / "out" / "manifest.json").read_text())["entries"] == {}
    assert sorted(p.name for p in (small_disk / "out").iterdir()) == [".lock", "manifest.json"]


# -- 9. every path stays inside the folder ----------------------------------------------------------------
@pytest.mark.parametrize("attack", ["id", "file", "dir-link", "file-link"])
def test_paths_outside_the_folder_are_refused(built, tmp_path, monkeypatch, attack):
    folder = copy(built, tmp_path)
    entry = entry_of(folder, "aoti")
    eid = entry["id"]
    outside = tmp_path / "outside"
    shutil.copytree(folder / eid, outside)  # a valid package, outside the folder
    if attack == "id":
        _rewrite(folder, lambda m: m["entries"].update({"../outside": {**m["entries"].pop(eid), "id": "../outside"}}))
    elif attack == "file":
        _rewrite(folder, lambda m: m["entries"][eid]["files"].update(
            {"../../outside/engine.pt2": m["entries"][eid]["files"].pop("engine.pt2")}))
    elif attack == "dir-link":
        shutil.rmtree(folder / eid)
        (folder / eid).symlink_to(outside)
    else:
        (folder / eid / "engine.pt2").unlink()
        (folder / eid / "engine.pt2").symlink_to(outside / "engine.pt2")
    package = entry["files"]["engine.pt2"]["sha256"]
    read = []
    real = sha256_file
    monkeypatch.setattr("runtime.manifest.sha256_file", lambda p, **k: read.append(Path(p)) or real(p, **k))
    loads = spy_loads(monkeypatch)
    model = WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"])
    with torch.no_grad():
        model(*inputs())
    assert model.last_route.backend == "eager"
    assert any(w in model.last_route.reason for w in ("symbolic link", "not an entry id", "not a plain file name",
                                                       "no engine built")), model.last_route.reason
    results = verify(folder, echo=lambda s: None).results
    assert any(r.status == "failed" for r in results)
    assert package not in loads and not any(outside in p.resolve().parents for p in read)


# -- 10. a pinned folder -------------------------------------------------------------------------------------
def test_a_pinned_digest_is_required_to_match(built, tmp_path):
    folder = copy(built, tmp_path)
    r = subprocess.run([sys.executable, "-m", "builder.cli", "verify", str(folder), "--print-digest"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    digest = r.stdout.strip()
    assert digest == "sha256:" + hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    model = load_engines(folder, trusted=digest)
    with torch.no_grad():
        model(*inputs())
    assert model.last_route.backend != "eager"
    with (folder / "manifest.json").open("a") as f:
        f.write(" ")  # any change, even one no parser sees
    with pytest.raises(ManifestError, match="is not the trusted"):
        load_engines(folder, trusted=digest)
    pinned = WanTransformer.from_pretrained(built / "w", engines=folder, trusted=digest)
    with torch.no_grad():
        pinned(*inputs())
    assert pinned.last_route.backend == "eager" and "is not the trusted" in pinned.last_route.reason
    with pytest.raises(ManifestError, match="is not a manifest digest"):
        load_engines(folder, trusted="abc")


def test_verify_never_runs_a_package_that_fails_its_hash(built, tmp_path, monkeypatch):
    folder = copy(built, tmp_path)
    fp32, fp16 = entry_of(folder, "aoti"), entry_of(folder, "aoti", "fp16")
    shutil.copy(folder / fp16["id"] / "engine.pt2", folder / fp32["id"] / "engine.pt2")  # another real package
    loads = spy_loads(monkeypatch)
    results = {r.id: r for r in verify(folder, echo=lambda s: None).results}
    assert results[fp32["id"]].status == "failed" and results[fp16["id"]].status == "ok"
    assert loads == [fp16["files"]["engine.pt2"]["sha256"]]  # only the package that passed its check ran
    WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"], full_check=True)
    assert len(loads) == 1


def test_a_package_swapped_after_its_check_is_not_loaded(built, tmp_path, monkeypatch):
    """The code loaded is the bytes hashed: a swap between the check and the load is caught."""
    folder = copy(built, tmp_path)
    fp32, fp16 = entry_of(folder, "aoti"), entry_of(folder, "aoti", "fp16")
    model = WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"])  # checked at open
    shutil.copy(folder / fp16["id"] / "engine.pt2", folder / fp32["id"] / "engine.pt2")
    with torch.no_grad():
        model(*inputs())
    assert model.last_route.backend == "eager" and "failed to load" in model.last_route.reason
    assert "changed since it was built" in model.last_route.reason or "bytes, the manifest says" in \
        model.last_route.reason


# -- 11. the lock ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_a_planted_lock_is_refused(built, tmp_path, kind):
    shutil.copytree(built / "w", tmp_path / "w")
    (tmp_path / "p.yaml").write_text(profile_text(precision="fp32", backends="onnxruntime"))
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    if kind == "symlink":
        (out / ".lock").symlink_to(victim)
    else:
        (out / ".lock").mkdir()
    with pytest.raises(folder_module.FolderError, match=r"lock file .*\.lock"):
        build(load_profile(tmp_path / "p.yaml"), out, echo=lambda s: None)
    assert victim.read_text() == "precious" and not (out / "manifest.json").exists()


def test_engine_errors_are_user_errors():
    assert issubclass(ManifestError, EngineError)


# -- the parity gate and full checks (issue: tests that catch the bugs that matter) --------------------------
def test_the_parity_gate_at_each_side_of_every_tolerance():
    """Guards a loosened or tightened tolerance and a flipped comparison in the gate: an output off by
    0.9x its precision's tolerance passes, 1.1x fails; fp32's is the product's promise (1e-5), and the
    README's table states every precision's."""
    from builder.build.parity import gate
    from runtime.precision import Precision

    assert Precision.FP32.parity_tolerance == 1e-5
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 16, 2, 4, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    noise *= ref.norm() / noise.norm()  # relative size 1
    for p in Precision:
        tol = p.parity_tolerance
        assert f"| {p.value} | {tol:g} |" in readme, p
        assert gate(ref + 0.9 * tol * noise, ref, p.value).passed, p
        assert not gate(ref + 1.1 * tol * noise, ref, p.value).passed, p
        assert not gate(ref * float("nan"), ref, p.value).passed and not gate(ref[:1], ref, p.value).passed


@pytest.mark.parametrize("scale,status", [(0.5, "built"), (2.0, "failed")])
def test_the_build_gates_each_engine_by_its_tolerance(built, tmp_path, monkeypatch, scale, status):
    """Guards the build skipping or loosening its gate: an engine whose output is off by `scale` times
    the fp32 tolerance is written (0.5x) or refused with nothing written (2x)."""
    from builder.backends.onnxruntime import OnnxRuntimeBuilder

    real = OnnxRuntimeBuilder.build

    def off_by(self, job):
        out, reference = real(self, job)
        g = torch.Generator().manual_seed(1)
        noise = torch.randn(reference.shape, generator=g)
        return reference + noise * (scale * 1e-5 * reference.norm() / noise.norm()), reference
    monkeypatch.setattr(OnnxRuntimeBuilder, "build", off_by)
    shutil.copytree(built / "w", tmp_path / "w")
    (tmp_path / "p.yaml").write_text(profile_text(precision="fp32", backends="onnxruntime"))
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    assert [r.status for r in report.results] == [status], report.table()
    entries = manifest_of(tmp_path / "out")["entries"]
    assert len(entries) == (1 if status == "built" else 0)
    if status == "failed":
        assert "parity failed" in report.results[0].message
        assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] == ["manifest.json"]
    else:
        assert 0.4e-5 < next(iter(entries.values()))["parity"]["relative"] < 0.6e-5


def test_full_check_rehashes_what_this_process_already_hashed(built, tmp_path, monkeypatch):
    """Guards full_check or verify trusting the in-process hash memo: with file identities that cannot
    tell the change (coarse time stamps), the default check trusts its memo, full_check does not."""
    import runtime.integrity as integrity

    folder = copy(built, tmp_path)
    entry = entry_of(folder, "aoti")
    path = folder / entry["id"] / "engine.pt2"
    monkeypatch.setattr(integrity, "file_key", lambda p: (os.stat(p).st_ino, os.stat(p).st_size))
    WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"])  # hashed, remembered
    flip_byte_keep_time(path)
    trusting = WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"])
    assert not trusting.engines.refusals  # the memo said "unchanged": the price of not re-reading
    full = WanTransformer.from_pretrained(built / "w", engines=folder, backends=["aoti"], full_check=True)
    assert any("fails its sha256 check" in why for _, why in full.engines.refusals.values())
    assert next(r for r in verify(folder, echo=lambda s: None).results if r.id == entry["id"]).status == "failed"
    with torch.no_grad():
        trusting(*inputs())  # and the load itself hashes the bytes it runs
    assert trusting.last_route.backend == "eager" and "sha256" in trusting.last_route.reason
