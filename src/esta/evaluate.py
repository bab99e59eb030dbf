"""Accuracy of one stitch or of every stitch (the sweep), and the numbers that judge a deployment."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .palette import Palette


@torch.no_grad()
def accuracy(model: Callable[[Any], torch.Tensor], dataset: Dataset, batch_size: int = 256,
             device: torch.device | str = "cpu", progress: bool = False, desc: str = "evaluating") -> float:
    """Top-1 accuracy of ``model(images) -> logits`` on ``dataset`` (items: ``(image, label)``)."""
    correct = total = 0
    for images, labels in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, disable=not progress,
                               leave=False):
        pred = model(images.to(device)).argmax(-1).cpu()
        correct += int((pred == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def sweep(palette: Palette, dataset: Dataset, stitches: list[int] | None = None, batch_size: int = 256,
          progress: bool = True) -> dict[int, float]:
    """Accuracy of every stitch (or of ``stitches``) on ``dataset``: SN-Net's costly way to choose."""
    was_training = palette.training
    palette.eval()
    ids = list(range(len(palette))) if stitches is None else list(stitches)
    device = next(palette.parameters()).device
    out = {}
    for sid in tqdm(ids, desc="evaluating every stitch", disable=not progress):
        out[sid] = accuracy(lambda x: palette(x, stitch=sid), dataset, batch_size, device)
    palette.train(was_training)
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than two points or a constant side."""
    if len(x) < 2:
        return float("nan")

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():  # ties share their mean rank
            tie = t == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / denom) if denom > 0 else float("nan")


def largest_drop(accuracies: list[float | None]) -> float:
    """How far accuracy, read from the cheapest budget up, ever falls below a cheaper budget's (0 when it never
    falls; missing values skipped): the "rises with budget" check."""
    drop, best = 0.0, float("-inf")
    for a in accuracies:
        if a is not None:
            drop, best = max(drop, best - a), max(best, a)
    return drop
