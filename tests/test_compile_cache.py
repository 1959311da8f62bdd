"""The compile cache an entry carries (runtime.compile_cache): names checked, files seeded only
where missing, never outside the cache folders, whatever the bundle or the cache folder holds."""

from __future__ import annotations

import io
import zipfile

import pytest

from runtime.compile_cache import BundleError, files_under, pack, seed, unpack


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    return tmp_path / "inductor", tmp_path / "triton"


def test_pack_and_seed_round_trip(tmp_path, caches):
    inductor, triton = caches
    src = tmp_path / "src"
    (src / "ab").mkdir(parents=True)
    (src / "ab" / "cabc.so").write_bytes(b"\x7fELF kernel")
    (src / "ab" / "cabc.cpp").write_text("// source")
    (src / "locks").mkdir()
    (src / "locks" / "cabc.lock").write_text("")
    (src / "triton" / "0" / "HASH").mkdir(parents=True)
    (src / "triton" / "0" / "HASH" / "k.cubin").write_bytes(b"cubin")
    (src / "ab" / "link.so").symlink_to(src / "ab" / "cabc.so")
    data = pack(files_under(src))
    assert set(unpack(data)) == {"ab/cabc.so", "ab/cabc.cpp", "triton/0/HASH/k.cubin"}  # no locks, no links
    (inductor / "ab").mkdir(parents=True)
    (inductor / "ab" / "cabc.cpp").write_text("// already here")
    assert seed(data) == 2
    assert (inductor / "ab" / "cabc.so").read_bytes() == b"\x7fELF kernel"
    assert (inductor / "ab" / "cabc.cpp").read_text() == "// already here"  # kept
    assert (triton / "HASH" / "k.cubin").read_bytes() == b"cubin"  # into this GPU's Triton cache
    assert seed(data) == 0
    assert not list(inductor.rglob("*.tmp"))


@pytest.mark.parametrize("name", ["../escape.so", "/abs.so", "ab/../../x.so", "ab/./x.so", ".hidden/x.so",
                                  "ab//x.so", "a/b/c/d/e/f/g/h/i.so", "ab/x y.so", "ab\\x.so"])
def test_a_bundle_with_a_bad_name_writes_nothing(tmp_path, caches, name):
    inductor, triton = caches
    data = _zip({"ab/good.so": b"ok", name: b"evil"})
    with pytest.raises(BundleError, match="not a plain relative path"):
        seed(data)
    assert not (inductor / "ab" / "good.so").exists()
    assert not any(p.is_file() and p.read_bytes() == b"evil" for p in tmp_path.rglob("*"))


def test_a_link_in_the_cache_folder_does_not_send_files_elsewhere(tmp_path, caches):
    inductor, _ = caches
    outside = tmp_path / "outside"
    outside.mkdir()
    inductor.mkdir(parents=True)
    (inductor / "ab").symlink_to(outside, target_is_directory=True)
    assert seed(_zip({"ab/cabc.so": b"kernel", "cd/cdef.so": b"other"})) == 1
    assert list(outside.iterdir()) == [] and (inductor / "cd" / "cdef.so").read_bytes() == b"other"


def test_a_damaged_bundle_is_a_clear_error(caches):
    with pytest.raises(BundleError, match="not a readable zip"):
        seed(b"PK\x03\x04 truncated")
