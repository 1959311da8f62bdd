"""Checkpoint reading rules that a planted bug slipped past: tensor sizes against their byte ranges,
shards that clash or are missing, partial community prefixes, FLF2V image tokens read off the
shapes, and the key diffusers ignores. Each test names the bug it guards."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from builder.init_weights import write_diffusers_transformer, write_safetensors
from runtime import WanTransformer, get_preset
from runtime.errors import WeightsError
from runtime.weights import load_checkpoint, read_safetensors, strip_community_prefix

from .conftest import make_inputs, relative_error


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_a_tensor_with_more_bytes_than_its_shape_is_refused(tmp_path):
    """Guards the byte-count check loosened to `numel * itemsize > nbytes`: a tensor whose byte range
    is larger than its shape needs (one float32 in 8 bytes) is a damaged header, not a tensor."""
    data = struct.pack("<ff", 1.0, 2.0)
    too_many = _raw_safetensors(tmp_path / "big.safetensors",
                                {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, data)
    with pytest.raises(WeightsError, match=r"tensor 'a' has 8 bytes for shape \[1\]"):
        read_safetensors(too_many)
    too_few = _raw_safetensors(tmp_path / "small.safetensors",
                               {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, data)
    with pytest.raises(WeightsError, match=r"tensor 'a' has 8 bytes for shape \[3\]"):
        read_safetensors(too_few)
    exact = _raw_safetensors(tmp_path / "ok.safetensors",
                             {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, data)
    assert read_safetensors(exact)["a"].tolist() == [1.0, 2.0]


def _sharded(tmp_path: Path, config) -> tuple[Path, dict[str, torch.Tensor]]:
    """A diffusers folder re-written as two shards with an index (first half / second half of names)."""
    folder = write_diffusers_transformer(tmp_path / "one", config, seed=9)
    tensors = {n: t.clone() for n, t in read_safetensors(folder / "diffusion_pytorch_model.safetensors").items()}
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    for file, members in shards.items():
        write_safetensors(out / file, {n: (tuple(tensors[n].shape), tensors[n].dtype) for n in members},
                          tensors.__getitem__)
    index = {"metadata": {}, "weight_map": {n: f for f, members in shards.items() for n in members}}
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return out, tensors


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    """Guards a removed duplicate-name check across shards: a name stored twice would silently take
    whichever shard was read last."""
    config = get_preset("tiny-t2v")
    folder, tensors = _sharded(tmp_path, config)
    assert set(load_checkpoint(folder).tensors) == set(tensors)  # the clean sharding loads
    second = folder / "model-00002-of-00002.safetensors"
    clash = sorted(tensors)[0]  # a tensor of the first shard, stored again in the second
    members = {n: t for n, t in read_safetensors(second).items()}
    members[clash] = torch.zeros_like(tensors[clash])
    members = {n: t.clone() for n, t in members.items()}
    write_safetensors(second, {n: (tuple(t.shape), t.dtype) for n, t in members.items()}, members.__getitem__)
    with pytest.raises(WeightsError, match=f"tensor {clash!r} also appears in another shard"):
        load_checkpoint(folder)


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    """Guards a removed missing-shard check: an index whose shard file is gone is named as such
    (not loaded with half its tensors, nor failing later with a confusing error)."""
    config = get_preset("tiny-t2v")
    folder, _ = _sharded(tmp_path, config)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"lists shards that are missing: .*model-00002-of-00002\.safetensors"):
        load_checkpoint(folder)


def test_a_prefix_on_only_some_keys_is_not_stripped():
    """Guards the community-prefix rule loosened from all keys to any key: stripping on a partial
    match would cut the first characters off every other name."""
    t = torch.zeros(1)
    mixed = {"model.diffusion_model.patch_embedding.weight": t, "proj_out.weight": t}
    assert strip_community_prefix(dict(mixed)) == mixed
    whole = {"model.diffusion_model.patch_embedding.weight": t, "model.diffusion_model.proj_out.weight": t}
    assert set(strip_community_prefix(whole)) == {"patch_embedding.weight", "proj_out.weight"}
    inner = {"diffusion_model.a": t, "diffusion_model.b": t}
    assert set(strip_community_prefix(inner)) == {"a", "b"}


def test_an_flf2v_single_file_reads_its_image_tokens_off_the_position_embedding(tmp_path):
    """Guards the image-token count read off the wrong axis of `pos_embed` ([1, 514, d]): an FLF2V
    single file must be recognised as its preset (514 image tokens), and run as the folder does."""
    config = get_preset("tiny-flf2v")
    folder = write_diffusers_transformer(tmp_path / "d", config, seed=5)
    single = tmp_path / "flf2v.safetensors"
    single.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    ckpt = load_checkpoint(single, preset=config)  # raises "does not match preset" if image_tokens is off
    assert ckpt.config.image_tokens == 2 * 257 and ckpt.config.image_pos_embed
    a, b = WanTransformer.from_pretrained(folder), WanTransformer.from_pretrained(single, preset="tiny-flf2v")
    x, t, ctx, image = make_inputs(config, 1, (2, 4, 6))
    with torch.no_grad():
        assert relative_error(b(x, t, ctx, image).sample, a(x, t, ctx, image).sample) < 1e-5


def test_the_key_diffusers_ignores_is_accepted_and_others_are_not(tmp_path):
    """Guards the ignored-keys filter removed (or widened): a converted I2V checkpoint holding
    `attn2.norm_added_q` loads and runs as without it; any other extra key is still refused."""
    config = get_preset("tiny-i2v")
    folder = write_diffusers_transformer(tmp_path / "w", config, seed=3)
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = {n: t.clone() for n, t in read_safetensors(path).items()}
    plain = WanTransformer.from_pretrained(folder)
    x, t, ctx, image = make_inputs(config, 1, (2, 4, 6))
    with torch.no_grad():
        want = plain(x, t, ctx, image).sample
    del plain
    extra = dict(tensors)
    extra["blocks.0.attn2.norm_added_q.weight"] = torch.ones(config.dim)
    write_safetensors(path, {n: (tuple(v.shape), v.dtype) for n, v in extra.items()}, extra.__getitem__)
    with torch.no_grad():
        got = WanTransformer.from_pretrained(folder)(x, t, ctx, image).sample
    assert relative_error(got, want) < 1e-5
    extra = dict(tensors)
    extra["blocks.0.attn2.norm_added_v.weight"] = torch.ones(config.dim)
    write_safetensors(path, {n: (tuple(v.shape), v.dtype) for n, v in extra.items()}, extra.__getitem__)
    with pytest.raises(WeightsError, match=r"1 unexpected: blocks\.0\.attn2\.norm_added_v\.weight"):
        WanTransformer.from_pretrained(folder)
