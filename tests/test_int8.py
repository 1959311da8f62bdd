"""INT8 linear layers (W8A8, `runtime.int8`): the int32-accumulated product equals the same integers
dequantized in fp32; the recipe's layers only; the front's `quantize="int8"` against the unquantized
model, in fp32 and bf16; and what it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from builder.init_weights import init_weights
from runtime import WanTransformer, get_preset
from runtime.errors import InputError
from runtime.int8 import Int8Linear, int8_reference, quantize_rows

from .conftest import make_inputs, relative_error

CONFIG = get_preset("tiny-t2v").replace(num_layers=4)


def test_the_int8_product_is_the_integers_dequantized():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (48,)
    x = torch.randn(3, 40, 64)
    out = layer(x)
    assert out.shape == (3, 40, 48) and out.dtype == torch.float32
    assert relative_error(out, int8_reference(layer, x)) < 1e-6  # int32 accumulation is exact
    assert 1e-4 < relative_error(out, linear(x)) < 2e-2  # 8-bit weights and activations
    q, scale = quantize_rows(x)
    assert q.abs().max() <= 127 and relative_error(q.float() * scale, x) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantize_int8_on_the_front(tmp_path, dtype):
    init_weights(CONFIG, tmp_path, seed=2)
    base = WanTransformer.from_pretrained(tmp_path, dtype)
    model = WanTransformer.from_pretrained(tmp_path, dtype, quantize="int8")
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    # the FP8 recipe's layers: blocks 1 and 2 of 4 (one kept at each end for so small a model)
    assert kinds["blocks.1.attn1.to_q"] == "Int8Linear" and kinds["blocks.2.ffn.net.2"] == "Int8Linear"
    assert kinds["blocks.0.attn1.to_q"] == "Linear" and kinds["blocks.3.attn2.to_k"] == "Linear"
    x, t, ctx, _ = make_inputs(CONFIG, 1, (2, 4, 6))
    with torch.no_grad():
        out = model(x.to(dtype), t, ctx.to(dtype)).sample
        ref = base(x.to(dtype), t, ctx.to(dtype)).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    # measured on this tiny model: 4.9e-3 (fp32) and 7.5e-3 (bf16) against the unquantized model
    assert 1e-4 < relative_error(out, ref) < 2e-2
    assert model.last_route.backend == "eager"
    assert model.get_submodule("blocks.1.attn1.to_q").weight_scale.dtype == torch.float32
    with pytest.raises(InputError, match="INT8"):
        model.set_loras([])
    with pytest.raises(InputError, match="quantized already"):
        model.quantize_int8()
    with pytest.raises(InputError, match="int8"):
        WanTransformer.from_pretrained(tmp_path, torch.float16, quantize="int8")


def test_an_int8_aoti_entry_serves_the_int8_front(tmp_path):
    """`precision: int8` with AOTInductor: the recipe's layers W8A8 in the package (torch._int_mm),
    bf16 elsewhere; the engine serves the front loaded with quantize="int8", and equals it."""
    from builder.build import build
    from builder.profiles import load_profile

    config = CONFIG.replace(num_layers=3)  # block 1 in int8 (one kept at each end); three compile faster
    init_weights(config, tmp_path / "w", seed=2)
    (tmp_path / "p.yaml").write_text(f"name: i8\nmodel: {{weights: {tmp_path / 'w'}}}\nprecision: int8\n"
                                     "backends: [aoti, onnxruntime]\nshapes:\n  - {frames: 5, height: 32, width: 48}\n"
                                     "text_tokens: 16\ndevice: cpu\n")
    report = build(load_profile(tmp_path / "p.yaml"), tmp_path / "engines", echo=lambda s: None)
    statuses = {r.entry.backend: (r.status, r.message) for r in report.results}
    assert statuses["aoti"][0] == "built", statuses
    assert statuses["onnxruntime"][0] == "skipped" and "aoti" in statuses["onnxruntime"][1]
    entry = next(r for r in report.results if r.entry.backend == "aoti")
    assert entry.relative_error < 5e-2
    served = WanTransformer.from_pretrained(tmp_path / "w", torch.bfloat16, quantize="int8", engines=tmp_path / "engines")
    eager = WanTransformer.from_pretrained(tmp_path / "w", torch.bfloat16, quantize="int8")
    x, t, ctx, _ = make_inputs(config, 1, (2, 4, 6), text_tokens=16)
    with torch.no_grad():
        got = served(x.bfloat16(), t, ctx.bfloat16()).sample
        ref = eager(x.bfloat16(), t, ctx.bfloat16()).sample
    assert served.last_route.backend == "aoti" and served.precision == "int8"
    assert relative_error(got, ref) < 2e-2  # bf16 around the same integers; fusions round elsewhere
    # what callers pass: a transposed latent view and an expanded text context, on the engine and eager
    strided = x.bfloat16().transpose(3, 4).contiguous().transpose(3, 4)
    expanded = ctx[:, :1].bfloat16().expand(-1, ctx.shape[1], -1)
    assert not strided.is_contiguous() and expanded.stride(1) == 0
    with torch.no_grad():
        got = served(strided, t, expanded).sample
        ref = eager(strided.contiguous(), t, expanded.contiguous()).sample
    assert served.last_route.backend == "aoti" and relative_error(got, ref) < 2e-2
    # the unquantized bf16 front is not served by the int8 entry
    plain = WanTransformer.from_pretrained(tmp_path / "w", torch.bfloat16, engines=tmp_path / "engines")
    with torch.no_grad():
        plain(x.bfloat16(), t, ctx.bfloat16())
    assert plain.last_route.backend == "eager" and "int8" in plain.last_route.reason


# -- INT4 weight-only -------------------------------------------------------------------------------
def test_int4_layers_are_torchs_packed_matmul_of_their_dequantized_weights():
    from runtime.int4 import Int4Linear, pack_pairs, quantize_groups, unpack_pairs

    torch.manual_seed(0)
    linear = nn.Linear(256, 96).bfloat16()
    layer = Int4Linear.from_linear(linear)
    q, _ = quantize_groups(linear.weight)
    assert torch.equal(unpack_pairs(pack_pairs(q)), q) and q.max() <= 15
    assert layer.weight.shape == (96, 128) and layer.weight_scale_and_zeros.shape == (2, 96, 2)
    x = torch.randn(2, 40, 256).bfloat16()
    out = layer(x)
    assert not layer._kernel_failed  # torch's kernel ran, not the fallback
    reference = (torch.nn.functional.linear(x.float(), layer.dequantized()) + layer.bias.float())
    assert relative_error(out, reference) < 1e-2  # bf16 output of the same product
    assert 1e-2 < relative_error(layer.dequantized(), linear.weight) < 0.2  # 4-bit groups of 128
    with pytest.raises(Exception, match="multiple"):
        Int4Linear(100, 8)


def test_quantize_int4_on_the_front(tmp_path):
    config = CONFIG.replace(num_heads=2, head_dim=128, ffn_dim=256)  # rows of whole 128-value groups
    init_weights(config, tmp_path, seed=2)
    base = WanTransformer.from_pretrained(tmp_path, torch.bfloat16)
    model = WanTransformer.from_pretrained(tmp_path, torch.bfloat16, quantize="int4")
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["blocks.1.attn1.to_q"] == "Int4Linear" and kinds["blocks.0.attn1.to_q"] == "Linear"
    x, t, ctx, _ = make_inputs(config, 1, (2, 4, 6))
    with torch.no_grad():
        out = model(x.bfloat16(), t, ctx.bfloat16()).sample
        ref = base(x.bfloat16(), t, ctx.bfloat16()).sample
    assert torch.isfinite(out).all() and 1e-3 < relative_error(out, ref) < 0.2
    held = sum(p.numel() * p.element_size() for p in model.get_submodule("blocks.1").parameters())
    full = sum(p.numel() * p.element_size() for p in base.get_submodule("blocks.1").parameters())
    assert held < 0.4 * full
    with pytest.raises(InputError, match="bf16"):
        WanTransformer.from_pretrained(tmp_path, torch.float32, quantize="int4")
