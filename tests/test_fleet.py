"""Fleet builds on a local Ray cluster: the same entries as a serial build, and what a lost worker,
weights changed under the build or a GPU model the cluster lacks do to the engine folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from builder.build import build
from builder.catalog import verify
from builder.init_weights import init_weights
from builder.profiles import load_profile
from runtime import get_preset, load_engines
from runtime.manifest import MANIFEST, Manifest

from .conftest import make_inputs, relative_error

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

CONFIG = get_preset("tiny-t2v")
TEXT = 16
SHAPES = ((5, 32, 48), (9, 32, 48))


def profile_text(extra: str = "", device: str = "cpu") -> str:
    shapes = "".join(f"  - {{frames: {f}, height: {h}, width: {w}}}\n" for f, h, w in SHAPES)
    return (f"name: fleet\nmodel: {{weights: w, preset: tiny-t2v}}\nprecision: fp32\nbackends: onnxruntime\n"
            f"shapes:\n{shapes}text_tokens: {TEXT}\ndevice: {device}\n{extra}")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (a build joins it rather than starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    init_weights(CONFIG, root / "w", seed=5)
    (root / "p.yaml").write_text(profile_text())
    report = build(load_profile(root / "p.yaml"), root / "serial", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"] * len(SHAPES), report.table()
    return root


def _manifest(folder: Path) -> Manifest:
    return Manifest.from_bytes((folder / MANIFEST).read_bytes(), folder / MANIFEST)


def _no_partials(folder: Path) -> None:
    assert not list(folder.glob(".partial-*")), list(folder.iterdir())


def test_a_fleet_build_makes_the_serial_build_s_entries(cluster, serial, tmp_path):
    lines: list[str] = []
    report = build(load_profile(serial / "p.yaml"), tmp_path / "out", echo=lines.append, ray="local")
    assert [r.status for r in report.results] == ["built"] * len(SHAPES), report.table()
    assert all(r.to_json()["host"] for r in report.results)
    fleet, alone = _manifest(tmp_path / "out"), _manifest(serial / "serial")
    assert sorted(fleet.entries) == sorted(alone.entries)  # the same ids: the same machine, libraries, weights
    for entry_id, entry in fleet.entries.items():
        other = alone.entries[entry_id]
        assert entry.parity.passed and other.parity.passed
        assert abs(entry.parity.relative - other.parity.relative) < 1e-6
        assert {n: f.sha256 for n, f in entry.files.items() if n.endswith(".data")} == \
            {n: f.sha256 for n, f in other.files.items() if n.endswith(".data")}
        machine = entry.build["machine"]
        assert machine["machine"] == "cpu" and machine["host"] and isinstance(machine["pid"], int)
        assert json.loads((tmp_path / "out" / entry_id / "entry.json").read_text())["build"]["machine"] == machine
    # one stored weights file for the shapes, hard-linked into each entry
    stored = list((tmp_path / "out" / ".weights").iterdir())
    assert len(stored) == 1 and stored[0].stat().st_nlink == 1 + len(SHAPES)
    assert any(re.search(r"started on \S+ \(pid \d+\)", line) for line in lines)
    assert any("done" in line and "parity rel" in line for line in lines)
    _no_partials(tmp_path / "out")
    assert [r.status for r in verify(tmp_path / "out", echo=lambda s: None).results] == ["ok"] * len(SHAPES)
    # and the engines serve: the fleet's entry gives the serial entry's answer
    fleet_set, serial_set = load_engines(tmp_path / "out"), load_engines(serial / "serial")
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=TEXT)
    with torch.no_grad():
        a, b = fleet_set(x, t, ctx).sample, serial_set(x, t, ctx).sample
    assert fleet_set.last_route.backend == "onnxruntime" and relative_error(a, b) < 1e-6
    # a rerun keeps everything, without building
    again = build(load_profile(serial / "p.yaml"), tmp_path / "out", echo=lambda s: None, ray="local")
    assert [r.status for r in again.results] == ["kept"] * len(SHAPES)


def _killer(lines: list[str], kills: list[int]):
    """An echo that SIGKILLs the first worker that reports it started an entry."""
    def echo(line: str) -> None:
        lines.append(line)
        found = re.search(r"started on \S+ \(pid (\d+)\)", line)
        if found and not kills:
            kills.append(int(found.group(1)))
            os.kill(kills[0], signal.SIGKILL)
    return echo


def test_a_worker_killed_mid_build_fails_its_entry_alone_and_a_rerun_completes_it(cluster, serial, tmp_path):
    lines, kills = [], []
    report = build(load_profile(serial / "p.yaml"), tmp_path / "out", echo=_killer(lines, kills), ray="local",
                   retries=0)
    assert len(kills) == 1
    statuses = [r.status for r in report.results]
    assert sorted(statuses) == ["built", "failed"], report.table()
    failed = report.failed[0]
    assert "worker building it died" in failed.message and "rerun" in failed.message
    _no_partials(tmp_path / "out")
    manifest = _manifest(tmp_path / "out")  # valid, and lists exactly the finished entries
    assert sorted(manifest.entries) == sorted(r.entry.id for r in report.results if r.status == "built")
    assert not (tmp_path / "out" / failed.entry.id).exists()
    # build folders of workers that died (this one's, had it made one, or any other) are removed before
    # the next build on the machine; a live process's folder stays
    import tempfile

    from builder.fleet import WORK_ROOT

    root = Path(tempfile.gettempdir()) / WORK_ROOT
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (root / f"{dead}-0123456789abcdef-x" / "entry").mkdir(parents=True, exist_ok=True)
    (root / f"{os.getpid()}-0123456789abcdef-y").mkdir(parents=True, exist_ok=True)
    from builder.fleet import _work_folder

    fresh = _work_folder(report.results[0].entry)  # what a worker does before each build
    assert fresh.is_dir() and fresh.name.startswith(f"{os.getpid()}-{report.results[0].entry.id}-")
    fresh.rmdir()
    assert not (root / f"{dead}-0123456789abcdef-x").exists() and not list(root.glob(f"{kills[0]}-*"))
    assert (root / f"{os.getpid()}-0123456789abcdef-y").is_dir()
    (root / f"{os.getpid()}-0123456789abcdef-y").rmdir()
    # a serial rerun builds only the lost entry
    rerun = build(load_profile(serial / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    assert sorted(r.status for r in rerun.results) == ["built", "kept"]
    assert sorted(_manifest(tmp_path / "out").entries) == sorted(_manifest(serial / "serial").entries)


def test_a_lost_worker_s_entry_is_submitted_again(cluster, serial, tmp_path):
    lines, kills = [], []
    report = build(load_profile(serial / "p.yaml"), tmp_path / "out", echo=_killer(lines, kills), ray="local",
                   retries=1)
    assert len(kills) == 1
    assert [r.status for r in report.results] == ["built"] * len(SHAPES), report.table()
    assert any("submitting it again (1 of 1)" in line for line in lines)
    _no_partials(tmp_path / "out")
    assert [r.status for r in verify(tmp_path / "out", echo=lambda s: None).results] == ["ok"] * len(SHAPES)


def test_weights_changed_under_the_build_fail_on_the_workers(cluster, tmp_path):
    """The driver fingerprints the weights; a worker that reads other bytes at that path (another
    node's copy, or a file rewritten meanwhile) refuses to build from them."""
    init_weights(CONFIG, tmp_path / "w", seed=5)
    (tmp_path / "p.yaml").write_text(profile_text())

    def echo(line: str) -> None:
        if line.startswith("building "):  # after the driver's fingerprint, before any task
            init_weights(CONFIG, tmp_path / "w", seed=6)

    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=echo, ray="local")
    assert [r.status for r in report.results] == ["failed"] * len(SHAPES)
    assert all("are not the driver's" in r.message and "same files" in r.message for r in report.failed)
    assert _manifest(tmp_path / "out").entries == {}
    _no_partials(tmp_path / "out")


def test_a_target_gpu_model_the_cluster_lacks_is_skipped_with_the_reason(cluster, tmp_path):
    """No task waits for a GPU no node has. An entry whose backend does not depend on the GPU model
    (ONNX Runtime) is planned once for all targets; AOTInductor entries once per target."""
    init_weights(CONFIG, tmp_path / "w", seed=5)
    (tmp_path / "p.yaml").write_text(profile_text("targets: [H100, L40S]\n", device="auto")
                                     .replace("backends: onnxruntime", "backends: [onnxruntime, aoti]"))
    profile = load_profile(tmp_path / "p.yaml")
    assert profile.targets == ("H100", "L40S")
    report = build(profile, tmp_path / "out", echo=lambda s: None, ray="local")
    assert [r.status for r in report.results] == ["skipped"] * 3 * len(SHAPES), report.table()
    assert len({r.entry.id for r in report.results}) == 3 * len(SHAPES)
    assert all("no node of the Ray cluster has a" in r.message and "GPUs: none" in r.message
               for r in report.results)
    named = [re.search(r"has a (\S+) GPU", r.message).group(1) for r in report.results if r.entry.backend == "aoti"]
    assert sorted(named) == ["H100"] * len(SHAPES) + ["L40S"] * len(SHAPES)
    assert _manifest(tmp_path / "out").entries == {}


def test_a_cluster_that_is_not_there_is_one_line(tmp_path):
    init_weights(CONFIG, tmp_path / "w", seed=5)
    (tmp_path / "p.yaml").write_text(profile_text())
    out = subprocess.run([sys.executable, "-m", "builder.cli", "build", str(tmp_path / "p.yaml"), "--out",
                          str(tmp_path / "out"), "--ray", "127.0.0.1:1"], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parent.parent)
    assert out.returncode != 0
    assert "--ray 127.0.0.1:1: cannot join a Ray cluster there" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out" / MANIFEST).exists() or _manifest(tmp_path / "out").entries == {}


def test_without_ray_nothing_imports_it():
    code = ("import sys; import builder.cli, builder.build, builder.profiles, runtime; "
            "assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "ok", out.stderr


def test_profile_targets_are_checked(tmp_path):
    from runtime.errors import WanBuildError

    init_weights(CONFIG, tmp_path / "w", seed=5)
    for extra, device, message in (("targets: [H100, H100]\n", "auto", "targets[1]: repeats H100"),
                                   ("targets: ['H100 80GB']\n", "auto", "must be a GPU model as Ray names it"),
                                   ("targets: [H100]\n", "cpu", "lists GPU models but device is cpu")):
        (tmp_path / "p.yaml").write_text(profile_text(extra, device=device))
        with pytest.raises(WanBuildError, match=re.escape(message)):
            load_profile(tmp_path / "p.yaml")
