"""FP8 linear layers: the math (torch emulates the FP8 matmul on the CPU), the recipe, the refusals."""

from __future__ import annotations

import pytest
import torch

from builder.init_weights import init_weights
from runtime import StaticShape, StaticWanTransformer, WanTransformer, get_preset
from runtime.fp8 import Fp8Linear, Fp8Unsupported, fp8_layer_names, kept_blocks

from .conftest import make_inputs, relative_error


def fp8_by_the_book(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scaling: str) -> torch.Tensor:
    """What an FP8 linear layer computes, written out here (not through runtime.fp8): scale each row
    (rowwise: x per token, W per output channel) or the whole tensor so its largest magnitude is
    E4M3's 448, round to E4M3 with torch's own float8_e4m3fn cast, multiply the dequantized values
    in float64, add the bias."""
    def dequantized(t: torch.Tensor, rowwise: bool) -> torch.Tensor:
        t = t.double()
        amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
        scale = amax / 448.0
        return (t / scale).float().to(torch.float8_e4m3fn).double() * scale

    rowwise = scaling == "rowwise"
    x2 = x.reshape(-1, x.shape[-1])
    out = dequantized(x2, rowwise) @ dequantized(weight, rowwise).T + bias.double()
    return out.reshape(*x.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("scaling", ["rowwise", "tensor"])
def test_fp8_linear_matches_fp8_arithmetic_written_out(scaling):
    """Fp8Linear against the FP8 arithmetic computed independently (above). Measured: 1.8e-3
    (rowwise) and 1.5e-3 (per tensor), exactly the bf16 rounding of the float64 reference; bound
    4e-3 (the other scaling is 3.7e-2 away). Guards against
    scales taken over the wrong axis or inverted, per-tensor and rowwise scaling swapped, E4M3's
    range misused (a wrong 448), the bias dropped or rounded twice, and x / W swapped in the matmul."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    with torch.no_grad():  # rows of very different size, so per-row and per-tensor scales differ
        linear.weight.mul_(torch.logspace(-1, 1, 48, dtype=torch.float32)[:, None].to(torch.bfloat16))
    layer = Fp8Linear.from_linear(linear, scaling)
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.shape == ((1, 48) if scaling == "rowwise" else ())
    x = (torch.randn(2, 7, 64) * torch.logspace(-1, 1, 7)[None, :, None]).to(torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, 7, 48) and out.dtype == torch.bfloat16
    expected = fp8_by_the_book(x, linear.weight, linear.bias, scaling)
    assert relative_error(out, expected) < 4e-3
    other = fp8_by_the_book(x, linear.weight, linear.bias, "tensor" if scaling == "rowwise" else "rowwise")
    assert relative_error(other, expected) > 1e-2  # the two scalings differ by more than the bound
    error = relative_error(out, linear(x))
    assert 1e-3 < error < 0.08  # E4M3 keeps 3 mantissa bits: a few percent per layer


def test_fp8_linear_by_hand():
    """A 2 x 3 layer whose values E4M3 holds exactly once scaled (rowwise: W row 0 by 1, row 1 by
    4 / 448; x by 2 / 448), so the output is the exact product, computed by hand. Guards against
    any scale applied wrongly, which would move these round numbers, and the bias passing through
    FP8 (kept 16-bit: E4M3 would round -0.53125 to -0.5)."""
    linear = torch.nn.Linear(3, 2).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[448.0, -224.0, 0.5], [1.0, 2.0, -4.0]]))
        linear.bias.copy_(torch.tensor([1.0, -0.53125]))  # bf16 holds it, E4M3 does not (it would be -0.5)
    layer = Fp8Linear.from_linear(linear, "rowwise")
    assert torch.equal(layer.weight.float(), torch.tensor([[448.0, -224.0, 0.5], [112.0, 224.0, -448.0]]))
    assert layer.weight_scale.flatten().tolist() == pytest.approx([1.0, 4 / 448])
    x = torch.tensor([[0.5, -1.0, 2.0], [2.0, 0.25, 0.0]]).to(torch.bfloat16)
    # row 0: 0.5 * 448 + 224 + 1 + 1 = 450 and 0.5 - 2 - 8 - 0.53125 = -10.03125
    # row 1: 2 * 448 - 0.25 * 224 + 0 + 1 = 841 and 2 + 0.5 + 0 - 0.53125 = 1.96875
    expected = torch.tensor([[450.0, -10.03125], [841.0, 1.96875]]).to(torch.bfloat16)
    assert torch.allclose(layer(x).float(), expected.float(), rtol=2 ** -8, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("scaling", ["rowwise", "tensor"])
def test_fused_activation_quantization_equals_the_plain_one(scaling):
    """The compiled quantizer the CUDA path uses computes the same FP8 values and scales (compiled
    here for the CPU: the same graph, Inductor's C++ instead of Triton)."""
    from runtime import fp8

    plain = fp8._rows if scaling == "rowwise" else fp8._tensor
    torch.manual_seed(0)
    x = (torch.randn(300, 512) * torch.logspace(-2, 2, 300)[:, None]).to(torch.bfloat16)
    q, scale = fp8.fused(plain)(x)
    q_ref, scale_ref = plain(x)
    assert scale.shape == scale_ref.shape and torch.equal(scale, scale_ref)
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
    assert same > 0.999, same  # x / s vs x * (1 / s) may round a rare value to the neighbouring code
    assert (q.float() - q_ref.float()).abs().max().item() <= 32  # at most one E4M3 step (32 at 448)


@pytest.mark.slow
def test_fused_quantizer_serves_many_shapes_without_hitting_the_recompile_limit():
    """Every resolution brings new row counts; the compiled quantizer must keep answering (torch
    stops a fullgraph function after 8 recompiles) and equal the plain one."""
    from runtime import fp8

    fp8._compiled.clear()
    fp8._failed.clear()
    for rows in (512, 700, 1000, 1300, 2048, 2500, 3000, 3333, 4000, 4500, 5000):
        for features in (64, 96):
            x = torch.randn(rows, features).to(torch.bfloat16)
            q, scale = fp8.fused_call(fp8._rows, x)
            assert torch.equal(scale, fp8._rows(x)[1])
    assert fp8._rows not in fp8._failed


def test_recipe_keeps_first_and_last_blocks():
    """Guards against a wrong kept-block count: the recipe keeps three blocks at each end, fewer for
    small models, as many as still leave at least one block FP8 (odd layer counts included)."""
    assert kept_blocks(40) == 3 and kept_blocks(30) == 3 and kept_blocks(4) == 1 and kept_blocks(2) == 0
    for n in range(1, 12):
        assert kept_blocks(n) == max(k for k in range(4) if n - 2 * k >= 1), n
    config = get_preset("tiny-t2v").replace(num_layers=8)
    with torch.device("meta"):
        model = StaticWanTransformer(config, StaticShape(1, 1, 2, 2, 8))
    names = fp8_layer_names(model, 8)
    assert {n.split(".")[1] for n in names} == {"3", "4"}
    assert len(names) == 20 and all("condition_embedder" not in n and "proj_out" not in n for n in names)
    assert "blocks.3.ffn.net.0.proj" in names and "blocks.4.attn2.to_k" in names


def test_fp8_is_refused_on_the_cpu(tmp_path):
    init_weights(get_preset("tiny-t2v"), tmp_path, seed=1)
    with pytest.raises(Fp8Unsupported, match=r"fp8 needs an NVIDIA GPU of compute capability 8.9 or newer \(Ada, Hopper, Blackwell\); this is cpu"):
        WanTransformer.from_pretrained(tmp_path, torch.bfloat16, quantize="fp8")
    with pytest.raises(Exception, match="use quantize='fp8' with torch_dtype=torch.bfloat16"):
        WanTransformer.from_pretrained(tmp_path, quantize="fp8")


def test_fp8_front_and_static_models_share_quantized_weights(tmp_path):
    config = get_preset("tiny-t2v").replace(num_layers=8)
    init_weights(config, tmp_path, seed=2)
    model = WanTransformer.from_pretrained(tmp_path, torch.bfloat16)
    x, t, ctx, _ = make_inputs(config, 1, (2, 4, 6), text_tokens=16)
    with torch.no_grad():
        bf16 = model(x.bfloat16(), t, ctx.bfloat16()).sample
        names = model.quantize_fp8(check_device=False)  # emulated on the CPU
        fp8 = model(x.bfloat16(), t, ctx.bfloat16()).sample
    assert len(names) == 20
    static = model._eager[model.last_route.shape]
    assert static.blocks[3].attn1.to_q.weight.data_ptr() == model.blocks[3].attn1.to_q.weight.data_ptr()
    assert isinstance(static.blocks[0].attn1.to_q, torch.nn.Linear)  # first blocks stay bf16
    error = relative_error(fp8, bf16)
    assert 1e-3 < error < 0.1
