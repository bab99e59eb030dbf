"""Linear probes: a new task head fitted on an anchor's frozen features before any palette step.

Why (ours, measured): a new task head starts random, so a palette spends its first steps learning heads, and an
anchor's head is trained only by the stitches that end in that anchor. With small-to-large stitching the smallest
anchor's head is trained by the smallest anchor alone: in the demo's 600 steps it got 2 updates and stayed at
chance. A probe gives every head a useful start at the price of one forward pass of each anchor over the training
set; every stitch that ends in an anchor shares its probe-initialised head.

The probe is multinomial logistic regression with an L2 penalty on the features the head sees (the final norm's
[CLS] token), standardised, solved to convergence by L-BFGS on the whole training set; the penalty is chosen by
k-fold cross-validation on the training set only (never on test data). The standardisation is folded into the
head's weight and bias, so the result is an ordinary ``nn.Linear``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .data import materialize, stratified_split
from .errors import EstaError
from .files import atomic_write

log = logging.getLogger("esta.probe")

#: L2 penalties tried by cross-validation (on standardised features; the loss is the mean cross-entropy)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class ProbeResult:
    l2: float
    train_accuracy: float
    cv_accuracy: float  # mean held-out accuracy over the folds, for the chosen penalty


@torch.no_grad()
def head_features(anchor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """What the anchor's task head sees for each image (``[N, width]``, float32), with the anchor frozen."""
    was_training = anchor.training
    anchor.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        h = anchor.embed(x)
        ctx = anchor.context(x, h)
        for b in range(anchor.depth):
            h = anchor.block(b, h, ctx)
        out.append(anchor.head_features(h).float())
    anchor.train(was_training)
    return torch.cat(out)


def _fit(z: torch.Tensor, y: torch.Tensor, classes: int, l2: float, iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on (already standardised) features ``z``; weight ``[C, D]``, bias ``[C]``."""
    w = torch.zeros(classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.t() + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _folds(labels: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """``k`` disjoint index sets, each stratified by class."""
    g = torch.Generator().manual_seed(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        for i, v in enumerate(idx.tolist()):
            folds[i % k].append(v)
    return [torch.tensor(sorted(f), dtype=torch.long) for f in folds if f]


def fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, folds: int = 4, seed: int = 0,
              grid: tuple[float, ...] = L2_GRID) -> tuple[torch.Tensor, torch.Tensor, ProbeResult]:
    """Weight ``[C, D]`` and bias ``[C]`` of a linear classifier on raw ``features`` (standardisation folded in)."""
    if len(features) != len(labels) or len(labels) == 0:
        raise EstaError(f"a probe needs as many labels as feature rows, got {len(labels)} and {len(features)}")
    x = features.double()
    y = torch.as_tensor(labels, dtype=torch.long)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    scores: dict[float, float] = {}
    parts = _folds(y, folds, seed) if len(grid) > 1 and folds > 1 else []
    for l2 in grid if parts else grid[:1]:
        correct = 0
        for held in parts:
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[held] = False
            w, b = _fit(z[keep], y[keep], classes, l2)
            correct += int(((z[held] @ w.t() + b).argmax(-1) == y[held]).sum())
        scores[l2] = correct / len(y) if parts else float("nan")
    best = max(scores, key=lambda v: (scores[v], v))  # ties: the stronger penalty
    w, b = _fit(z, y, classes, best)
    train_acc = float(((z @ w.t() + b).argmax(-1) == y).double().mean())
    weight = w / std  # z = (x - mean) / std  =>  z W^T + b = x (W / std)^T + (b - (W / std) mean)
    bias = b - weight @ mean
    return weight.float(), bias.float(), ProbeResult(best, train_acc, scores[best])


def _cache_key(anchor, head: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: int, seed: int) -> str:
    """SHA-256 of everything the probe depends on: the frozen weights the features come from, the examples, the
    labels and the fitting settings. Hashing ~30 MB of weights costs tens of milliseconds; the probe, seconds."""
    h = hashlib.sha256()
    skip = {id(p) for p in head.parameters()}
    for name, t in anchor.state_dict(keep_vars=True).items():
        if id(t) not in skip:
            h.update(name.encode())
            h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    for t in (images, torch.as_tensor(labels, dtype=torch.long)):
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({"classes": classes, "seed": seed, "grid": L2_GRID, "version": 1}).encode())
    return h.hexdigest()


def probe_head(anchor, images: torch.Tensor, labels: torch.Tensor, classes: int, seed: int = 0,
               cache_dir: Path | None = None) -> ProbeResult:
    """Replace ``anchor``'s task head by a linear probe of its frozen features on (images, labels).

    With ``cache_dir`` a fitted probe is kept there (safetensors, keyed by a hash of the weights, data and
    settings) and reused: every method of a bench, and every rerun of a demo, fits the same probes."""
    head = anchor.task_head()
    if not isinstance(head, nn.Linear):
        raise EstaError(f"anchor {anchor.source} has no linear task head to initialise by a probe")
    path = cached = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_cache_key(anchor, head, images, labels, classes, seed)}.safetensors"
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as f:
                    cached = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
            except Exception:  # a damaged cache entry is refitted, never trusted
                cached = None
    if cached is not None:
        tensors, meta = cached
        weight, bias = tensors["weight"], tensors["bias"]
        result = ProbeResult(float(meta["l2"]), float(meta["train_accuracy"]), float(meta["cv_accuracy"]))
    else:
        feats = head_features(anchor, images)
        weight, bias, result = fit_probe(feats, labels, classes, seed=seed)
        if path is not None:
            try:
                atomic_write(path, lambda p: save_file({"weight": weight.contiguous(), "bias": bias.contiguous()},
                                                       str(p), metadata={k: repr(v) for k, v in
                                                                         asdict(result).items()}))
            except OSError as e:  # a read-only cache costs time, not the run
                log.warning("could not cache the probe in %s: %s", path.parent, e)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
        head.bias.copy_(bias.to(head.bias.dtype))
    log.info("probe head for %s: L2 %g, train accuracy %.3f, cross-validated %.3f", anchor.source or "anchor",
             result.l2, result.train_accuracy, result.cv_accuracy)
    return result


def probe_heads(anchors, task, max_examples: int, seed: int, cache_dir: Path | None = None) -> list[dict]:
    """Fit every anchor's new head as a linear probe of its frozen features (see ``probe``; reused from
    ``cache_dir`` when the same anchor was probed on the same examples before)."""
    n = min(max_examples, len(task.train))
    data = materialize(task.train, stratified_split(task.train.labels, n, seed + 13)[0] if n < len(task.train)
                       else range(n))
    out = []
    for a in anchors:
        r = probe_head(a, data.images, data.labels, len(task.classes), seed=seed, cache_dir=cache_dir)
        out.append({"anchor": a.source, "l2": r.l2, "train_accuracy": r.train_accuracy,
                    "cv_accuracy": r.cv_accuracy})
    return out
