"""Stitch screening: leave out the stitches that least-squares init left worse than every anchor.

After the stitching layers are fitted, each stitch runs once (forward only, no gradients) over a small fixed batch.
A stitch whose loss exceeds the worst anchor's by more than ``log(ratio)`` (its perplexity is more than ``ratio``
times the worst anchor's) is dropped from training and from deployment; the anchors always stay. With ``ratio=1``
a stitch must start no worse than the small anchor: one that costs more and predicts worse is dominated.

Why (measured on Qwen2.5-Coder 0.5B -> 1.5B, 8 records): cuts that enter the 1.5B at its blocks 0-5 start at
perplexity 40-1,350 against 40 for the 0.5B anchor (the 1.5B's early blocks build massive activations that a
linear map of the 0.5B's states does not supply), cuts into its last 2-4 blocks start 10-60 % worse than the
0.5B, a few hundred steps repair neither, and the SNIP importance (which grows with the loss) ranks such stitches
first in their budget group, so one-stage deployment shipped them (perplexity 160, and 24.2 against 22.0).
The cost is one forward per stitch on a few examples, not SN-Net's evaluation sweep over a validation set.

``best_per_group`` (ours) then keeps only the ``k`` stitches of each budget group that start best. Why: one training
run shares its steps among the stitches it trains; on the Qwen pair with first-token states 57 cuts passed
screening and shared 150 stitch steps, 0-4 updates each, and the middle cuts ended above the small anchor.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .errors import EstaError
from .palette import Palette

log = logging.getLogger("esta")


@dataclass
class Screening:
    ratio: float  # a stitch may be at most this many times the worst anchor's perplexity (exp of the loss)
    threshold: float  # the loss above which a stitch was dropped
    losses: list[float]  # per stitch, mean over the screening batches
    kept: list[int]
    dropped: list[int]
    per_group: int = 0  # at most this many stitches (besides the anchors) kept per budget group (0: no cap)

    def to_dict(self, palette: Palette | None = None) -> dict:
        d = asdict(self)
        if palette is not None:
            d["dropped_names"] = [palette.space[s].name for s in self.dropped]
        return d


@torch.no_grad()
def screen_stitches(palette: Palette, batches: list[Any], loss_fn: Callable[[Any, Any, int], torch.Tensor],
                    ratio: float = 1.0, progress: bool = False) -> Screening:
    """Run every stitch over ``batches`` and keep those within ``ratio`` x the worst anchor's perplexity."""
    if ratio < 1:
        raise EstaError(f"the screening ratio must be >= 1 (a multiple of the worst anchor's perplexity), got {ratio}")
    if not batches:
        raise EstaError("stitch screening needs at least one batch")
    was_training = palette.training
    palette.eval()
    losses = []
    for s in tqdm(range(len(palette)), desc="screening stitches", disable=not progress, leave=False):
        losses.append(sum(float(loss_fn(palette, b, s)) for b in batches) / len(batches))
    palette.train(was_training)
    anchors = palette.space.anchor_ids()
    bad = [s for s in range(len(palette)) if not math.isfinite(losses[s])]
    if any(a in bad for a in anchors):
        raise EstaError("an anchor's loss is not finite on the screening batch: check the anchors' dtype and data")
    threshold = max(losses[a] for a in anchors) + math.log(ratio)
    kept = [s for s in range(len(palette)) if s in anchors or (s not in bad and losses[s] <= threshold)]
    dropped = [s for s in range(len(palette)) if s not in kept]
    if dropped:
        log.info("screening dropped %d of %d stitches (perplexity > %.2g x the worst anchor's): %s", len(dropped),
                 len(palette), ratio, ", ".join(f"{palette.space[s].name} ({math.exp(min(losses[s], 50)):.1f})"
                                                for s in dropped))
    return Screening(ratio, threshold, losses, kept, dropped)


def best_per_group(screening: Screening, groups: list[list[int]], k: int, anchors: list[int]) -> Screening:
    """``screening`` with at most ``k`` kept stitches per budget group besides the anchors: those with the lowest
    screening loss. The others join the dropped ones."""
    if k < 1:
        raise EstaError(f"stitches kept per budget group must be at least 1, got {k}")
    kept = set(anchors)
    for group in groups:
        ranked = sorted((s for s in group if s in screening.kept and s not in anchors),
                        key=lambda s: screening.losses[s])
        kept.update(ranked[:k])
    capped = [s for s in screening.kept if s not in kept]
    if capped:
        log.info("kept the best %d per budget group: %d more stitches left out", k, len(capped))
    return replace(screening, kept=[s for s in screening.kept if s in kept],
                   dropped=sorted(screening.dropped + capped), per_group=k)
