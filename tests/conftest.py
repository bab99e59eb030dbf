"""Tiny random ViT/DeiT families saved as real transformers checkpoints, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
torch.set_num_threads(2)

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


@pytest.fixture(scope="session")
def vit_family(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("vit")
    return [save_tiny(root / f"a{i}", "vit", w, h, seed=i) for i, (w, h) in enumerate(SHAPES)]


@pytest.fixture(scope="session")
def deit_family(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("deit")
    return [save_tiny(root / f"a{i}", "deit", w, h, seed=10 + i) for i, (w, h) in enumerate(SHAPES)]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
