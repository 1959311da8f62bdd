"""File hashes and the weights fingerprint as evidence: what the fingerprint covers, the size check
of the bytes about to be loaded, and the memo `fresh` bypasses. Each test names the bug it guards."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from runtime.integrity import IntegrityError, read_verified, sha256_file, weights_fingerprint


def test_the_fingerprint_covers_each_tensors_dtype():
    """Guards the dtype dropped from the fingerprint: the same bytes read as float16 or as bfloat16
    are other weights (an engine built from one must not serve the other)."""
    g = torch.Generator().manual_seed(0)
    half = torch.randn(4, 8, generator=g).half()
    as_bf16 = half.view(torch.bfloat16)  # the very same bytes
    assert weights_fingerprint({"w": half}) != weights_fingerprint({"w": as_bf16})
    assert weights_fingerprint({"w": half}) != weights_fingerprint({"w": half.view(torch.int16)})


def test_the_fingerprint_covers_names_shapes_and_values_not_order():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    base = weights_fingerprint({"a": a, "b": b})
    assert weights_fingerprint({"b": b, "a": a}) == base  # name order, not insertion order
    assert weights_fingerprint({"a": b, "b": a}) != base
    assert weights_fingerprint({"a": a.reshape(2, 3), "b": b}) != base
    assert weights_fingerprint({"a": a, "c": b}) != base
    c = a.clone()
    c[3] += 1e-6
    assert weights_fingerprint({"a": c, "b": b}) != base
    assert weights_fingerprint({"a": torch.stack([a, a], 1)[:, 0], "b": b}) == base  # a strided view: same values


def test_read_verified_names_a_short_file_by_its_size(tmp_path):
    """Guards the size check of the bytes about to be loaded weakened to "longer than recorded": a
    truncated package is refused by its size, before it is hashed."""
    data = b"compiled code " * 100
    path = tmp_path / "engine.pt2"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert read_verified(path, digest, len(data)) == data
    path.write_bytes(data[:100])
    with pytest.raises(IntegrityError, match=f"has 100 bytes, the manifest says {len(data)}"):
        read_verified(path, digest, len(data))
    path.write_bytes(data + b"!")
    with pytest.raises(IntegrityError, match=f"has {len(data) + 1} bytes, the manifest says {len(data)}"):
        read_verified(path, digest, len(data))
    path.write_bytes(data[:-1] + b"?")
    with pytest.raises(IntegrityError, match="fails its sha256 check"):
        read_verified(path, digest, len(data))


def test_fresh_rereads_a_file_the_memo_would_trust(tmp_path, monkeypatch):
    """Guards `fresh=True` ignored by `sha256_file` (the memo answering anyway): with file identities
    that cannot tell a change in place, only a fresh read sees it."""
    import runtime.integrity as integrity

    monkeypatch.setattr(integrity, "file_key", lambda p: (os.stat(p).st_ino, os.stat(p).st_size))
    integrity.forget()  # no memo of an earlier file that had this inode and size
    path = tmp_path / "f"
    path.write_bytes(b"A" * 64)
    assert sha256_file(path) == hashlib.sha256(b"A" * 64).hexdigest()
    with open(path, "r+b") as f:
        f.write(b"B")
    assert sha256_file(path) == hashlib.sha256(b"A" * 64).hexdigest()  # the memo, by design
    assert sha256_file(path, fresh=True) == hashlib.sha256(b"B" + b"A" * 63).hexdigest()
