"""Helpers shared by the tests (not a test file): running the CLI, tiny image tasks and palettes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from esta.cost import count_costs
from esta.data import TensorImageDataset
from esta.families import load_family
from esta.palette import Palette
from esta.pst import PSTConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
TEST_CACHE = Path(tempfile.gettempdir()) / "esta-test-cache"  # built-in data and probes; never the checkout


def esta(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "ESTA_CACHE": str(cwd or TEST_CACHE)}
    return subprocess.run([sys.executable, "-m", "esta.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def one_error_line(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("esta: error: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def image_folder(root: Path, per_class: int = 4, size: int = 10) -> Path:
    for split in ("train", "test"):
        for k, colour in enumerate((30, 220)):
            d = root / split / f"class{k}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("L", (size, size), colour + i).save(d / f"{i}.png")
    return root


def toy_task(n=48, classes=3, seed=0):
    """Noisy images whose class is their brightness: learnable in a few steps even by a model blind to position
    (a random DeiT's position embeddings are zero)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 80, (n, 1, 8, 8), generator=g) + 80 * labels.view(n, 1, 1, 1)
    return TensorImageDataset(images.to(torch.uint8), labels)


def perturb_adapters(palette, scale: float = 0.05) -> None:
    """Make a palette look trained: nonzero LoRA and stitch-specific biases everywhere, which deploying must merge
    into the saved weights."""
    with torch.no_grad():
        for p in palette.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def build(paths, data, pst=None, seed=0, **palette_args):
    torch.manual_seed(seed)
    palette = Palette(load_family(paths, num_labels=3), **palette_args)
    palette.init_stitching(data.images[:32])
    flops = [float(c.flops) for c in count_costs(palette, data.images[:1], progress=False)]
    palette.apply_pst(pst or PSTConfig())
    return palette, flops


SHAPES = [(16, 2), (32, 4), (48, 4)]


def save_tiny(folder: Path, kind: str = "vit", width: int = 16, heads: int = 2, depth: int = 3, image_size: int = 8,
              patch_size: int = 4, channels: int = 1, num_labels: int = 3, seed: int = 0) -> str:
    torch.manual_seed(seed)
    cfg_cls, model_cls = (ViTConfig, ViTForImageClassification) if kind == "vit" else (
        DeiTConfig, DeiTForImageClassification)
    cfg = cfg_cls(image_size=image_size, patch_size=patch_size, num_channels=channels, hidden_size=width,
                  num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=2 * width,
                  num_labels=num_labels)
    model_cls(cfg).save_pretrained(folder)
    return str(folder)
