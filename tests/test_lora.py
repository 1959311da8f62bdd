"""LoRA files merged at load and swapped in place, against diffusers' own Wan LoRA loader (PEFT
adapters on WanTransformer3DModel, set_adapters for strengths), fp32, relative error under 1e-5."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from runtime import WanTransformer, get_preset
from runtime.errors import WeightsError
from runtime.static import parameter_shapes

from .conftest import make_inputs, reference_model, relative_error

pytest.importorskip("peft")
from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

LATENT = (2, 4, 6)
TEXT = 16
BLOCK_MODULES = {  # diffusers name inside a block -> original Wan name
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
IMAGE_MODULES = {"attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img"}


def make_lora(config, path: Path, layout: str, rank: int = 4, seed: int = 0, alpha: float | None = None,
              bias: bool = False, image: bool = False) -> Path:
    """A random LoRA on every linear layer of every block, written in `layout`."""
    g = torch.Generator().manual_seed(seed)
    shapes = parameter_shapes(config)
    modules = {**BLOCK_MODULES, **(IMAGE_MODULES if image else {})}
    tensors = {}
    for i in range(config.num_layers):
        for ours, original in modules.items():
            out, inp = shapes[f"blocks.{i}.{ours}.weight"]
            down = torch.randn(rank, inp, generator=g) * 0.1
            up = torch.randn(out, rank, generator=g) * 0.1
            if layout == "diffusers":
                stem = f"transformer.blocks.{i}.{ours}"
                tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = down, up
                if bias:
                    tensors[f"{stem}.lora_B.bias"] = torch.randn(out, generator=g) * 0.1
                continue
            stem = (f"diffusion_model.blocks.{i}.{original}" if layout == "original"
                    else f"lora_unet_blocks_{i}_{original.replace('.', '_')}")
            tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
            if alpha is not None:
                tensors[f"{stem}.alpha"] = torch.tensor(alpha)
            if bias:
                tensors[f"{stem}.diff_b"] = torch.randn(out, generator=g) * 0.1
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def diffusers_with(folder: Path, loras: list[tuple[Path, float]]):
    """diffusers' model with the LoRAs as PEFT adapters, loaded as its pipelines' load_lora_weights does."""
    ref = reference_model(folder)
    names = []
    for i, (path, _) in enumerate(loras):
        state, metadata = WanLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        ref.load_lora_adapter(state, adapter_name=f"l{i}", prefix="transformer", metadata=metadata)
        names.append(f"l{i}")
    ref.set_adapters(names, weights=[s for _, s in loras])
    return ref


def outputs(model, config, seed=0):
    # I2V models split image and text at len - 512: they take 512 text tokens.
    x, t, ctx, image = make_inputs(config, 1, LATENT, seed=seed, text_tokens=512 if config.image_dim else TEXT)
    with torch.no_grad():
        return model(x, t, ctx, image).sample if image is not None else model(x, t, ctx).sample


@pytest.mark.parametrize("layout,alpha,bias", [("diffusers", None, True), ("original", 2.0, True),
                                               ("original", None, False), ("musubi", 8.0, False)])
def test_one_lora_matches_diffusers(checkpoints, tmp_path, layout, alpha, bias):
    config = get_preset("tiny-t2v")
    path = make_lora(config, tmp_path / "l.safetensors", layout, alpha=alpha, bias=bias)
    ours = WanTransformer.from_pretrained(checkpoints["tiny-t2v"], loras=[(path, 0.8)])
    ref = diffusers_with(checkpoints["tiny-t2v"], [(path, 0.8)])
    base = outputs(reference_model(checkpoints["tiny-t2v"]), config)
    expected = outputs(ref, config)
    assert relative_error(expected, base) > 1e-2  # the LoRA does change the output
    assert relative_error(outputs(ours, config), expected) < 1e-5
    assert "l.safetensors x0.8" in ours.last_route.reason


def test_two_loras_and_an_image_model_match_diffusers(checkpoints, tmp_path):
    config = get_preset("tiny-i2v")
    a = make_lora(config, tmp_path / "a.safetensors", "original", rank=4, seed=1, alpha=4.0, image=True)
    b = make_lora(config, tmp_path / "b.safetensors", "diffusers", rank=2, seed=2)
    ours = WanTransformer.from_pretrained(checkpoints["tiny-i2v"], loras=[(a, 1.0), (b, -0.5)])
    ref = diffusers_with(checkpoints["tiny-i2v"], [(a, 1.0), (b, -0.5)])
    assert relative_error(outputs(ours, config), outputs(ref, config)) < 1e-5


def test_swapping_is_exact_and_restores_the_base(checkpoints, tmp_path):
    config = get_preset("tiny-t2v")
    a = make_lora(config, tmp_path / "a.safetensors", "diffusers", seed=1)
    b = make_lora(config, tmp_path / "b.safetensors", "musubi", seed=2, alpha=2.0)
    model = WanTransformer.from_pretrained(checkpoints["tiny-t2v"])
    base = outputs(model, config)
    before = {n: p.data for n, p in model.named_parameters()}
    model.set_loras([(a, 1.0)])
    with_a = outputs(model, config)
    model.set_loras([(b, 0.7)])
    with_b = outputs(model, config)
    model.set_loras([(a, 1.0)])
    assert torch.equal(outputs(model, config), with_a) and not torch.equal(with_a, with_b)
    model.set_loras([])
    assert torch.equal(outputs(model, config), base)
    assert all(p.data_ptr() == before[n].data_ptr() for n, p in model.named_parameters())  # the base tensors
    assert model.loras == [] and not model._lora_base


def test_a_cast_after_merging_keeps_the_base_in_step(checkpoints, tmp_path):
    config = get_preset("tiny-t2v")
    a = make_lora(config, tmp_path / "a.safetensors", "diffusers", seed=1)
    model = WanTransformer.from_pretrained(checkpoints["tiny-t2v"], loras=[a]).to(torch.bfloat16)
    model.set_loras([])
    plain = WanTransformer.from_pretrained(checkpoints["tiny-t2v"]).to(torch.bfloat16)
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), n


def _write(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("case,message", [
    ("other-size", "a LoRA for another model size"),
    ("unknown-key", "layer(s) match no layer of tiny-t2v: transformer.blocks.9.attn1.to_q"),
    ("no-up", "has a down matrix but no up matrix"),
    ("strength", "strength nan must be a finite number"),
    ("pickle", "pickle files are refused"),
    ("truncated", "not a readable safetensors file"),
    ("layout", "neither the diffusers/PEFT, the original Wan nor the musubi LoRA layout"),
])
def test_bad_loras_are_one_line_and_leave_the_weights_alone(checkpoints, tmp_path, case, message):
    config = get_preset("tiny-t2v")
    good = make_lora(config, tmp_path / "good.safetensors", "diffusers", seed=1)
    model = WanTransformer.from_pretrained(checkpoints["tiny-t2v"], loras=[good])
    before = {n: p.data.clone() for n, p in model.named_parameters()}
    d = config.dim
    strength = 1.0
    if case == "other-size":
        path = _write(tmp_path / "x.safetensors", {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, d + 8),
                                                   "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(d, 4)})
    elif case == "unknown-key":
        path = _write(tmp_path / "x.safetensors", {"transformer.blocks.9.attn1.to_q.lora_A.weight": torch.zeros(4, d),
                                                   "transformer.blocks.9.attn1.to_q.lora_B.weight": torch.zeros(d, 4)})
    elif case == "no-up":
        path = _write(tmp_path / "x.safetensors", {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, d)})
    elif case == "strength":
        path, strength = good, float("nan")
    elif case == "pickle":
        path = tmp_path / "x.pt"
        torch.save({}, path)
    elif case == "truncated":
        path = tmp_path / "x.safetensors"
        path.write_bytes(good.read_bytes()[:40])
    else:
        path = _write(tmp_path / "x.safetensors", {"something.else": torch.zeros(2)})
    with pytest.raises(WeightsError) as e:
        model.set_loras([(path, strength)])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert all(torch.equal(p.data, before[n]) for n, p in model.named_parameters())
    assert model.loras == [(str(good), 1.0)]


def test_image_layers_on_a_text_model_are_a_warning(checkpoints, tmp_path, caplog):
    i2v, t2v = get_preset("tiny-i2v"), get_preset("tiny-t2v")
    assert i2v.dim == t2v.dim and i2v.num_layers == t2v.num_layers
    path = make_lora(i2v, tmp_path / "i.safetensors", "original", image=True)
    with caplog.at_level(logging.WARNING, logger="wan_build.lora"):
        model = WanTransformer.from_pretrained(checkpoints["tiny-t2v"], loras=[path])
    assert "target image layers tiny-t2v lacks" in caplog.text and "k_img" in caplog.text
    assert model.loras == [(str(path), 1.0)]


def test_engines_serve_the_merged_weights_without_a_rebuild(tmp_path):
    """An ONNX Runtime entry takes its weights from the model by name: with a LoRA merged it serves
    the merged weights (equal to eager on them), A -> B -> A gives A's output again, [] the base's."""
    from builder.build import build
    from builder.init_weights import init_weights
    from builder.profiles import load_profile

    config = get_preset("tiny-t2v")
    init_weights(config, tmp_path / "w", seed=5)
    (tmp_path / "p.yaml").write_text("name: l\nmodel: {weights: w}\nprecision: fp32\nbackends: onnxruntime\n"
                                     f"shapes:\n  - {{frames: 5, height: 32, width: 48}}\ntext_tokens: {TEXT}\n"
                                     "device: cpu\n")
    assert [r.status for r in build(load_profile(tmp_path / "p.yaml"), tmp_path / "out",
                                    echo=lambda s: None).results] == ["built"]
    a = make_lora(config, tmp_path / "a.safetensors", "diffusers", seed=3)
    b = make_lora(config, tmp_path / "b.safetensors", "original", seed=4)
    model = WanTransformer.from_pretrained(tmp_path / "w", engines=tmp_path / "out")
    base = outputs(model, config)
    assert model.last_route.backend == "onnxruntime"
    model.set_loras([(a, 1.0)])
    merged = outputs(model, config)
    assert model.last_route.backend == "onnxruntime" and "a.safetensors x1" in model.last_route.reason
    eager = outputs(WanTransformer.from_pretrained(tmp_path / "w", loras=[(a, 1.0)]), config)
    assert relative_error(merged, base) > 1e-2  # the LoRA does change the answer
    assert relative_error(merged, eager) < 1e-5
    model.set_loras([(b, 0.7)])
    assert relative_error(outputs(model, config), merged) > 1e-2
    model.set_loras([(a, 1.0)])
    assert relative_error(outputs(model, config), merged) < 1e-6 and model.last_route.backend == "onnxruntime"
    model.set_loras([])
    assert relative_error(outputs(model, config), base) < 1e-6 and model.last_route.backend == "onnxruntime"
    from runtime import load_engines
    from runtime.errors import InputError

    opened = load_engines(tmp_path / "out", loras=[(a, 1.0)])
    assert relative_error(outputs(opened, config), merged) < 1e-6 and "a.safetensors x1" in opened.last_route.reason
    assert opened.last_route.backend == "onnxruntime"
    with pytest.raises(InputError, match="give a plain list for a one-expert model"):
        load_engines(tmp_path / "out", loras={"high_noise": [a]})


def test_baked_engines_do_not_serve_merged_weights(tmp_path):
    """An entry that holds its build's weights (here an ONNX Runtime entry recorded without
    `weights: front`, as older builds wrote them) must not serve while a LoRA is merged."""
    import json

    from builder.build import build
    from builder.init_weights import init_weights
    from builder.profiles import load_profile

    config = get_preset("tiny-t2v")
    init_weights(config, tmp_path / "w", seed=5)
    (tmp_path / "p.yaml").write_text("name: l\nmodel: {weights: w}\nprecision: fp32\nbackends: onnxruntime\n"
                                     f"shapes:\n  - {{frames: 5, height: 32, width: 48}}\ntext_tokens: {TEXT}\n"
                                     "device: cpu\n")
    build(load_profile(tmp_path / "p.yaml"), tmp_path / "out", echo=lambda s: None)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for entry in manifest["entries"].values():
        entry["options"].pop("weights")
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    lora = make_lora(config, tmp_path / "l.safetensors", "diffusers", seed=3)
    model = WanTransformer.from_pretrained(tmp_path / "w", engines=tmp_path / "out")
    base = outputs(model, config)
    assert model.last_route.backend == "onnxruntime"  # its own weights, read from its file
    assert relative_error(base, outputs(WanTransformer.from_pretrained(tmp_path / "w"), config)) < 1e-5
    model.set_loras([(lora, 1.0)])
    merged = outputs(model, config)
    assert model.last_route.backend == "eager" and "holds the weights it was built from" in model.last_route.reason
    assert torch.equal(merged, outputs(WanTransformer.from_pretrained(tmp_path / "w", loras=[(lora, 1.0)]), config))
    model.set_loras([])
    outputs(model, config)
    assert model.last_route.backend == "onnxruntime"


def test_each_expert_keeps_its_own_loras_and_a_bad_pair_changes_neither(checkpoints, tmp_path):
    from runtime.experts import WanExpertRouter

    config = get_preset("tiny-t2v")
    high = WanTransformer.from_pretrained(checkpoints["tiny-t2v"])
    low = WanTransformer.from_pretrained(checkpoints["tiny-t2v"])
    router = WanExpertRouter(high, low, 0.9)
    a = make_lora(config, tmp_path / "a.safetensors", "diffusers", seed=1)
    bad = _write(tmp_path / "bad.safetensors", {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 3)})
    with pytest.raises(WeightsError):
        router.set_loras(high_noise=[a], low_noise=[bad])
    assert high.loras == [] and low.loras == []
    router.set_loras(high_noise=[(a, 0.5)])
    assert high.loras == [(str(a), 0.5)] and low.loras == []
    x, _, ctx, _ = make_inputs(config, 1, LATENT, text_tokens=TEXT)
    with torch.no_grad():
        router(x, torch.tensor([950.0]), ctx)
        assert router.last_expert == "high_noise" and "a.safetensors x0.5" in router.last_route.reason
        router(x, torch.tensor([100.0]), ctx)
        assert router.last_expert == "low_noise" and "LoRA" not in router.last_route.reason


def test_full_weight_and_bias_deltas_add_at_their_strength(checkpoints, tmp_path):
    """`.diff` (diffusers drops these) and `.diff_b` keys of the original layout: weight + strength * diff."""
    config = get_preset("tiny-t2v")
    shapes = parameter_shapes(config)
    g = torch.Generator().manual_seed(4)
    diff = torch.randn(*shapes["blocks.1.ffn.net.2.weight"], generator=g)
    diff_b = torch.randn(*shapes["blocks.1.ffn.net.2.bias"], generator=g)
    path = _write(tmp_path / "d.safetensors", {"diffusion_model.blocks.1.ffn.2.diff": diff,
                                               "diffusion_model.blocks.1.ffn.2.diff_b": diff_b})
    base = WanTransformer.from_pretrained(checkpoints["tiny-t2v"])
    model = WanTransformer.from_pretrained(checkpoints["tiny-t2v"], loras=[(path, 0.25)])
    w, b = base.blocks[1].ffn.net[2].weight, base.blocks[1].ffn.net[2].bias
    assert torch.equal(model.blocks[1].ffn.net[2].weight, w + 0.25 * diff)
    assert torch.equal(model.blocks[1].ffn.net[2].bias, b + 0.25 * diff_b)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed == ["blocks.1.ffn.net.2.weight", "blocks.1.ffn.net.2.bias"]


def test_the_lora_commands(checkpoints, tmp_path):
    import json

    from typer.testing import CliRunner

    from builder.cli import app

    config = get_preset("tiny-t2v")
    a = make_lora(config, tmp_path / "a.safetensors", "musubi", alpha=2.0)
    b = make_lora(config, tmp_path / "b.safetensors", "original", seed=3, bias=True)
    runner = CliRunner()
    r = runner.invoke(app, ["lora", "inspect", str(a), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["layout"] == "musubi" and info["ranks"] == [4] and info["alphas"] == [2.0]
    assert "tiny-t2v" in info["fits"] and "wan2.1-t2v-14b" not in info["fits"] and info["layers"] == 20
    r = runner.invoke(app, ["lora", "merge", str(checkpoints["tiny-t2v"]), "--lora", f"{a}:0.5", "--lora", str(b),
                            "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    merged = WanTransformer.from_pretrained(tmp_path / "merged")
    live = WanTransformer.from_pretrained(checkpoints["tiny-t2v"], loras=[(a, 0.5), (b, 1.0)])
    assert torch.equal(outputs(merged, config), outputs(live, config))
    r = runner.invoke(app, ["lora", "merge", str(checkpoints["tiny-t2v"]), "--lora", f"{a}:x", "--out",
                            str(tmp_path / "m2")])
    assert r.exit_code == 1 and "no such file" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m2").exists()


@pytest.mark.parametrize("arg,message", [("a.safetensors", "set_loras takes a list"),
                                         ([("a.safetensors", 1.0, 2)], "is not a path or a (path, strength) pair"),
                                         ([3], "is not a path or a (path, strength) pair")])
def test_malformed_lora_lists_are_one_line(checkpoints, arg, message):
    from runtime.errors import InputError

    model = WanTransformer.from_pretrained(checkpoints["tiny-t2v"])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.set_loras(arg)


@pytest.mark.parametrize("rslora", [False, True])
def test_the_peft_config_diffusers_saves_sets_the_scale(checkpoints, tmp_path, rslora):
    """diffusers' save_lora_weights writes the adapter's PEFT config (lora_alpha, alpha_pattern,
    use_rslora) into the file; its loader scales by it, and so do we."""
    import json

    from safetensors.torch import load_file

    config = get_preset("tiny-t2v")
    plain = make_lora(config, tmp_path / "plain.safetensors", "diffusers", seed=5)
    tensors = load_file(str(plain))
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors})
    peft_config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"blocks.0.attn1.to_q": 2}, "rank_pattern": {},
                   "target_modules": modules, "use_rslora": rslora, "lora_dropout": 0.0}
    path = tmp_path / "meta.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(
        {f"transformer.{k}": v for k, v in peft_config.items()})})
    ours = WanTransformer.from_pretrained(checkpoints["tiny-t2v"], loras=[(path, 0.6)])
    ref = diffusers_with(checkpoints["tiny-t2v"], [(path, 0.6)])
    no_config = WanTransformer.from_pretrained(checkpoints["tiny-t2v"], loras=[(plain, 0.6)])
    expected = outputs(ref, config)
    assert relative_error(outputs(no_config, config), expected) > 1e-3  # the config does change the scale
    assert relative_error(outputs(ours, config), expected) < 1e-5


def test_quantizing_after_a_merge_bakes_the_loras_in(checkpoints, tmp_path):
    """A model quantized without its checkpoint's tensors at hand keeps the LoRAs merged before; the
    base copies go (the FP8 layers replaced those parameters), moving the model still works, and
    set_loras says why it cannot change them."""
    config = get_preset("tiny-t2v").replace(num_layers=3)
    from builder.init_weights import init_weights

    init_weights(config, tmp_path / "w", seed=1)
    a = make_lora(config, tmp_path / "a.safetensors", "diffusers", seed=1)
    model = WanTransformer.from_pretrained(tmp_path / "w", torch.bfloat16, loras=[a])
    assert model._lora_base
    assert model.quantize_fp8(check_device=False)
    assert not model._lora_base and model.loras == [(str(a), 1.0)]
    model.to("cpu")
    with pytest.raises(Exception, match="high-precision weights are not at hand"):
        model.set_loras([])


def test_set_loras_on_fp8_requantizes_the_merged_weights(tmp_path):
    """FP8 layers: set_loras merges into the checkpoint's high-precision weights and quantizes again,
    exactly as merging before quantizing does; A -> B -> A and [] give those FP8 weights exactly."""
    from builder.init_weights import init_weights
    from runtime.weights import load_checkpoint

    config = get_preset("tiny-t2v").replace(num_layers=3)
    init_weights(config, tmp_path / "w", seed=1)
    a = make_lora(config, tmp_path / "a.safetensors", "diffusers", seed=1)
    b = make_lora(config, tmp_path / "b.safetensors", "original", seed=2, bias=True)

    def quantized(loras=()):
        model = WanTransformer.from_pretrained(tmp_path / "w", torch.bfloat16, loras=list(loras))
        assert model.quantize_fp8(check_device=False, source=load_checkpoint(tmp_path / "w").tensors)
        return model

    def same(x, y):
        sx, sy = x.state_dict(), y.state_dict()
        return sx.keys() == sy.keys() and all(torch.equal(sx[k].float(), sy[k].float()) for k in sx)

    plain, with_a, with_b = quantized(), quantized([(a, 0.8)]), quantized([(b, 1.0)])
    assert not same(plain, with_a)
    model = quantized()
    model.set_loras([(a, 0.8)])
    assert same(model, with_a) and model.loras == [(str(a), 0.8)]
    model.set_loras([(b, 1.0)])
    assert same(model, with_b)
    model.set_loras([(a, 0.8)])
    assert same(model, with_a)
    model.set_loras([])
    assert same(model, plain) and not model._fp8_merged and not model._lora_base
