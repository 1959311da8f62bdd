"""GGUF checkpoints: read with their weights kept quantized, against diffusers' own GGUF loader
(`from_single_file(..., quantization_config=GGUFQuantizationConfig(compute_dtype=float32))`) on the
same file; written by `wan-build gguf`; every block type dequantized against the gguf package's
reference; built into engines; and what damaged or foreign files give."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from builder.init_weights import init_weights
from runtime import WanTransformer, get_preset
from runtime.errors import InputError, WeightsError
from runtime.static import parameter_shapes
from runtime.weights import diffusers_to_original_name, load_checkpoint

from .conftest import make_inputs, relative_error
from .test_cli import wan_build

gguf = pytest.importorskip("gguf")
diffusers = pytest.importorskip("diffusers")
T = gguf.GGMLQuantizationType

# Rows of 256 values, so every block type (32 or 256 values) fits the linear layers.
CONFIG = get_preset("tiny-i2v").replace(name="gguf-i2v", num_heads=2, head_dim=128, ffn_dim=512, text_dim=256,
                                        freq_dim=256, image_dim=256)
LEGACY = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    init_weights(CONFIG, root / "w", seed=1)
    return root / "w"


def inputs():
    return make_inputs(CONFIG, 1, (2, 4, 6), text_tokens=512)


def run(model):
    x, t, ctx, image = inputs()
    with torch.no_grad():
        return model(x, t, ctx, image).sample


def diffusers_gguf(path, config_folder):
    return diffusers.WanTransformer3DModel.from_single_file(
        str(path), config=str(config_folder), torch_dtype=torch.float32,
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32)).eval()


def k_quant_blocks(shape, kind, rng):
    """Random K-quant blocks of a [rows, cols] weight, their float16 scales set to sane values (the
    gguf package cannot quantize K-quants; every bit pattern of the rest is a valid block)."""
    per, nbytes = gguf.GGML_QUANT_SIZES[T[kind]]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // per, nbytes), dtype=np.uint8)
    for offset in F16_FIELDS[kind]:
        scale = rng.uniform(5e-4, 2e-3, size=(blocks.shape[0], 1)).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8)
    return blocks.reshape(rows, cols // per * nbytes)


def write_mixed(path, folder, layout="original", prefix=""):
    """A file mixing every K-quant, the legacy types, F16 and BF16 tensors, as community files do."""
    ckpt = load_checkpoint(folder)
    rng = np.random.default_rng(0)
    kinds = K_QUANTS + LEGACY
    writer = gguf.GGUFWriter(str(path), "wan")
    used = {}
    for i, name in enumerate(sorted(parameter_shapes(ckpt.config))):
        data = ckpt.tensors[name].float().numpy()
        key = prefix + (diffusers_to_original_name(name) if layout == "original" else name)
        if name.startswith("blocks.") and name.endswith(".weight") and data.ndim == 2:
            kind = kinds[i % len(kinds)]
            q = (k_quant_blocks(data.shape, kind, rng) if kind in K_QUANTS
                 else gguf.quants.quantize(data, T[kind]))
            writer.add_tensor(key, q, raw_shape=q.shape, raw_dtype=T[kind])
        elif data.ndim == 1 and i % 3 == 0:
            kind = "F16"
            writer.add_tensor(key, data.astype(np.float16))
        elif data.ndim == 2 and i % 3 == 1:
            kind = "BF16"
            q = gguf.quants.quantize(data, T.BF16)
            writer.add_tensor(key, q, raw_shape=q.shape, raw_dtype=T.BF16)
        else:
            kind = "F32"
            writer.add_tensor(key, data)
        used[kind] = used.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return used


# -- dequantization, type by type ------------------------------------------------------------------
@pytest.mark.parametrize("kind", LEGACY + K_QUANTS)
def test_every_block_type_dequantizes_as_the_gguf_reference(kind):
    from runtime.gguf import dequantize

    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    raw = k_quant_blocks(x.shape, kind, rng) if kind in K_QUANTS else gguf.quants.quantize(x, T[kind])
    reference = gguf.quants.dequantize(raw, T[kind])
    got = dequantize(torch.from_numpy(raw), int(T[kind]), torch.float32).numpy()
    assert got.shape == reference.shape == (8, 512)
    # the block scales meet the values in float16 here (as in diffusers), in float32 in the gguf package:
    # they differ by float16 rounding, never by a misplaced bit (that would be of the order of the values)
    assert np.abs(got - reference).max() <= 2e-3 * np.abs(reference).max()
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 1e-3


# -- reading ------------------------------------------------------------------------------------------
def test_a_file_of_mixed_types_gives_diffusers_output_with_its_weights_kept_quantized(weights, tmp_path):
    path = tmp_path / "mixed.gguf"
    used = write_mixed(path, weights)
    assert set(K_QUANTS + LEGACY) <= set(used) and {"F16", "BF16", "F32"} <= set(used)
    ours = WanTransformer.from_pretrained(path)
    assert ours.wan_config.same_structure(CONFIG) and ours.gguf
    expected = run(diffusers_gguf(path, weights))
    got = run(ours)
    assert relative_error(got, expected) < 1e-5
    assert relative_error(got, run(WanTransformer.from_pretrained(weights))) > 1e-2  # quantized: another model
    # kept quantized: the linear weights are their blocks (uint8), about the file's size in all
    held = sum(p.numel() * p.element_size() for p in ours.parameters())
    full = sum(p.numel() * 4 for p in WanTransformer.from_pretrained(weights).parameters())
    assert held < 1.15 * path.stat().st_size and held < 0.5 * full
    # the same tensors under diffusers names with a community prefix: the same model
    other = tmp_path / "mixed-diffusers.gguf"
    write_mixed(other, weights, layout="diffusers", prefix="model.diffusion_model.")
    assert relative_error(run(WanTransformer.from_pretrained(other)), got) < 1e-6


def test_the_patch_embedding_shape_convention_of_comfyui_files_is_restored(weights, tmp_path):
    """Tensors over 4-D stored flattened, with `comfy.gguf.orig_shape.<name>` (ComfyUI-GGUF)."""
    ckpt = load_checkpoint(weights)
    writer = gguf.GGUFWriter(str(tmp_path / "c.gguf"), "wan")
    for name in sorted(parameter_shapes(ckpt.config)):
        data = ckpt.tensors[name].float().numpy()
        key = diffusers_to_original_name(name)
        if data.ndim == 5:
            writer.add_array("comfy.gguf.orig_shape." + key, list(data.shape))
            data = data.reshape(data.shape[0], -1)
        writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert relative_error(run(WanTransformer.from_pretrained(tmp_path / "c.gguf")),
                          run(WanTransformer.from_pretrained(weights))) < 1e-6


# -- writing --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q4_0"])
def test_wan_build_gguf_writes_what_diffusers_and_we_read(weights, tmp_path, kind):
    out = tmp_path / f"m-{kind}.gguf"
    r = wan_build("gguf", str(weights), "--type", kind, "--out", str(out))
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blocks.0.self_attn.q.weight"] == kind and types["blocks.1.ffn.0.weight"] == kind
    assert types["blocks.0.norm3.weight"] == "F32" and types["head.modulation"] == "F32"
    assert types["patch_embedding.weight"] == "F32" and types["time_embedding.0.weight"] == "F32"
    ours = run(WanTransformer.from_pretrained(out))
    assert relative_error(ours, run(diffusers_gguf(out, weights))) < 1e-5
    error = relative_error(ours, run(WanTransformer.from_pretrained(weights)))
    assert 1e-4 < error < {"Q8_0": 2e-2, "Q5_0": 1e-1, "Q4_0": 2e-1}[kind], error
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_gguf_requests_and_files_are_one_line(weights, tmp_path):
    r = wan_build("gguf", str(weights), "--type", "Q4_K", "--out", str(tmp_path / "k.gguf"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "Q8_0" in r.stderr and "K-quants" in r.stderr
    assert not (tmp_path / "k.gguf").exists()
    good = tmp_path / "good.gguf"
    assert wan_build("gguf", str(weights), "--type", "Q8_0", "--out", str(good)).returncode == 0
    # truncated (a download cut short)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cut.gguf.*(truncated|damaged)"):
        WanTransformer.from_pretrained(cut)
    # another architecture
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightsError, match="architecture 'llama', not a Wan transformer"):
        WanTransformer.from_pretrained(tmp_path / "llama.gguf")
    # the wrong preset, LoRAs and FP8 on quantized weights
    with pytest.raises(WeightsError, match="does not match preset"):
        WanTransformer.from_pretrained(good, preset="wan2.1-t2v-14b")
    with pytest.raises(InputError, match="GGUF"):
        WanTransformer.from_pretrained(good, loras=[tmp_path / "x.safetensors"])
    with pytest.raises(InputError, match="GGUF"):
        WanTransformer.from_pretrained(good).set_loras([])
    r = wan_build("gguf", str(weights), "--type", "Q8_0", "--out", str(tmp_path))
    assert r.returncode != 0 and "folder" in r.stderr and "Traceback" not in r.stderr


# -- engines from a GGUF file ---------------------------------------------------------------------------
def test_an_engine_built_from_a_gguf_file_serves_its_dequantized_weights(weights, tmp_path):
    from builder.build import build
    from builder.profiles import load_profile

    path = tmp_path / "m.gguf"
    assert wan_build("gguf", str(weights), "--type", "Q4_0", "--out", str(path)).returncode == 0
    (tmp_path / "p.yaml").write_text(f"name: g\nmodel: {{weights: {path}}}\nprecision: fp32\nbackends: onnxruntime\n"
                                     "shapes:\n  - {frames: 5, height: 32, width: 48}\ndevice: cpu\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "engines", echo=lambda s: None)
    assert [r.status for r in report.results] == ["built"], "\n".join(report.table())
    served = WanTransformer.from_pretrained(path, engines=tmp_path / "engines")
    eager = WanTransformer.from_pretrained(path)
    got = run(served)
    assert served.last_route.backend == "onnxruntime"
    assert relative_error(got, run(eager)) < 1e-5
    x, t, ctx, image = inputs()  # a transposed latent view and an expanded image context
    strided, expanded = x.transpose(3, 4).contiguous().transpose(3, 4), image[:, :1].expand(-1, image.shape[1], -1)
    with torch.no_grad():
        a, b = served(strided, t, ctx, expanded).sample, eager(strided, t, ctx, expanded).sample
    assert served.last_route.backend == "onnxruntime" and relative_error(a, b) < 1e-5
    manifest = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    assert next(iter(manifest["experts"].values()))["weights"].endswith("m.gguf")
