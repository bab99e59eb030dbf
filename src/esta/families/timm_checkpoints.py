"""timm ViT/DeiT checkpoints as anchors: read once into an ordinary transformers folder, cached, then loaded like
any other vision anchor (so deployed stitches stay transformers-native).

Accepted: a hub-style folder with timm's ``config.json`` (``architecture``, ``num_classes``, ``pretrained_cfg``)
and ``model.safetensors`` (or ``pytorch_model.bin``); or a state-dict file (``.safetensors``, or ``.pth``/``.pt``/
``.bin`` read with ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors). The key mapping lives
here and only here: timm's fused ``qkv`` is split into transformers' query/key/value, its class and distillation
tokens and position embedding map onto ``embeddings``, its [CLS] head becomes the classifier (a distilled DeiT's
distillation head is left out: esta's anchors read the [CLS] token, as ``DeiTForImageClassification`` does), and the normalisation constants of ``pretrained_cfg`` (else
ImageNet's, timm's default for DeiT) become the folder's ``preprocessor_config.json``. The architecture (width,
depth, heads, MLP size, patch and image size, prefix tokens) is read from the tensors' shapes, the heads from
``config.json`` or the architecture's name (tiny 3, small 6, base 12, large 16; else width / 64).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from ..errors import EstaError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}
_STATE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def is_timm(source: str) -> bool:
    """A timm folder (its config.json names an ``architecture`` and no ``model_type``) or a state-dict file."""
    path = Path(source)
    if path.is_file():
        return path.suffix in _STATE_SUFFIXES
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "architecture" in data and "model_type" not in data


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors' and torch's own error types for a damaged or unsafe file
        raise EstaError(f"timm checkpoint {path} cannot be read as tensors only ({str(e)[:160]})") from e
    for key in ("state_dict", "model", "state_dict_ema"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise EstaError(f"{path} is not a timm ViT/DeiT state dict (no cls_token / patch_embed.proj.weight)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _files(source: Path) -> tuple[Path, dict]:
    """The weights file and timm's config of a source (a folder, or a bare state-dict file with no config)."""
    if source.is_file():
        return source, {}
    config = json.loads((source / "config.json").read_text())
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (source / name).is_file():
            return source / name, config
    raise EstaError(f"timm folder {source} has no model.safetensors or pytorch_model.bin")


def _shape(state: dict, config: dict) -> dict:
    """The transformers config fields of this checkpoint, from its tensors (and its name, for the heads)."""
    width = state["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    patch = state["patch_embed.proj.weight"]
    prefix = 1 + ("dist_token" in state)
    grid = (state["pos_embed"].shape[1] - prefix) ** 0.5
    if grid != int(grid):
        raise EstaError("timm checkpoint: the position embedding is not a square grid of patches")
    name = str(config.get("architecture", "")).lower()
    heads = config.get("num_heads") or next((h for word, h in _HEADS.items() if word in name), max(1, width // 64))
    return {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": int(heads),
            "intermediate_size": state["blocks.0.mlp.fc1.weight"].shape[0], "patch_size": patch.shape[-1],
            "num_channels": patch.shape[1], "image_size": int(grid) * patch.shape[-1], "layer_norm_eps": 1e-6,
            "qkv_bias": "blocks.0.attn.qkv.bias" in state, "hidden_act": "gelu"}


def to_transformers(state: dict[str, torch.Tensor], config: dict) -> tuple[object, dict[str, torch.Tensor]]:
    """A transformers ViT/DeiT classification model's config and state dict holding a timm state dict's weights:
    the one place timm's names meet transformers'."""
    from transformers import DeiTConfig, ViTConfig

    fields = _shape(state, config)
    deit = "dist_token" in state
    classes = state["head.weight"].shape[0] if "head.weight" in state else int(config.get("num_classes") or 0)
    hf_config = (DeiTConfig if deit else ViTConfig)(**fields, num_labels=max(classes, 1))
    base = "deit" if deit else "vit"
    out = {f"{base}.embeddings.cls_token": state["cls_token"],
           f"{base}.embeddings.position_embeddings": state["pos_embed"],
           f"{base}.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           f"{base}.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           f"{base}.layernorm.weight": state["norm.weight"], f"{base}.layernorm.bias": state["norm.bias"]}
    if deit:
        out[f"{base}.embeddings.distillation_token"] = state["dist_token"]
    width = fields["hidden_size"]
    for i in range(fields["num_hidden_layers"]):  # transformers 5's names (``layers.i.attention.q_proj``)
        t, h = f"blocks.{i}.", f"{base}.layers.{i}."
        names = ("q_proj", "k_proj", "v_proj")  # timm's qkv rows: all queries, then all keys, then all values
        for n, w in zip(names, state[t + "attn.qkv.weight"].split(width)):
            out[h + f"attention.{n}.weight"] = w
        if fields["qkv_bias"]:
            for n, b in zip(names, state[t + "attn.qkv.bias"].split(width)):
                out[h + f"attention.{n}.bias"] = b
        for src, dst in (("attn.proj", "attention.o_proj"), ("norm1", "layernorm_before"),
                         ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[h + dst + ".weight"], out[h + dst + ".bias"] = state[t + src + ".weight"], state[t + src + ".bias"]
    if classes:  # the [CLS] head (a distilled DeiT's distillation head is left out: esta's anchors read [CLS])
        out["classifier.weight"], out["classifier.bias"] = state["head.weight"], state["head.bias"]
    return hf_config, out


def _preprocessing(config: dict, channels: int) -> dict:
    cfg = config.get("pretrained_cfg") or {}
    mean = cfg.get("mean") or config.get("mean") or (IMAGENET_MEAN if channels == 3 else [0.5] * channels)
    std = cfg.get("std") or config.get("std") or (IMAGENET_STD if channels == 3 else [0.5] * channels)
    return {"image_processor_type": "ViTImageProcessor", "image_mean": list(mean), "image_std": list(std),
            "do_normalize": True, "do_rescale": True, "do_resize": True}


def convert_timm(source: str | Path, cache_dir: str | Path | None = None) -> str:
    """A timm ViT/DeiT checkpoint as an ordinary transformers folder, converted once and cached (keyed by the
    weights' sha256, so a replaced file is converted again)."""
    from safetensors.torch import save_file
    from transformers import DeiTForImageClassification, ViTForImageClassification

    from ..data import default_cache_dir

    source = Path(source)
    weights, config = _files(source)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    out = Path(cache_dir or default_cache_dir()) / "timm" / f"{source.stem}-{digest}"
    if (out / "config.json").is_file():
        return str(out)
    state = _read_state(weights)
    hf_config, hf_state = to_transformers(state, config)
    model_class = DeiTForImageClassification if hf_config.model_type == "deit" else ViTForImageClassification
    hf_config.architectures = [model_class.__name__]
    missing = sorted(set(model_class(hf_config).state_dict()) - set(hf_state))
    if missing:
        raise EstaError(f"timm checkpoint {source}: no weights for {missing[:3]} (not a ViT/DeiT of timm's layout?)")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp / "model.safetensors"))
    (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessing(config, hf_config.num_channels)))
    hf_config.save_pretrained(tmp)  # config.json last: a folder with a config holds whole weights
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return str(out)
