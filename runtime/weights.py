"""Loading Wan checkpoints: diffusers layout or original Wan layout, memory-mapped.

Accepted:
- a diffusers transformer folder: `config.json` + `diffusion_pytorch_model.safetensors`, or a
  sharded `*.safetensors.index.json`;
- a diffusers pipeline folder (`model_index.json`), with `subfolder="transformer"` or `"transformer_2"`;
- an original Wan folder: `config.json` of `WanModel` + safetensors (single or sharded), for
  Wan2.2 A14B the `high_noise_model/` or `low_noise_model/` folder;
- a single `.safetensors` file in either layout, also with the `model.diffusion_model.` prefix
  of community single files; its config is read off the tensor shapes;
- a single `.gguf` file in either layout (`runtime.gguf`: quantized weights stay quantized).

Tensors are views into a private memory map of each file (no read into anonymous memory, no
second copy); they are renamed to diffusers names here, once, so no other code knows about the
original layout. Pickle files (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused, never opened.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .config import CLIP_TOKENS, WanConfig, find_preset, vae_fields
from .errors import WeightsError

DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
GGUF_SUFFIX = ".gguf"
GGUF_TYPE = "_gguf_type"  # `<layer>.weight_gguf_type`: a GGUF weight kept in its blocks (runtime.gguf)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
COMMUNITY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# diffusers keeps these in float32 whatever torch_dtype says (matched as dotted-name components).
KEEP_FP32 = frozenset({"time_embedder", "scale_shift_table", "norm1", "norm2", "norm3",
                       "weight_scale"})  # the last: FP8/INT8 layers' scales
IGNORED_KEYS = ("norm_added_q",)  # present in some converted I2V checkpoints; diffusers ignores it too

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

# Original Wan module paths -> diffusers module paths (wan-architecture section 6).
_ORIGINAL_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_ORIGINAL_TOP_PARAMS = {"head.modulation": "scale_shift_table",
                        "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}
_ORIGINAL_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    # The original's affine cross-attention LayerNorm is `norm3`; diffusers calls it `norm2`.
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}


@dataclass
class Checkpoint:
    """Tensors under diffusers names, the config they fit, and where they came from."""

    config: WanConfig
    tensors: dict[str, torch.Tensor]
    layout: str  # "diffusers" or "original"
    files: list[Path] = field(default_factory=list)


# -- safetensors, memory-mapped -------------------------------------------------------------------
def _read_header(path: Path) -> tuple[dict, int, int]:
    """A safetensors file's JSON header, its length and the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, header_len, size


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form `__metadata__` strings of a safetensors file ({} without)."""
    metadata = _read_header(Path(path))[0].get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file as views into a private (copy-on-write) memory map."""
    path = Path(path)
    header, header_len, size = _read_header(path)
    header.pop("__metadata__", None)
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        problem = _header_problem(info)
        if problem:
            raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry ({problem}); the file is "
                               "damaged or not a safetensors file")
        entries[name] = (_DTYPES.get(info["dtype"]), tuple(info["shape"]), *info["data_offsets"])
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if size else None
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        if dtype is None or base + end > size:
            raise WeightsError(f"{path}: tensor {name!r} has an unknown dtype or lies past the end of the file")
        nbytes = end - start
        itemsize = torch.empty(0, dtype=dtype).element_size()
        numel = 1
        for s in shape:
            numel *= s
        if numel * itemsize != nbytes:
            raise WeightsError(f"{path}: tensor {name!r} has {nbytes} bytes for shape {list(shape)}")
        if (base + start) % itemsize == 0:
            t = torch.empty(0, dtype=dtype).set_(storage, (base + start) // itemsize, shape)
        else:  # unaligned (rare): one copy of this tensor alone
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, base + start, (nbytes,))
            t = raw.clone().view(dtype).reshape(shape)
        tensors[name] = t
    return tensors


def _header_problem(info) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    def ints(v, n=None):
        return isinstance(v, list) and (n is None or len(v) == n) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
    if not isinstance(info, dict):
        return "not an object"
    if not isinstance(info.get("dtype"), str):
        return "no dtype"
    if not ints(info.get("shape")):
        return "shape is not a list of sizes"
    if not ints(info.get("data_offsets"), 2) or info["data_offsets"][0] > info["data_offsets"][1]:
        return "data_offsets is not [start, end]"
    return None


def _read_files(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in read_safetensors(f).items():
            if name in tensors:
                raise WeightsError(f"{f}: tensor {name!r} also appears in another shard")
            tensors[name] = t
    return tensors


def _safetensors_in(folder: Path) -> list[Path]:
    """The weight files of a folder: the shards an index lists, else the one safetensors file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise WeightsError(f"{folder}: several index files ({', '.join(p.name for p in indexes)}); keep one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise WeightsError(f"{indexes[0]}: not a safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise WeightsError(f"{indexes[0]} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not files and pickles:
        raise WeightsError(
            f"{folder}: holds only pickle files ({', '.join(pickles)}), which are never loaded because "
            "they can run code; convert them to safetensors first"
        )
    if not files:
        raise WeightsError(f"{folder}: no .safetensors weights found")
    raise WeightsError(f"{folder}: several .safetensors files and no *.safetensors.index.json to say which to use")


# -- layouts --------------------------------------------------------------------------------------
def strip_community_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in COMMUNITY_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def detect_layout(names: Iterable[str]) -> str:
    names = set(names)
    if any(".self_attn." in n or n.startswith("head.") or n.startswith("time_embedding.") for n in names):
        return "original"
    if any(".attn1." in n or n.startswith("condition_embedder.") for n in names):
        return "diffusers"
    raise WeightsError("the checkpoint's tensor names are neither the diffusers nor the original Wan layout")


def original_to_diffusers_name(name: str) -> str:
    """One original Wan key -> its diffusers key (unknown keys come back unchanged)."""
    if name in _ORIGINAL_TOP_PARAMS:
        return _ORIGINAL_TOP_PARAMS[name]
    module, _, leaf = name.rpartition(".")
    if module.startswith("blocks."):
        parts = module.split(".", 2)  # "blocks", index[, the module inside the block]
        if len(parts) == 2:  # blocks.N.modulation, a parameter of the block itself
            return f"{module}.scale_shift_table" if leaf == "modulation" else name
        return f"blocks.{parts[1]}.{_ORIGINAL_BLOCK.get(parts[2], parts[2])}.{leaf}"
    return f"{_ORIGINAL_TOP[module]}.{leaf}" if module in _ORIGINAL_TOP else name


def diffusers_to_original_name(name: str) -> str:
    """One diffusers key -> its original Wan key (the inverse of `original_to_diffusers_name`)."""
    for original, ours in _ORIGINAL_TOP_PARAMS.items():
        if name == ours:
            return original
    module, _, leaf = name.rpartition(".")
    if module.startswith("blocks."):
        parts = module.split(".", 2)
        if len(parts) == 2:
            return f"{module}.modulation" if leaf == "scale_shift_table" else name
        inverse = {v: k for k, v in _ORIGINAL_BLOCK.items()}
        return f"blocks.{parts[1]}.{inverse.get(parts[2], parts[2])}.{leaf}"
    inverse = {v: k for k, v in _ORIGINAL_TOP.items()}
    return f"{inverse[module]}.{leaf}" if module in inverse else name


def infer_config(tensors: Mapping[str, torch.Tensor], name: str, head_dim: int = 128) -> WanConfig:
    """Read a config off the tensor shapes of a diffusers-named checkpoint (single files)."""
    try:
        d, c_in, *patch = tensors["patch_embedding.weight"].shape
        ffn_dim = tensors["blocks.0.ffn.net.0.proj.weight"].shape[0]
        text_dim = tensors["condition_embedder.text_embedder.linear_1.weight"].shape[1]
        freq_dim = tensors["condition_embedder.time_embedder.linear_1.weight"].shape[1]
        out = tensors["proj_out.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"{name}: cannot infer the model config, tensor {e} is missing") from None
    if d % head_dim:
        raise WeightsError(f"{name}: model dim {d} is not a multiple of head_dim {head_dim} (every Wan release has "
                           "head_dim 128); pass preset= (a name or a WanConfig) to say which model this is")
    layers = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    patch_volume = patch[0] * patch[1] * patch[2]
    image = tensors.get("condition_embedder.image_embedder.norm1.weight")
    pos = tensors.get("condition_embedder.image_embedder.pos_embed")
    out_channels = out // patch_volume
    return WanConfig(
        name=name, num_heads=d // head_dim, head_dim=head_dim, ffn_dim=ffn_dim, num_layers=layers,
        in_channels=c_in, out_channels=out_channels, text_dim=text_dim, freq_dim=freq_dim,
        patch_size=tuple(patch), image_dim=None if image is None else image.shape[0],
        image_tokens=0 if image is None else (pos.shape[1] if pos is not None else CLIP_TOKENS),
        image_pos_embed=pos is not None, **vae_fields(out_channels),
    )


# -- loading --------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, *, subfolder: str | None = None, preset: WanConfig | None = None
                    ) -> Checkpoint:
    """Read any accepted checkpoint into diffusers-named, memory-mapped tensors and its config."""
    path = Path(path).expanduser()
    if subfolder:
        path = path / subfolder
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    if path.is_file():
        return _load_single_file(path, preset)
    if (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        subs = [p.name for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file()
                and p.name.startswith("transformer")]
        raise WeightsError(f"{path} is a pipeline folder; load one transformer with subfolder= one of "
                           f"{', '.join(sorted(subs)) or 'transformer'}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{path}: no config.json (a diffusers or original Wan transformer folder has one)")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise WeightsError(f"{config_path}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{config_path}: not a model config (a JSON object)")
    original = raw.get("_class_name") == "WanModel" or "dim" in raw
    if not original:  # check the config before touching any weights
        config = WanConfig.from_diffusers(raw, name=str(config_path))
    files = _safetensors_in(path)
    tensors, layout = _diffusers_named(_read_files(files))
    if original:
        norm = tensors.get("condition_embedder.image_embedder.norm1.weight")
        config = WanConfig.from_original(raw, image_dim=None if norm is None else norm.shape[0], name=str(config_path))
    config = _named(config, preset, path)
    return Checkpoint(config, tensors, layout, files)


def _diffusers_named(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Community prefixes stripped, original-layout names renamed; returns the tensors and the layout."""
    tensors = strip_community_prefix(tensors)
    layout = detect_layout(tensors)
    if layout == "original":
        tensors = {original_to_diffusers_name(k): v for k, v in tensors.items()}
    return tensors, layout


def _load_single_file(path: Path, preset: WanConfig | None) -> Checkpoint:
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: pickle checkpoints are never loaded because they can run code; "
                           "convert it to safetensors first")
    if path.suffix == GGUF_SUFFIX:
        from .gguf import logical_view, read_gguf

        tensors, layout = _diffusers_named(read_gguf(path)[0])
        config = infer_config(logical_view(tensors), str(path), preset.head_dim if preset else 128)
        return Checkpoint(_named(config, preset, path), tensors, layout, [path])
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: expected a .safetensors or .gguf file")
    tensors, layout = _diffusers_named(read_safetensors(path))
    config = infer_config(tensors, str(path), preset.head_dim if preset else 128)
    return Checkpoint(_named(config, preset, path), tensors, layout, [path])


def _named(config: WanConfig, preset: WanConfig | None, path: Path) -> WanConfig:
    """Check against the preset the user named, or adopt the preset this structure matches."""
    if preset is not None:
        if not preset.same_structure(config):
            diff = [f"{f}: checkpoint {getattr(config, f)} vs preset {getattr(preset, f)}"
                    for f in ("num_heads", "head_dim", "ffn_dim", "num_layers", "in_channels", "out_channels",
                              "text_dim", "image_dim", "image_tokens")
                    if getattr(config, f) != getattr(preset, f)]
            raise WeightsError(f"{path} does not match preset {preset.name}: {'; '.join(diff) or 'structure differs'}")
        return preset
    known = find_preset(config)
    return known if known is not None else config.replace(name=path.name)


def check_tensors(expected: Mapping[str, torch.Size], tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(expected) if not any(s in k for s in IGNORED_KEYS))
    shapes = sorted(f"{k} {list(tensors[k].shape)} (model wants {list(expected[k])})"
                    for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or shapes):
        return

    def listing(label: str, items: list[str]) -> str:
        shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
        return f"{len(items)} {label}: {shown}"

    parts = [listing(lbl, items) for lbl, items in
             (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", shapes)) if items]
    raise WeightsError(f"{source} does not fit the model: " + "; ".join(parts))


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """diffusers' precision policy: time embedder, modulation tables and affine norms stay float32."""
    if dtype.is_floating_point and any(part in KEEP_FP32 for part in name.split(".")):
        return torch.float32
    return dtype


def materialize(tensors: Mapping[str, torch.Tensor], expected: Iterable[str], dtype: torch.dtype | None,
                device: torch.device | str, keep_quantized: bool = False) -> dict[str, torch.Tensor]:
    """The tensors the model needs, in their final dtype and device (a no-op view when they match).
    GGUF-quantized weights (`runtime.gguf`) are dequantized to that dtype, or with `keep_quantized`
    kept in their blocks with their type (for a model of `GgufLinear` layers)."""
    out = {}
    for name in expected:
        t = tensors[name]
        target = parameter_dtype(name, dtype) if dtype is not None and t.is_floating_point() else t.dtype
        if name + GGUF_TYPE in tensors:
            from .gguf import dequantize

            kind = tensors[name + GGUF_TYPE]
            if keep_quantized:
                out[name], out[name + GGUF_TYPE] = t.to(device), kind
            else:
                out[name] = dequantize(t.to(device), int(kind), parameter_dtype(name, dtype or torch.float32))
            continue
        out[name] = t.to(device=device, dtype=target)
    return out
