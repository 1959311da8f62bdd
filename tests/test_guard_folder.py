"""The build's folder logic, with the engine itself stood in for (the ONNX Runtime builder writes two
small files and returns the eager output as the engine's, so a build takes a second): recovering
entries from their folders, leftovers of killed builds, malformed records rebuilt, a manifest that
cannot be written, the mismatch flag, the shared weights store, and what verify says about weights
and experts. Each test names the bug it guards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import builder.build as build_module
from builder.backends.onnxruntime import OnnxRuntimeBuilder
from builder.build import build
from builder.build.folder import FolderError, share_weights
from builder.catalog import verify
from builder.init_weights import init_weights
from builder.profiles import load_profile
from runtime import get_preset

CONFIG = get_preset("tiny-t2v")


@pytest.fixture
def stand_in(monkeypatch):
    """ONNX Runtime entries whose 'engine' is the eager model: two files of a few bytes each."""
    def fake(self, job):
        with torch.no_grad():
            reference = job.model(*job.inputs)
        (job.folder / "model.onnx").write_bytes(b"graph of " + job.entry.id.encode())
        (job.folder / "model.onnx.data").write_bytes(b"weights of " + job.entry.id.encode())
        return reference.clone(), reference

    monkeypatch.setattr(OnnxRuntimeBuilder, "build", fake)


@pytest.fixture
def project(tmp_path, stand_in) -> Path:
    init_weights(CONFIG, tmp_path / "w", seed=3)
    (tmp_path / "p.yaml").write_text("name: t\nmodel: {weights: w}\nprecision: fp32\nbackends: onnxruntime\n"
                                     "shapes:\n  - {frames: 5, height: 32, width: 48}\n  - {frames: 5, height: 32, width: 64}\n"
                                     "text_tokens: 16\ndevice: cpu\n")
    return tmp_path


def _build(project: Path, **kw):
    lines: list[str] = []
    report = build(load_profile(project / "p.yaml"), project / "out", echo=lines.append, **kw)
    return report, lines


def _manifest(project: Path) -> dict:
    return json.loads((project / "out" / "manifest.json").read_text())


def test_a_second_build_keeps_what_the_first_built(project):
    report, _ = _build(project)
    assert [r.status for r in report.results] == ["built", "built"]
    again, _ = _build(project)
    assert [r.status for r in again.results] == ["kept", "kept"]


def test_rebuilding_the_manifest_recovers_only_what_it_lacks(project):
    """Guards `--rebuild-manifest` recovering entry folders the manifest already lists (their records
    replaced by whatever their folders hold): only folders it does not list are recovered."""
    _build(project)
    _, lines = _build(project, rebuild_manifest=True)
    assert not any("recovered entry" in line for line in lines), lines
    data = _manifest(project)
    lost = sorted(data["entries"])[0]
    del data["entries"][lost]
    (project / "out" / "manifest.json").write_text(json.dumps(data))
    report, lines = _build(project, rebuild_manifest=True)
    assert [line for line in lines if "recovered entry" in line] == [next(
        line for line in lines if line.startswith(f"recovered entry {lost}"))]
    assert sorted(r.status for r in report.results) == ["kept", "kept"]


def test_a_folder_whose_record_names_another_entry_is_not_recovered(project):
    """Guards the check that an entry folder's `entry.json` describes that folder removed: a copied
    folder would be recovered as the entry it names, under the wrong name."""
    _build(project)
    out = project / "out"
    original = sorted(_manifest(project)["entries"])[0]
    impostor = "0123456789abcdef"
    shutil.copytree(out / original, out / impostor)
    (out / "manifest.json").unlink()
    report, lines = _build(project, rebuild_manifest=True)
    assert any(f"entry folder {impostor}: not recovered (entry.json describes entry {original})" in line
               for line in lines), lines
    assert impostor not in _manifest(project)["entries"] and (out / impostor).is_dir()
    assert sum(line.startswith("recovered entry") for line in lines) == 2


def test_a_killed_builds_temporary_manifest_is_cleared(project):
    """Guards the leftover `.manifest.json.<pid>.tmp` of a killed build not removed by the next one."""
    _build(project)
    out = project / "out"
    (out / ".manifest.json.99999.tmp").write_bytes(b"half a manifest")
    (out / ".partial-0123456789abcdef-99999").mkdir()
    _build(project)
    assert not list(out.glob(".manifest.json.*.tmp")) and not list(out.glob(".partial-*"))


def test_a_malformed_record_of_an_entry_to_build_is_rebuilt_and_replaced(project):
    """Guards the status of an entry whose manifest record was malformed: it is rebuilt (and said so),
    and its record is a valid one again."""
    _build(project)
    data = _manifest(project)
    bad = sorted(data["entries"])[0]
    data["entries"][bad].pop("shape")
    (project / "out" / "manifest.json").write_text(json.dumps(data))
    report, lines = _build(project)
    status = {r.entry.id: r.status for r in report.results}
    assert status[bad] == "rebuilt" and list(status.values()).count("kept") == 1
    assert any("rebuilding (its manifest record is malformed" in line for line in lines)
    assert "shape" in _manifest(project)["entries"][bad]


def test_an_entry_whose_manifest_write_fails_is_taken_out_again(project, monkeypatch):
    """Guards the entry left in place (and in the in-memory manifest) when the manifest cannot be
    written after it: it must fail, its folder removed, and no later write may list it."""
    real = build_module.write_manifest
    writes = []

    def flaky(folder, manifest):
        writes.append(1)
        if len(writes) == 2:  # the write after the first entry
            raise FolderError("could not write manifest.json (No space left on device); nothing was replaced")
        return real(folder, manifest)

    monkeypatch.setattr(build_module, "write_manifest", flaky)
    report, _ = _build(project)
    assert [r.status for r in report.results] == ["failed", "built"]
    assert "No space left on device" in report.results[0].message
    failed = report.results[0].entry.id
    assert failed not in _manifest(project)["entries"] and not (project / "out" / failed).exists()
    assert list(_manifest(project)["entries"]) == [report.results[1].entry.id]


def test_allow_mismatch_marks_only_entries_that_failed(project):
    """Guards the mismatch flag taken from the build option instead of the entry's own parity: with
    --allow-mismatch, an entry that passed is an ordinary entry, served without a warning."""
    report, _ = _build(project, allow_mismatch=True)
    assert [r.message for r in report.results] == ["", ""]
    assert all(e["allow_mismatch"] is False and e["parity"]["passed"] for e in _manifest(project)["entries"].values())


def test_verify_names_changed_weights_and_a_missing_expert(project):
    """Guards verify's two checks before re-running parity: weights changed since the build, and an
    entry of an expert the manifest does not record."""
    _build(project)
    first = verify(project / "out", echo=lambda s: None).results
    assert [r.detail.split(":")[0] for r in first] == ["cannot run"] * 2  # the stand-in files do not load
    init_weights(CONFIG, project / "w", seed=4)  # other weights at the recorded path
    results = verify(project / "out", echo=lambda s: None).results
    assert [r.detail for r in results] == [f"the weights at {project / 'w'} changed since the build"] * 2
    data = _manifest(project)
    data["experts"] = {}
    (project / "out" / "manifest.json").write_text(json.dumps(data))
    results = verify(project / "out", echo=lambda s: None).results
    assert [(r.status, r.detail) for r in results] == [("failed", "the manifest has no main expert")] * 2


def test_a_linked_weights_store_is_refused(tmp_path):
    """Guards the symbolic-link refusal of the shared weights store removed: weights would be moved
    into, and linked from, wherever the link points."""
    folder, elsewhere = tmp_path / "entry", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "model.onnx.data").write_bytes(b"weights")
    (tmp_path / ".weights").symlink_to(elsewhere)
    with pytest.raises(FolderError, match="is a symbolic link"):
        share_weights(folder, tmp_path / ".weights", "model.onnx.data", echo=lambda s: None)
    assert list(elsewhere.iterdir()) == [] and (folder / "model.onnx.data").read_bytes() == b"weights"
    store = tmp_path / "store"
    digest = share_weights(folder, store, "model.onnx.data", echo=lambda s: None)
    assert (store / f"{digest}.onnx.data").stat().st_ino == (folder / "model.onnx.data").stat().st_ino
