"""Tiny random ViT/DeiT families saved as real transformers checkpoints, shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import SHAPES, save_tiny
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
# Under pytest-xdist (make test runs two workers on this 2-core machine) each worker and the CLI processes it starts
# use one thread, so two workers do not fight over the cores; alone, two threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


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
