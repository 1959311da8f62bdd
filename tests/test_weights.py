"""Checkpoint loading: both layouts, sharded files, single files, memory mapping, clear errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from builder.init_weights import write_diffusers_transformer, write_safetensors
from runtime import WanTransformer, get_preset
from runtime.errors import WanBuildError, WeightsError
from runtime.static import parameter_shapes
from runtime.weights import load_checkpoint, read_safetensors

from .conftest import make_inputs, reference_model, relative_error

# diffusers -> original Wan names, transcribed from the model card (section 6) independently of
# runtime/weights.py, and checked below against diffusers' own converter.
_TOP = [
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("proj_out", "head.head"),
]
_BLOCK = [
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
    ("attn1.to_", "self_attn."), ("attn1.norm_", "self_attn.norm_"),
    ("attn2.add_k_proj", "cross_attn.k_img"), ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"),
    ("attn2.to_", "cross_attn."), ("attn2.norm_", "cross_attn.norm_"),
    ("norm2", "norm3"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("scale_shift_table", "modulation"),
]


def to_original(name: str) -> str:
    if name == "scale_shift_table":
        return "head.modulation"
    m = re.match(r"blocks\.(\d+)\.(.*)", name)
    if m:
        rest = m.group(2)
        for new, old in _BLOCK:
            if rest.startswith(new):
                return f"blocks.{m.group(1)}.{old}{rest[len(new):]}"
        return name
    for new, old in _TOP:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def original_config(config, model_type: str) -> dict:
    return {"_class_name": "WanModel", "model_type": model_type, "dim": config.dim, "ffn_dim": config.ffn_dim,
            "freq_dim": config.freq_dim, "in_dim": config.in_channels, "out_dim": config.out_channels,
            "num_heads": config.num_heads, "num_layers": config.num_layers, "text_len": 512,
            "text_dim": config.text_dim, "eps": config.eps, "patch_size": list(config.patch_size),
            "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True}


@pytest.mark.parametrize("preset,model_type", [("tiny-i2v", "i2v"), ("tiny-flf2v", "flf2v"), ("tiny-ti2v", "ti2v")])
def test_original_layout_folder_matches_diffusers_layout(tmp_path, preset, model_type):
    config = get_preset(preset)
    diffusers_dir = write_diffusers_transformer(tmp_path / "diffusers", config, seed=3)
    original_dir = write_diffusers_transformer(tmp_path / "original", config, seed=3, rename=to_original,
                                               extra_config=original_config(config, model_type))
    names = [to_original(n) for n in parameter_shapes(config)]
    assert any(n.startswith("blocks.0.cross_attn.") for n in names) and "head.modulation" in names

    # The transcribed table agrees with diffusers' own original -> diffusers converter.
    convert = pytest.importorskip("diffusers.loaders.single_file_utils").convert_wan_transformer_to_diffusers
    converted = convert({n: None for n in names if n != "img_emb.emb_pos"})
    assert set(converted) == set(parameter_shapes(config)) - {"condition_embedder.image_embedder.pos_embed"}

    a = WanTransformer.from_pretrained(diffusers_dir)
    b = WanTransformer.from_pretrained(original_dir)
    assert b.wan_config.name == preset  # structure recognised as the preset
    x, t, ctx, image = make_inputs(config, 2, (3, 6, 10), per_token=config.per_token_timesteps)
    with torch.no_grad():
        out_a, out_b = a(x, t, ctx, image).sample, b(x, t, ctx, image).sample
        ref = reference_model(diffusers_dir)(x, t, ctx, image).sample
    # Other files, other memory alignment: kernels may take other paths, so not bit-exact across CPUs
    # (2.5e-7 seen on AMD EPYC); the fp32 tolerance. A misnamed or misplaced tensor is off by ~1.
    assert relative_error(out_b, out_a) < 1e-5
    assert relative_error(out_b, ref) < 1e-5


def test_single_file_with_community_prefix(tmp_path):
    config = get_preset("tiny-i2v")
    folder = write_diffusers_transformer(tmp_path / "d", config, seed=4)
    tensors = read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    single = tmp_path / "wan_i2v_community.safetensors"
    shapes = {"model.diffusion_model." + to_original(n): (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    by_name = {"model.diffusion_model." + to_original(n): t for n, t in tensors.items()}
    write_safetensors(single, shapes, by_name.__getitem__)
    a = WanTransformer.from_pretrained(folder)
    b = WanTransformer.from_pretrained(single, preset="tiny-i2v")
    x, t, ctx, image = make_inputs(config, 1, (2, 4, 6))
    with torch.no_grad():
        # not bit-exact across CPUs: another file, another alignment (see above)
        assert relative_error(b(x, t, ctx, image).sample, a(x, t, ctx, image).sample) < 1e-5
    # Without a preset the config is read off the shapes; head_dim must then be given by the preset,
    # so the tiny model (head_dim 24) is recognised only with it.
    with pytest.raises(WeightsError, match="does not match preset tiny-t2v"):
        WanTransformer.from_pretrained(single, preset="tiny-t2v")


def test_sharded_diffusers_checkpoint(tmp_path):
    ref = reference_model(write_diffusers_transformer(tmp_path / "one", get_preset("tiny-t2v"), seed=5))
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert list((tmp_path / "sharded").glob("*.index.json"))
    model = WanTransformer.from_pretrained(tmp_path / "sharded")
    x, t, ctx, _ = make_inputs(get_preset("tiny-t2v"), 2, (2, 4, 4), text_tokens=20)
    with torch.no_grad():
        assert relative_error(model(x, t, ctx).sample, ref(x, t, ctx).sample) < 1e-5


def test_tensors_are_memory_mapped_not_copied(tmp_path):
    """fp32 checkpoint loaded as fp32 on the CPU: every parameter is a view into the file's mapping."""
    folder = write_diffusers_transformer(tmp_path / "m", get_preset("tiny-t2v"), seed=6)
    model = WanTransformer.from_pretrained(folder)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1  # one storage: the memory map of the single file
    size = os.path.getsize(folder / "diffusion_pytorch_model.safetensors")
    assert model.patch_embedding.weight.untyped_storage().nbytes() == size
    # Casting makes the one necessary copy, per tensor, and keeps diffusers' float32 modules.
    bf16 = WanTransformer.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert bf16.blocks[0].scale_shift_table.dtype == torch.float32
    assert bf16.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert bf16.blocks[0].norm2.weight.dtype == torch.float32
    assert bf16.condition_embedder.time_proj.weight.dtype == torch.bfloat16


def test_missing_and_unexpected_keys_listed_in_one_error(tmp_path):
    config = get_preset("tiny-t2v")
    folder = write_diffusers_transformer(tmp_path / "k", config, seed=1)
    tensors = read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    del tensors["blocks.1.attn2.to_k.weight"], tensors["proj_out.bias"]
    tensors["blocks.0.extra.weight"] = torch.zeros(3)
    tensors["blocks.0.attn1.to_q.bias"] = torch.zeros(5)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors",
                      {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, tensors.__getitem__)
    with pytest.raises(WeightsError) as e:
        WanTransformer.from_pretrained(folder)
    msg = str(e.value)
    for part in ("2 missing", "blocks.1.attn2.to_k.weight", "proj_out.bias", "1 unexpected", "blocks.0.extra.weight",
                 "wrong shape", "blocks.0.attn1.to_q.bias [5]"):
        assert part in msg


def test_pickle_is_never_loaded(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(get_preset("tiny-t2v").to_diffusers()))
    marker = tmp_path / "pwned"
    # A pickle that would create a file if unpickled.
    import pickle

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(WeightsError, match="pickle"):
        WanTransformer.from_pretrained(folder)
    with pytest.raises(WeightsError, match="pickle"):
        WanTransformer.from_pretrained(folder / "diffusion_pytorch_model.bin")
    assert not marker.exists()


@pytest.mark.parametrize("make,match", [
    (lambda d: None, "no such file"),
    (lambda d: d.mkdir(), "no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{not json")), "not valid JSON"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"_class_name": "AutoencoderKLWan"}')),
     "not a WanTransformer3DModel"),
    (lambda d: (d.mkdir(), (d / "model_index.json").write_text("{}")), "pipeline folder"),
])
def test_bad_paths_give_clear_errors(tmp_path, make, match):
    target = tmp_path / "x"
    make(target)
    with pytest.raises(WanBuildError, match=match):
        load_checkpoint(target)


def test_truncated_file_is_refused(tmp_path):
    folder = write_diffusers_transformer(tmp_path / "t", get_preset("tiny-t2v"), seed=1)
    path = folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="past the end"):
        WanTransformer.from_pretrained(folder)


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v", "mid-i2v"])
def test_skeleton_has_the_parameters_of_a_real_model(preset):
    """`parameter_shapes` builds without initial values; names, shapes and dtypes equal a model built
    the ordinary way, and an nn.Linear made outside the skeleton (another thread) is initialized."""
    import threading

    from runtime.static import add_parameters, skeleton

    config = get_preset(preset)
    real = torch.nn.Module()
    add_parameters(real, config)
    assert {n: p.shape for n, p in real.named_parameters()} == parameter_shapes(config)
    made = {}
    with skeleton():
        module = torch.nn.Module()
        add_parameters(module, config)
        worker = threading.Thread(target=lambda: made.update(linear=torch.nn.Linear(64, 64)))
        worker.start()
        worker.join()
    assert {n: (p.shape, p.dtype) for n, p in module.named_parameters()} == \
        {n: (p.shape, p.dtype) for n, p in real.named_parameters()}
    assert all(p.is_meta for p in module.parameters())
    weight = made["linear"].weight  # torch's default init: uniform within 1/sqrt(64)
    assert weight.device.type == "cpu" and weight.abs().max() <= 1 / 8 and weight.std() > 0.03
