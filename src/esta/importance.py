"""Task-specific stitch sampling: SNIP-style importance, moving averages, budget groups, a categorical sampler.

After the backward of stitch ``s`` its score is ``Q(s) = sum |theta * dL/dtheta|`` over the trainable parameters
on its path, and ``I(s) <- beta * I(s) + (1 - beta) * Q(s)``. Stitches are grouped by cost; every step picks a group
uniformly and a stitch inside it from ``pi`` = the group's normalised scores (temperature ``tau``) mixed with an
``eps`` uniform floor, so no stitch starves. Deployment takes, per group, the stitch with the highest ``I``.

Ours, on top of the paper's rule (each an option; defaults measured, see README): ``anchor_share`` of the steps go
to the anchors (uniformly), because an anchor is the only stitch that trains its own last blocks with its own head,
and the group draw alone gave each anchor ~1 % of the steps; ``score="mean"`` divides ``Q(s)`` by the number of
parameters that received a gradient, so a stitch is not sampled more just because its path holds more trainable
parameters (the sum favours paths through the larger anchor). SN-Net's own sampler (``by_group=False``, uniform)
draws one stitch uniformly among all of them.

A stitch whose score is still 0 is *unscored*: with zero-initialised adapters (LoRA's B, the stitch's own biases,
and no trainable head, as in an LLM palette) every ``theta * grad`` is 0 before training. Unscored stitches are
sampled as if they had their group's highest score, and a stitch's first real score replaces its ``I`` instead of
being averaged with 0. Without this (measured on the Qwen pair, 200 steps) the first stitch sampled in each group
took 25 of ~40 steps while 16 of 27 were never trained, and deployment, which reads ``I``, picked the most-sampled
stitch rather than the best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import EstaError


@dataclass
class SamplingConfig:
    groups: int = 10  # budget groups: G intervals of the cost
    beta: float = 0.9  # importance moving-average factor
    tau: float = 1.0  # sampling temperature on the normalised importance scores
    eps: float = 0.1  # uniform floor of the sampling distribution
    uniform: bool = False  # ignore importance when sampling, uniform inside the group (ablation)
    by_group: bool = True  # False: SN-Net's sampler, one draw over all stitches (no budget groups)
    #: fraction of steps that train an anchor, drawn uniformly among the anchors (ours; 0 = the paper's sampler)
    anchor_share: float = 0.5
    #: importance |theta * grad| summed over the path's parameters (the paper's), or per parameter (ours)
    score: Literal["sum", "mean"] = "mean"
    #: budget groups as equal-width intervals of the cost ("linear") or of its logarithm ("log", ours)
    spacing: Literal["linear", "log"] = "log"

    def check(self) -> None:
        if self.groups < 1:
            raise EstaError(f"need at least one budget group, got {self.groups}")
        for name, v, lo, hi in (("beta", self.beta, 0.0, 1.0), ("eps", self.eps, 0.0, 1.0),
                                ("anchor_share", self.anchor_share, 0.0, 1.0)):
            if not lo <= v <= hi:
                raise EstaError(f"{name} must be in [{lo:g}, {hi:g}], got {v:g}")
        if not self.tau > 0:
            raise EstaError(f"tau must be > 0, got {self.tau:g}")
        if self.score not in ("sum", "mean"):
            raise EstaError(f"score must be 'sum' or 'mean', got {self.score!r}")
        if self.spacing not in ("linear", "log"):
            raise EstaError(f"group spacing must be 'linear' or 'log', got {self.spacing!r}")


def budget_groups(costs: list[float], groups: int = 10, spacing: str = "linear") -> list[list[int]]:
    """Stitch ids grouped by cost into ``groups`` equal-width intervals of the cost range (``spacing="log"``: of
    the log of the cost, so each group spans the same cost *ratio*); empty ones dropped.

    Why log exists (ours, measured on DeiT-shaped Ti/S/B, where FLOPs grow ~4x per anchor): equal-width FLOPs
    intervals put all 35 Ti->S stitches and both smaller anchors into the first 2 of 10 groups and the 34 S->B
    stitches into the other 8, so the cheap half of the palette (and its deployments) got a fifth of the steps.

    Each group is sorted by cost, and the groups from cheap to expensive.
    """
    if not costs:
        raise EstaError("no stitches to group")
    if groups < 1:
        raise EstaError(f"need at least one budget group, got {groups}")
    if spacing == "log":
        if min(costs) <= 0:
            raise EstaError("log-spaced budget groups need positive costs")
        return budget_groups([math.log(c) for c in costs], groups)
    if spacing != "linear":
        raise EstaError(f"group spacing must be 'linear' or 'log', got {spacing!r}")
    lo, hi = min(costs), max(costs)
    width = (hi - lo) / groups or 1.0
    out: dict[int, list[int]] = {}
    for sid, c in enumerate(costs):
        out.setdefault(min(int((c - lo) / width), groups - 1), []).append(sid)
    return [sorted(out[k], key=lambda s: (costs[s], s)) for k in sorted(out)]


def snip_score(params: list[torch.Tensor], per_parameter: bool = False) -> float:
    """``sum |theta * grad|`` over the parameters that received a gradient (``per_parameter``: divided by their
    number of elements)."""
    terms = [(p.detach() * p.grad.detach()).abs().sum() for p in params if p.grad is not None]
    if not terms:
        return 0.0
    total = float(torch.stack(terms).double().sum())  # one sync for the whole path, not one per tensor
    if per_parameter:
        total /= sum(p.numel() for p in params if p.grad is not None)
    return total


class ImportanceSampler:
    """Importance moving averages and the two-level sampler; identical on every process given the same seed."""

    def __init__(self, groups: list[list[int]], num_stitches: int, config: SamplingConfig, seed: int = 0,
                 anchors: list[int] | None = None) -> None:
        config.check()
        self.groups = groups
        self.config = config
        members = {s for g in groups for s in g}
        self.anchors = [a for a in (anchors or []) if a in members]
        self.importance = torch.zeros(num_stitches, dtype=torch.float64)
        self.updates = torch.zeros(num_stitches, dtype=torch.long)
        self.train_loss = torch.zeros(num_stitches, dtype=torch.float64)  # moving average of each stitch's loss
        self.generator = torch.Generator().manual_seed(seed)

    def initialise(self, scores: dict[int, float]) -> None:
        """Start every I(s) from one scoring batch (before training); a score of 0 leaves the stitch unscored."""
        for sid, q in scores.items():
            self.importance[sid] = q

    def update(self, stitch: int, score: float, loss: float | None = None) -> None:
        b = self.config.beta
        first = self.importance[stitch] <= 0  # unscored: the first real score starts the average
        self.importance[stitch] = score if first else b * self.importance[stitch] + (1 - b) * score
        if loss is not None:
            old = self.train_loss[stitch]
            self.train_loss[stitch] = loss if self.updates[stitch] == 0 else b * old + (1 - b) * loss
        self.updates[stitch] += 1

    def probabilities(self, group: int) -> torch.Tensor:
        members = self.groups[group]
        n = len(members)
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
        if self.config.uniform:
            return uniform
        scores = self.importance[members].clamp_min(0)
        if scores.sum() <= 0:
            return uniform
        scores = torch.where(scores > 0, scores, scores.max())  # unscored: optimistic, so each is tried soon
        p = (scores / scores.sum()) ** (1.0 / self.config.tau)
        p = p / p.sum()
        return (1 - self.config.eps) * p + self.config.eps * uniform

    def distribution(self) -> torch.Tensor:
        """The probability of every stitch being trained at the next step (0 for stitches outside the groups)."""
        p = torch.zeros(len(self.importance), dtype=torch.float64)
        if self.config.by_group:
            for g, members in enumerate(self.groups):
                p[members] += self.probabilities(g) / len(self.groups)
        else:
            members = [s for g in self.groups for s in g]
            p[members] = 1.0 / len(members)
        share = self.config.anchor_share if self.anchors else 0.0
        if share > 0:
            p *= 1 - share
            p[self.anchors] += share / len(self.anchors)
        return p

    def floor(self, stitch: int) -> float:
        """The least probability ``stitch`` can have, whatever the scores: the ``eps`` floor inside its group
        (and the anchors' share)."""
        share = self.config.anchor_share if self.anchors else 0.0
        if not self.config.by_group:
            return float(self.distribution()[stitch])
        n = next(len(g) for g in self.groups if stitch in g)
        inside = 1.0 / n if self.config.uniform else self.config.eps / n
        return (1 - share) * inside / len(self.groups) + (share / len(self.anchors) if stitch in self.anchors else 0)

    def sample(self) -> int:
        return int(torch.multinomial(self.distribution(), 1, generator=self.generator))

    def best_in(self, members: list[int]) -> int:
        """The member with the highest importance (ties: the cheaper, i.e. earlier-listed one)."""
        return max(members, key=lambda s: (float(self.importance[s]), -members.index(s)))

    def state_dict(self) -> dict:
        return {"importance": self.importance.clone(), "updates": self.updates.clone(),
                "train_loss": self.train_loss.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.importance.copy_(state["importance"])
        self.updates.copy_(state["updates"])
        if "train_loss" in state:  # checkpoints of esta <= 0.1 have none
            self.train_loss.copy_(state["train_loss"])
        self.generator.set_state(state["generator"])
