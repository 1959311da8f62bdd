"""`EngineSet`'s refusals and routing on hand-written engine folders (the files are a few bytes and
loading is replaced by a stand-in engine, so nothing is built or compiled): the parity gate as the
manifest records it, incomplete records, what is hashed at open, the backend preference, strict
mode, and the expert boundary a two-expert folder must record. Each test names the bug it guards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from runtime import get_preset
from runtime.backends import Engine, backend
from runtime.engines import EngineSet
from runtime.manifest import EngineError, ExpertRecord, FileInfo, Manifest, ManifestError, ParityInfo, tool_versions
from runtime.static import StaticShape

from .conftest import make_entry

CONFIG = get_preset("tiny-t2v")
SHAPE = StaticShape(1, 2, 4, 6, 8)
FINGERPRINT = "f" * 64
CPU = torch.device("cpu")
FILES = {"aoti": ("engine.pt2",), "onnxruntime": ("model.onnx", "model.onnx.data")}


class StandIn(Engine):
    def run(self, *inputs):
        return torch.zeros(self.entry.outputs[0].shape)


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Loading an entry gives a stand-in engine; returns the ids loaded, in order."""
    loaded: list[str] = []

    def load(entry, folder, device, *rest, **kw):
        loaded.append(entry.id)
        return StandIn(entry, device)

    for name in FILES:
        monkeypatch.setattr(backend(name), "load", load)
    return loaded


def _entry(folder: Path, eid: str, backend_name: str = "aoti", precision: str = "fp32", files=None, **fields):
    """An entry whose files exist in `folder/<eid>/` with their true sha256 and size."""
    (folder / eid).mkdir(parents=True, exist_ok=True)
    infos = {}
    for name in FILES[backend_name] if files is None else files:
        data = f"{eid} {name}".encode()
        (folder / eid / name).write_bytes(data)
        infos[name] = FileInfo(hashlib.sha256(data).hexdigest(), len(data))
    values = dict(id=eid, files=infos, versions=tool_versions(), weights_fingerprint=FINGERPRINT)
    values.update(fields)
    return make_entry(CONFIG, SHAPE, backend_name, precision, **values)


def _folder(folder: Path, entries, experts=None, boundary=None) -> Path:
    experts = experts or {"main": ExpertRecord("/nowhere", FINGERPRINT, "diffusers", {})}
    manifest = Manifest("t", experts, {e.id: e for e in entries}, boundary)
    (folder / "manifest.json").write_bytes(manifest.to_bytes())
    return folder


def _open(folder: Path, precision="fp32", **kw) -> EngineSet:
    return EngineSet.open(folder, fingerprint=FINGERPRINT, precision=precision, device=CPU, **kw)


def _route(engines: EngineSet, precision="fp32"):
    return engines.route(SHAPE, precision, CPU, lambda: None)


def test_a_stand_in_folder_serves(tmp_path, loads):
    engines = _open(_folder(tmp_path, [_entry(tmp_path, "a" * 16)]))
    engine, entry, reason = _route(engines)
    assert engine is not None and entry.id == "a" * 16 and loads == ["a" * 16]
    assert reason == f"engine {'a' * 16} (aoti, fp32) built for this shape"


def test_a_failed_parity_record_is_refused_even_without_the_flag(tmp_path, loads):
    """Guards the parity refusal narrowed to entries flagged `allow_mismatch`: a record whose parity
    did not pass (an old build, a hand edit) is refused by its numbers, and served only with
    allow_mismatch=True, marked so."""
    bad = ParityInfo(0.5, 0.3, 0.9, 1e-5)
    folder = _folder(tmp_path, [_entry(tmp_path, "b" * 16, parity=bad, allow_mismatch=False)])
    engine, _, reason = _route(_open(folder))
    assert engine is None and "failed its parity check at build (rel 3.00e-01" in reason and loads == []
    engine, _, reason = _route(_open(folder, allow_mismatch=True))
    assert engine is not None and "SERVED DESPITE FAILED PARITY (rel 3.00e-01" in reason


def test_a_record_missing_one_of_its_backends_files_is_refused_at_open(tmp_path, loads):
    """Guards the completeness check weakened from "any required file unlisted" to "all unlisted":
    an ONNX Runtime record listing its graph but not its weights would run unhashed weights."""
    entry = _entry(tmp_path, "c" * 16, "onnxruntime", files=("model.onnx",))
    engines = _open(_folder(tmp_path, [entry]), backends=["onnxruntime"])
    [(refused, why)] = engines.refusals.values()
    assert refused.id == entry.id and why == "the manifest lists no model.onnx.data for it (incomplete record)"
    assert _route(engines)[0] is None and loads == []


def test_the_backend_order_decides_between_two_engines_of_one_shape(tmp_path, loads):
    """Guards the preference order reversed when the entries of a shape are sorted: the first backend
    of `backends` (default: tensorrt, aoti, ..., onnxruntime) serves."""
    folder = _folder(tmp_path, [_entry(tmp_path, "d" * 16, "onnxruntime"), _entry(tmp_path, "e" * 16, "aoti")])
    assert _route(_open(folder))[1].backend == "aoti"
    assert _route(_open(folder, backends=["onnxruntime", "aoti"]))[1].backend == "onnxruntime"
    assert _route(_open(folder, backends=["aoti", "onnxruntime"]))[1].backend == "aoti"
    assert loads == ["e" * 16, "d" * 16, "e" * 16]


def test_open_hashes_only_the_entries_of_the_models_precision(tmp_path, loads):
    """Guards the check at open widened to every precision: a folder of fp32, fp16 and bf16 engines of
    a 14B model would hash all of them for a model that runs one; the others are checked when the
    model moves to their precision (and refused then, with the reason)."""
    fp32, fp16 = _entry(tmp_path, "1" * 16), _entry(tmp_path, "2" * 16, precision="fp16")
    folder = _folder(tmp_path, [fp32, fp16])
    (folder / fp16.id / "engine.pt2").write_bytes(b"X" * fp16.files["engine.pt2"].bytes)  # damaged, same size
    engines = _open(folder)
    assert engines.refusals == {} and engines.verification.files == 1
    assert _route(engines)[0] is not None
    engine, _, reason = _route(engines, "fp16")
    assert engine is None and "fails its sha256 check" in reason
    full = _open(folder, full_check=True)
    assert any("fails its sha256 check" in why for _, why in full.refusals.values())


def test_strict_mode_raises_for_one_malformed_record(tmp_path, loads):
    """Guards `strict=True` ignoring malformed manifest records (they are refused alone otherwise)."""
    folder = _folder(tmp_path, [_entry(tmp_path, "3" * 16)])
    data = json.loads((folder / "manifest.json").read_text())
    data["entries"]["4" * 16] = {"id": "4" * 16}
    (folder / "manifest.json").write_text(json.dumps(data))
    engines = _open(folder)
    assert list(engines.malformed) == ["4" * 16]
    assert _route(engines)[0] is not None  # the rest of the folder serves
    engine, _, reason = engines.route(StaticShape(1, 2, 4, 4, 8), "fp32", CPU, lambda: None)
    assert engine is None and "malformed manifest records were refused: " + "4" * 16 in reason
    with pytest.raises(ManifestError, match=f"entry {'4' * 16} in .* refused: entries.{'4' * 16} lacks 'backend'"):
        _open(folder, strict=True)


def test_a_failed_load_is_refused_on_that_device_once(tmp_path, monkeypatch):
    """Guards the per-device refusal not consulted: an engine that failed to load would be loaded
    again on every call."""
    calls = []

    def broken(entry, *args, **kw):
        calls.append(entry.id)
        raise RuntimeError("simulated")

    monkeypatch.setattr(backend("aoti"), "load", broken)
    engines = _open(_folder(tmp_path, [_entry(tmp_path, "5" * 16)]))
    for _ in range(3):
        engine, _, reason = _route(engines)
        assert engine is None and "failed to load (RuntimeError: simulated)" in reason
    assert calls == ["5" * 16]


def test_a_two_expert_folder_without_a_boundary_is_refused(tmp_path):
    """Guards `load_engines` accepting a two-expert manifest that records no boundary (the router
    could not tell the experts' calls apart)."""
    from runtime.experts import load_engines

    experts = {n: ExpertRecord(str(tmp_path / n), FINGERPRINT, "diffusers", {}) for n in ("high_noise", "low_noise")}
    _folder(tmp_path, [], experts=experts, boundary=None)
    with pytest.raises(EngineError, match="the manifest has two experts but no boundary"):
        load_engines(tmp_path)
