"""The splits a run draws from a task: in-memory subsets, a validation set held out of the test split, and a
warning (or an error) when a class is missing from a split."""

from __future__ import annotations

import logging

import torch

from ..errors import EstaError
from .arrays import TensorImageDataset, stratified_split

log = logging.getLogger("esta")


def materialize(dataset, indices) -> TensorImageDataset:
    """The examples at ``indices`` as in-memory tensors (decoded once, however the source stores them)."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.subset(indices)
    items = [dataset[int(i)] for i in indices]
    if not items:  # e.g. no validation images held out of a tiny test split
        x0, _ = dataset[0]
        return TensorImageDataset(torch.empty((0, *x0.shape), dtype=x0.dtype), torch.empty(0, dtype=torch.long))
    return TensorImageDataset(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))


def held_out_sets(test, validation_examples: int, eval_examples: int | None, seed: int):
    """A stratified validation subset of the test split, and the evaluation subset drawn from the rest."""
    labels = torch.as_tensor(test.labels)
    n_val = min(max(validation_examples, 0), len(labels) // 4)
    val_idx, rest = stratified_split(labels, n_val, seed + 11) if n_val else ([], list(range(len(labels))))
    n_eval = len(rest) if not eval_examples else min(eval_examples, len(rest))
    pick = stratified_split(labels[torch.as_tensor(rest)], n_eval, seed)[0] if n_eval < len(rest) else range(n_eval)
    return materialize(test, val_idx), materialize(test, [int(rest[i]) for i in pick])


def warn_missing_classes(task, strict: bool = False) -> None:
    """Tell, don't guess: a class absent from a split makes its accuracy an average over the other classes (an
    error with ``strict``)."""
    for split, data in (("train", task.train), ("test", task.test)):
        present = {int(y) for y in torch.as_tensor(data.labels).tolist()}
        missing = [c for k, c in enumerate(task.classes) if k not in present]
        if missing:
            msg = (f"task {task.name}: {len(missing)} of {len(task.classes)} classes have no {split} examples "
                   f"({', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''})")
            if strict:
                raise EstaError(msg + " (--strict)")
            log.warning(msg)
