"""The manifest as a typed, validated record, checked without building an engine: field types, the
entry's own record name, keys that are not their entry's id, a missing format, malformed pins, a
linked manifest, files that grew, sizes below their minimum and dtypes that are not dtypes; and the
backends' file and compatibility rules. Each test names the bug it guards."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import pytest
import torch

from runtime import get_preset
from runtime.manifest import (ENTRY_FILE, FORMAT, Entry, ExpertRecord, FileInfo, Manifest, ManifestError, check_files,
                              check_pin, read_manifest)
from runtime.static import StaticShape

from .conftest import make_entry

CONFIG = get_preset("tiny-t2v")
SHAPE = StaticShape(1, 2, 4, 6, 8)


def _entry_json(**changes) -> dict:
    data = make_entry(CONFIG, SHAPE).to_json()
    data.update(changes)
    return data


def _shape_json(**changes) -> dict:
    data = _entry_json()
    data["shape"].update(changes)
    return data


def test_a_valid_entry_round_trips():
    entry = make_entry(CONFIG, SHAPE, files={"engine.pt2": FileInfo("a" * 64, 3)})
    again = Entry.from_json(json.loads(entry.to_bytes()))
    assert again == entry


@pytest.mark.parametrize("field,value", [("batch", True), ("latent_frames", False), ("text_tokens", True)])
def test_a_boolean_is_not_a_size(field, value):
    """Guards the bool exclusion dropped from the typed reader: JSON `true` is an int to Python, and
    would read as a batch (or a frame count) of 1."""
    with pytest.raises(ManifestError, match=f"entry.shape.{field} must be int, not bool"):
        Entry.from_json(_shape_json(**{field: value}))


def test_a_boolean_is_not_a_number_of_bytes_or_an_opset():
    entry = make_entry(CONFIG, SHAPE, files={"engine.pt2": FileInfo("a" * 64, 3)}).to_json()
    entry["files"]["engine.pt2"]["bytes"] = True
    with pytest.raises(ManifestError, match=r"files\[engine.pt2\].bytes must be int, not bool"):
        Entry.from_json(entry)
    with pytest.raises(ManifestError, match="onnx_opset must be int, not bool"):
        Entry.from_json(_entry_json(onnx_opset=True))
    assert Entry.from_json(_entry_json(allow_mismatch=True)).allow_mismatch is True  # bool where bool is asked


@pytest.mark.parametrize("field,minimum", [("batch", 1), ("latent_frames", 1), ("latent_height", 1),
                                           ("text_tokens", 1), ("image_tokens", 0)])
def test_sizes_below_their_minimum_are_refused(field, minimum):
    """Guards the minimum check loosened by one: a batch or frame count of 0 (or -1 image tokens)
    is no shape any engine was built for."""
    with pytest.raises(ManifestError, match=f"entry.shape.{field} must be >= {minimum}, not {minimum - 1}"):
        Entry.from_json(_shape_json(**{field: minimum - 1}))
    assert getattr(Entry.from_json(_shape_json(**{field: minimum + 1})).shape, field) == minimum + 1


def test_the_entry_record_is_not_one_of_its_files():
    """Guards the `entry.json` exclusion dropped from `files`: the entry's own record is rewritten by
    every rebuild, so listing (and hashing) it would make a folder fail its own check."""
    files = {ENTRY_FILE: {"sha256": "a" * 64, "bytes": 3}}
    with pytest.raises(ManifestError, match="'entry.json' is not a plain file name inside the entry folder"):
        Entry.from_json(_entry_json(files=files))
    for bad in (".hidden", "../x", "a/b", ""):
        with pytest.raises(ManifestError, match="is not a plain file name"):
            Entry.from_json(_entry_json(files={bad: {"sha256": "a" * 64, "bytes": 3}}))


@pytest.mark.parametrize("dtype", ["float33", "Tensor", "nn", "float32 "])
def test_a_tensor_dtype_must_be_a_torch_dtype(dtype):
    """Guards the dtype check of recorded inputs removed: `getattr(torch, name)` of anything else (a
    class, a module, nothing) would break the engine's input checks at its first call."""
    entry = _entry_json()
    entry["inputs"][0]["dtype"] = dtype
    with pytest.raises(ManifestError, match=f"inputs\\[0\\].dtype '{dtype}' is not a torch dtype"):
        Entry.from_json(entry)


def _manifest_bytes(entries: dict, **top) -> bytes:
    data = {"format": FORMAT, "name": "t", "experts": {}, "entries": entries, **top}
    return json.dumps(data).encode()


def test_an_entry_stored_under_another_key_is_refused_alone():
    """Guards the key == id check removed: a record copied under another entry's key would be served
    for that entry's identity."""
    good = make_entry(CONFIG, SHAPE, id="0123456789abcdef").to_json()
    moved = make_entry(CONFIG, SHAPE, id="fedcba9876543210").to_json()
    m = Manifest.from_bytes(_manifest_bytes({good["id"]: good, "aaaaaaaaaaaaaaaa": moved}), Path("m.json"))
    assert list(m.entries) == [good["id"]]
    assert "holds entry fedcba9876543210; the key must be its id" in m.bad_entries["aaaaaaaaaaaaaaaa"]
    assert m.raw_bad_entries["aaaaaaaaaaaaaaaa"] == moved  # kept verbatim for the build to write back


@pytest.mark.parametrize("top,message", [({"format": None}, "manifest format None"),
                                         ({"format": 1}, "manifest format 1"),
                                         ({"format": "2"}, "manifest format '2'"),
                                         ({"format": True}, "manifest format True")])
def test_a_manifest_without_this_format_is_refused(top, message):
    """Guards a manifest with no `format` (or another one) read as if it were this format."""
    data = json.loads(_manifest_bytes({}))
    data.update(top)
    if top["format"] is None:
        del data["format"]
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(json.dumps(data).encode(), Path("m.json"))
    assert Manifest.from_bytes(_manifest_bytes({}), Path("m.json")).entries == {}


@pytest.mark.parametrize("trusted", ["sha256:" + "a" * 63, "sha256:" + "a" * 65, "sha256:" + "A" * 64, "sha256:",
                                     "a" * 64, "sha512:" + "a" * 64])
def test_a_malformed_pin_is_refused_as_such(trusted):
    """Guards the pin's format check loosened (any hex length): a truncated digest must be told apart
    from a folder that changed."""
    with pytest.raises(ManifestError, match="is not a manifest digest"):
        check_pin(trusted, "sha256:" + "a" * 64, Path("m.json"))
    check_pin("sha256:" + "a" * 64, "sha256:" + "a" * 64, Path("m.json"))
    check_pin(None, "sha256:" + "b" * 64, Path("m.json"))
    with pytest.raises(ManifestError, match="is not the trusted"):
        check_pin("sha256:" + "a" * 64, "sha256:" + "b" * 64, Path("m.json"))


def test_a_linked_manifest_is_refused(tmp_path):
    """Guards the symbolic-link refusal removed for manifest.json: a link could point the folder's
    record of hashes anywhere."""
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(_manifest_bytes({}))
    folder = tmp_path / "engines"
    folder.mkdir()
    (folder / "manifest.json").symlink_to(elsewhere)
    with pytest.raises(ManifestError, match="is a symbolic link"):
        read_manifest(folder)
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").write_bytes(elsewhere.read_bytes())
    assert read_manifest(folder).name == "t"


def _folder_with_file(tmp_path: Path, data: bytes) -> tuple[Path, Entry]:
    entry = make_entry(CONFIG, SHAPE, files={"engine.pt2": FileInfo(hashlib.sha256(data).hexdigest(), len(data))})
    (tmp_path / entry.id).mkdir(parents=True)
    (tmp_path / entry.id / "engine.pt2").write_bytes(data)
    return tmp_path, entry


def test_a_file_that_grew_is_reported_by_its_size(tmp_path):
    """Guards the size check weakened to `size < recorded`: a file with bytes appended is refused by
    its size, before any hashing (and with that reason)."""
    folder, entry = _folder_with_file(tmp_path, b"x" * 100)
    assert check_files(entry, folder, ("engine.pt2",)) is None
    with open(folder / entry.id / "engine.pt2", "ab") as f:
        f.write(b"more")
    assert check_files(entry, folder, ("engine.pt2",)).endswith("has 104 bytes, the manifest says 100")
    (folder / entry.id / "engine.pt2").write_bytes(b"x" * 10)
    assert check_files(entry, folder, ("engine.pt2",)).endswith("has 10 bytes, the manifest says 100")


def test_an_unlisted_required_file_is_named(tmp_path):
    folder, entry = _folder_with_file(tmp_path, b"x" * 10)
    problem = check_files(entry, folder, ("engine.pt2", "model.onnx"))
    assert problem == "the manifest lists no model.onnx for this aoti entry (incomplete record)"


def test_an_expert_record_round_trips():
    record = ExpertRecord("/w", "f" * 64, "diffusers", {"num_layers": 2})
    m = Manifest("t", {"main": record}, {}, 0.9)
    back = Manifest.from_bytes(m.to_bytes(), Path("m.json"))
    assert back.experts == {"main": record} and back.boundary == 0.9 and back.digest.startswith("sha256:")


# -- the backends' rules ----------------------------------------------------------------------------
def test_tensorrt_names_the_files_each_plan_reads():
    """Guards the FP4 weights file dropped from (or misassigned in) what a weight-stripped NVFP4 plan
    must list: it is refitted from it, so the manifest must hash it."""
    from runtime.backends import backend

    trt = backend("tensorrt")
    stripped = {"strip_weights": True}
    assert set(trt.required_files(make_entry(CONFIG, SHAPE, "tensorrt", "nvfp4", options=stripped))) == {
        "engine.plan", "model.onnx", "model.onnx.data", "model.nvfp4.data"}
    assert set(trt.required_files(make_entry(CONFIG, SHAPE, "tensorrt", "fp8", options=stripped))) == {
        "engine.plan", "model.onnx", "model.onnx.data"}
    assert set(trt.required_files(make_entry(CONFIG, SHAPE, "tensorrt", "bf16", options=stripped))) == {
        "engine.plan", "model.onnx", "model.onnx.data"}
    assert set(trt.required_files(make_entry(CONFIG, SHAPE, "tensorrt", "nvfp4"))) == {"engine.plan"}


def test_onnxruntime_needs_its_weights_file_listed():
    """Guards `model.onnx.data` dropped from what an ONNX Runtime entry must list: ONNX Runtime reads
    it from the folder, so an entry whose record does not hash it would run unchecked weights."""
    from runtime.backends import backend

    assert set(backend("onnxruntime").required_files(make_entry(CONFIG, SHAPE, "onnxruntime"))) == {
        "model.onnx", "model.onnx.data"}
    assert set(backend("aoti").required_files(make_entry(CONFIG, SHAPE, "aoti"))) == {"engine.pt2"}


def test_aoti_packages_need_the_compute_capability_they_were_compiled_for():
    """Guards the compute-capability rule of AOTInductor packages inverted or dropped (Triton kernels
    are built per architecture)."""
    import runtime.manifest as manifest_module
    from runtime.backends import backend

    aoti = backend("aoti")
    versions = manifest_module.tool_versions()
    entry = make_entry(CONFIG, SHAPE, "aoti", "bf16", versions=versions,
                       device={"type": "cuda", "name": "H200", "compute_capability": "9.0"})
    cuda = torch.device("cuda")
    assert aoti.compatibility(entry, cuda, (9, 0), versions) is None
    assert aoti.compatibility(entry, cuda, (8, 9), versions) == "compiled for compute capability 9.0, this GPU is 8.9"
    assert aoti.compatibility(entry, torch.device("cpu"), None, versions) == "compiled for cuda, the model runs on cpu"
    older = {**versions, "torch": "0.0"}
    assert aoti.compatibility(entry, cuda, (9, 0), older).startswith(f"built with torch {versions['torch']}")


def test_aoti_and_onnxruntime_refuse_what_they_do_not_build():
    """Guards the NVFP4 refusal of AOTInductor and the bf16-on-CPU and fp16-on-x86 refusals of ONNX
    Runtime removed."""
    from runtime.backends import backend
    from runtime.precision import Precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backend("aoti").runs(Precision.NVFP4, cuda, (10, 0)) == "NVFP4 engines are built by the tensorrt backend only"
    assert backend("aoti").runs(Precision.FP8, cuda, (9, 0)) is None
    assert backend("aoti").runs(Precision.BF16, cpu, None) is None
    assert "no bf16 kernels" in backend("onnxruntime").runs(Precision.BF16, cpu, None)
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    fp16 = backend("onnxruntime").runs(Precision.FP16, cpu, None)
    assert (fp16 is not None and "runs fp16 graphs in fp32" in fp16) if x86 else fp16 is None
    assert backend("onnxruntime").runs(Precision.FP16, cuda, (9, 0)) == backend("onnxruntime").runs(
        Precision.FP32, cuda, (9, 0))  # on a GPU fp16 is as fp32: only the provider's presence counts
    assert backend("onnxruntime").runs(Precision.FP32, cpu, None) is None
