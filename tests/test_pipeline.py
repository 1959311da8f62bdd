"""Swapped into a real diffusers Wan2.2 image-to-video pipeline (two experts), nothing downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builder.init_weights import init_weights
from runtime import WanTransformer, get_preset

diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")


def _pipeline(high, low):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    return diffusers.WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None, vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), transformer=high, transformer_2=low,
        boundary_ratio=0.9)


def _frames(pipe, text_dim, output_type="np"):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, 512, text_dim, generator=g)
    negative = torch.randn(1, 512, text_dim, generator=g)
    image = PIL.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    out = pipe(image=image, prompt_embeds=prompt, negative_prompt_embeds=negative, height=32, width=32,
               num_frames=9, num_inference_steps=4, guidance_scale=5.0, output_type=output_type,
               generator=torch.Generator().manual_seed(4))
    return np.asarray(out.frames.float() if output_type == "latent" else out.frames)


@pytest.mark.slow
def test_wan22_i2v_pipeline_same_frames_with_our_transformer(tmp_path):
    config = get_preset("tiny-i2v-a14b")
    init_weights(config, tmp_path, seed=9)
    Ref = diffusers.WanTransformer3DModel
    ref_high = Ref.from_pretrained(tmp_path, subfolder="transformer").eval()
    ref_low = Ref.from_pretrained(tmp_path, subfolder="transformer_2").eval()
    high = WanTransformer.from_pretrained(tmp_path, subfolder="transformer")
    low = WanTransformer.from_pretrained(tmp_path, subfolder="transformer_2")

    # Frames, and the final latents: the tiny random VAE squashes differences in the frames
    # (a 0.01 bias change in one expert moves frames by ~1e-6 but latents by ~1e-3).
    for output_type in ("np", "latent"):
        reference = _frames(_pipeline(ref_high, ref_low), config.text_dim, output_type)
        ours = _frames(_pipeline(high, low), config.text_dim, output_type)
        assert ours.shape == reference.shape
        assert np.isfinite(ours).all() and reference.std() > 1e-3
        rel = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
        assert rel < 1e-5, (output_type, rel)
    assert _frames(_pipeline(high, low), config.text_dim).shape == (1, 9, 32, 32, 3)
    # Both experts served calls (t = 1000 goes to the high-noise one, 750..250 to the low-noise one),
    # each call with batch 1: diffusers runs cond and uncond as separate calls.
    for expert in (high, low):
        assert expert.last_route is not None and expert.last_route.backend == "eager"
        assert expert.last_route.shape.batch == 1
