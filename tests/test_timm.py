"""timm ViT/DeiT checkpoints as anchors. timm itself cannot be installed beside this torch build (it needs
torchvision), so the logits are checked against a forward written here from timm's VisionTransformer (patch
convolution, [CLS] and distillation tokens, fused qkv attention, pre-norm blocks, final norm, heads; a distilled
DeiT averages its two heads at inference), on tiny random checkpoints in timm's key layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import image_folder
from safetensors.torch import save_file

import esta
from esta.families import load_family
from esta.families.timm_checkpoints import is_timm

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def timm_state(width: int, depth: int, classes: int, distilled: bool, seed: int, patch: int = 4,
               grid: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    prefix = 2 if distilled else 1
    state = {"cls_token": r(1, 1, width), "pos_embed": r(1, grid * grid + prefix, width),
             "patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width),
             "norm.weight": 1 + r(width), "norm.bias": r(width), "head.weight": r(classes, width), "head.bias": r(classes)}
    if distilled:
        state |= {"dist_token": r(1, 1, width), "head_dist.weight": r(classes, width), "head_dist.bias": r(classes)}
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width), b + "attn.qkv.weight": r(3 * width, width),
                  b + "attn.qkv.bias": r(3 * width), b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
                  b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width), b + "mlp.fc1.weight": r(4 * width, width),
                  b + "mlp.fc1.bias": r(4 * width), b + "mlp.fc2.weight": r(width, 4 * width), b + "mlp.fc2.bias": r(width)}
    return state


def timm_forward(state: dict, pixels: torch.Tensor, heads: int, both_heads: bool = True) -> torch.Tensor:
    """timm's VisionTransformer / VisionTransformerDistilled forward (eval), from its definition; ``both_heads=False``:
    a distilled model's [CLS] head alone."""
    w = state["patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, state["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    b, width = x.shape[0], x.shape[-1]
    tokens = [state["cls_token"].expand(b, -1, -1)] + ([state["dist_token"].expand(b, -1, -1)] if "dist_token" in state else [])
    x = torch.cat(tokens + [x], dim=1) + state["pos_embed"]
    ln = lambda t, n: F.layer_norm(t, (width,), state[n + ".weight"], state[n + ".bias"], eps=1e-6)  # noqa: E731
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        qkv = F.linear(ln(x, p + "norm1"), state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, x.shape[1], 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(b, -1, width), state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    x = ln(x, "norm")
    logits = F.linear(x[:, 0], state["head.weight"], state["head.bias"])
    if "dist_token" in state and both_heads:
        return (logits + F.linear(x[:, 1], state["head_dist.weight"], state["head_dist.bias"])) / 2
    return logits


def timm_folder(root: Path, name: str, state: dict, heads: int, how: str = "folder") -> str:
    """As the hub's ``timm/...`` repos hold it (config.json + model.safetensors), or a bare state-dict file."""
    root.mkdir(parents=True, exist_ok=True)
    if how == "safetensors":
        save_file(state, str(root / f"{name}.safetensors"))
        return str(root / f"{name}.safetensors")
    if how == "pth":
        torch.save({"model": state}, root / f"{name}.pth")
        return str(root / f"{name}.pth")
    folder = root / name
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": name, "num_classes": state["head.weight"].shape[0], "num_features": state["cls_token"].shape[-1],
        "num_heads": heads, "pretrained_cfg": {"mean": MEAN, "std": STD, "input_size": [3, 8, 8]}}))
    return str(folder)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESTA_CACHE", str(tmp_path / "cache"))  # conversions are cached there


@pytest.mark.parametrize("distilled", [False, True])
def test_timm_checkpoints_load_with_timms_logits(tmp_path, distilled):
    states = [timm_state(16, 2, 5, distilled, seed=1), timm_state(24, 3, 5, distilled, seed=2)]
    sources = [timm_folder(tmp_path, f"deit_t{i}", s, heads=2) for i, s in enumerate(states)]
    assert all(is_timm(s) for s in sources)
    anchors = load_family(sources)  # the pretrained heads kept
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    normalised = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    from transformers import AutoModelForImageClassification

    for anchor, state in zip(anchors, states):
        assert anchor.image_mean == pytest.approx(MEAN) and anchor.image_std == pytest.approx(STD)
        with torch.no_grad():
            # a distilled DeiT's [CLS] head: what esta's anchor and DeiTForImageClassification read
            expected = timm_forward(state, normalised, heads=2, both_heads=False)
            model = AutoModelForImageClassification.from_pretrained(anchor.source).eval()  # the converted folder
            torch.testing.assert_close(model(pixel_values=normalised).logits, expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(anchor.eval()(pixels), expected, atol=1e-5, rtol=0)


def test_bare_state_dicts_and_damaged_files(tmp_path):
    state = timm_state(16, 2, 4, False, seed=3)
    for how in ("safetensors", "pth"):
        path = timm_folder(tmp_path / how, "vit", state, heads=2, how=how)
        other = timm_folder(tmp_path / how, "vit2", timm_state(32, 2, 4, False, seed=4), heads=2, how=how)
        anchors = load_family([path, other], num_labels=7)  # no config, no name: one head per 64 of width, at least 1
        assert [a.width for a in anchors] == [16, 32] and anchors[0].config.num_attention_heads == 1
    bad = tmp_path / "bad.pth"
    buf = io.BytesIO()
    torch.save({"model": state, "evil": object()}, buf)  # a pickled object: refused, not run
    bad.write_bytes(buf.getvalue())
    with pytest.raises(esta.EstaError, match="tensors only"):
        load_family([str(bad), str(bad)])


def test_a_timm_family_trains_deploys_and_serves(tmp_path):
    sources = [timm_folder(tmp_path / "fam", f"deit_{n}", timm_state(w, d, 5, True, seed=s), heads=2)
               for n, w, d, s in (("a", 16, 2, 5), ("b", 24, 3, 6))]
    data = image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    results = esta.run(esta.AdaptConfig(anchors=sources, data=str(data), out_dir=str(out), progress=False,
                                        train=esta.TrainConfig(steps=4, batch_size=8), validation_examples=4,
                                        probe_examples=16, cache_dir=str(tmp_path / "cache")))
    assert results["deployed"] and all(Path(d["path"], "config.json").is_file() for d in results["deployed"])
    from transformers import AutoModelForImageClassification

    deployed = Path(results["deployed"][-1]["path"])
    AutoModelForImageClassification.from_pretrained(deployed)  # transformers-native as any deployment
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient
    from PIL import Image

    from esta.runs import save_run_palette
    from esta.serve import create_app

    client = TestClient(create_app(save_run_palette(out)))
    png = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8).numpy()).save(png, format="PNG")
    r = client.post("/classify?budget_gflops=1", content=png.getvalue())
    assert r.status_code == 200, r.text
