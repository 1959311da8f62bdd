"""bf16 against diffusers, measured both ways.

Measured on the CPU (torch 2.13, tiny presets, 3 seeds each; mid-i2v too):
- ours bf16 vs diffusers fp32:      5.4e-3 .. 6.8e-3
- diffusers bf16 vs diffusers fp32: 5.4e-3 .. 6.8e-3
- ours bf16 vs diffusers bf16:      0 (16-channel inputs; bit-identical) .. 4.9e-3 (36-channel inputs,
  where our patch embedding is a matmul and diffusers' a Conv3d, which round differently in bf16)
Tolerances below come from those figures: 1e-2 against either reference, and our error against fp32
no more than 15% above diffusers' own bf16 error (measured: at most 6.4% above).
"""

from __future__ import annotations

import pytest
import torch

from runtime import WanTransformer, get_preset

from .conftest import make_inputs, reference_model, relative_error

BF16_TOLERANCE = 1e-2


def _bf16(t):
    return None if t is None else t.to(torch.bfloat16)


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v", "tiny-ti2v"])
def test_bf16_error_against_diffusers(checkpoints, preset):
    config = get_preset(preset)
    ref32 = reference_model(checkpoints[preset])
    ref16 = reference_model(checkpoints[preset], torch.bfloat16)
    ours = WanTransformer.from_pretrained(checkpoints[preset], torch_dtype=torch.bfloat16)
    x, t, ctx, image = make_inputs(config, 2, (3, 6, 10), seed=11, per_token=config.per_token_timesteps)
    with torch.no_grad():
        exact = ref32(x, t, ctx, image).sample
        theirs = ref16(_bf16(x), t, _bf16(ctx), _bf16(image)).sample
        out = ours(_bf16(x), t, _bf16(ctx), _bf16(image)).sample
    assert out.dtype == torch.bfloat16
    ours_vs_fp32, theirs_vs_fp32 = relative_error(out, exact), relative_error(theirs, exact)
    assert ours_vs_fp32 < BF16_TOLERANCE
    assert relative_error(out, theirs) < BF16_TOLERANCE
    assert ours_vs_fp32 <= 1.15 * theirs_vs_fp32
    assert ours_vs_fp32 > 1e-4  # it really ran in bf16
