"""End-anchor calibration of the stitching layers (ours, beyond the paper): label-free, after least squares.

Least squares fits a stitching layer at the stitch point: the tokens leaving front block ``j`` should look like the
tokens end block ``m`` normally receives. What the stitch is judged by is its *output*, after the end anchor's
remaining blocks have run on those tokens, and a small error at the stitch point grows through them: after the fit
a stitch gets worse the more of the end anchor it runs. So a short phase tunes each stitching layer (its whole weight
and bias, starting from the least-squares fit) so that the stitch's final features (what the end anchor's head reads:
a ViT's normed [CLS] token, an LLM's normed hidden states) match the end anchor's own on the same inputs, for every
cut that shares the layer. No labels: the end anchor is the teacher. This is the "match the end model's final
features" remedy of *Revisiting Model Stitching* (CVPR 2026), with the anchors frozen as PST keeps them.

Cost: per stitching layer, ``steps`` forward and backward passes of the end part of its cuts on ``batch_size``
examples; the front part and the teachers' features are computed once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import EstaError
from .space import Stitch
from .stitching import with_first_state


@dataclass
class CalibrationConfig:
    """End-anchor calibration of the stitching layers (ours); ``steps=0`` turns it off (the paper's ESTA)."""

    steps: int = 0  # end-anchor calibration: Adam steps per stitching layer after least squares (ours; 0: off)
    lr: float = 1e-3  # end-anchor calibration learning rate
    batch_size: int = 32  # end-anchor calibration: examples per step
    examples: int = 512  # end-anchor calibration: training examples it sees (labels unused)
    #: end-anchor calibration only of the stitching layers whose cuts enter the end anchor at its blocks 1..N, where
    #: least squares leaves the deepest dip (0: every layer)
    first_blocks: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        if self.steps < 0:
            raise EstaError(f"calibration steps must be >= 0, got {self.steps}")
        if self.first_blocks < 0:
            raise EstaError(f"calibration's first blocks must be >= 0, got {self.first_blocks}")
        if self.steps and (self.batch_size < 1 or self.examples < 1):
            raise EstaError(f"calibration needs a batch size and examples >= 1, got {self.batch_size} and "
                            f"{self.examples}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise EstaError(f"calibration learning rate must be a positive number, got {self.lr:g}")


def take(inputs: Any, idx: torch.Tensor | slice) -> Any:
    """Rows ``idx`` of a batch: a tensor, or a dict of tensors (input ids and masks)."""
    if isinstance(inputs, dict):
        return {k: v[idx] for k, v in inputs.items()}
    return inputs[idx]


def batch_len(inputs: Any) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


def feature_error(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error relative to the target's mean square (scale-free: 0 is exact, 1 is as far as zero).
    ``mask`` (``[batch, tokens]``) picks the tokens that count when the features are per token."""
    if mask is not None and out.dim() == 3:
        out, target = out[mask], target[mask]
    out, target = out.float(), target.float()
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def end_features(palette, stitch: Stitch, h_front: torch.Tensor, inputs: Any, layer=None) -> torch.Tensor:
    """The stitch's final features from the front anchor's tokens after its block ``j`` (``h_front``)."""
    end = palette.anchors[stitch.end]
    layer = layer if layer is not None else palette.stitching[stitch.layer]
    h = layer(h_front)
    ctx = end.context(inputs, h, stitch.end_first)
    h = with_first_state(layer, h, ctx)
    for i in range(stitch.end_first, end.depth):
        h = end.block(i, h, ctx)
    return end.head_features(h)


class _Cache:
    """Every anchor's hidden states on the calibration inputs and its own final features (the teachers), once."""

    def __init__(self, palette, inputs: Any) -> None:
        with torch.no_grad():
            states = [a.hidden_states(inputs) for a in palette.anchors]
            self.hidden = [h for h, _ in states]
            self.mask = next((m for _, m in states if m is not None), None)
            self.target = [a.head_features(h[-1]) for a, h in zip(palette.anchors, self.hidden)]


@torch.no_grad()
def layer_error(palette, key: str, inputs: Any, cache: _Cache | None = None) -> float:
    """Mean end-feature error of the cuts that share stitching layer ``key`` (see :func:`feature_error`)."""
    cache = cache or _Cache(palette, inputs)
    cuts = palette.space.cuts_of_layer(key)
    errors = [feature_error(end_features(palette, c, cache.hidden[c.front][c.front_last + 1], inputs),
                            cache.target[c.end], cache.mask) for c in cuts]
    return float(torch.stack(errors).mean())


def calibrate_stitching(palette, inputs: Any, config: CalibrationConfig, seed: int = 0,
                        progress: bool = False, keys: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Tune every stitching layer of ``palette`` (or only those named in ``keys``) towards its end anchor's final
    features on ``inputs`` (in place; the anchors stay frozen). Returns each layer's end-feature error before and
    after (on ``inputs``)."""
    config.check()
    report: dict[str, dict[str, float]] = {}
    if not config.steps or not len(palette.stitching):
        return report
    was_training = palette.training
    palette.eval()  # no dropout: the teacher's features and the stitch's must be computed the same way
    cache = _Cache(palette, inputs)
    n = batch_len(inputs)
    generator = torch.Generator().manual_seed(seed)
    unknown = sorted(set(keys or ()) - set(palette.stitching.keys()))
    if unknown:
        raise EstaError(f"no stitching layer named {unknown[0]!r} in this palette")
    keys = [k for k in palette.stitching.keys() if (keys is None or k in keys) and (
            not config.first_blocks or any(1 <= c.end_first <= config.first_blocks
                                           for c in palette.space.cuts_of_layer(k)))]
    for key in tqdm(keys, desc="calibrating stitching layers", disable=not progress, leave=False):
        layer = palette.stitching[key]
        cuts = palette.space.cuts_of_layer(key)
        before = layer_error(palette, key, inputs, cache)
        params = [p for p in layer.parameters()]
        start = [p.detach().clone() for p in params]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=config.lr)
        for _ in range(config.steps):
            idx = torch.randperm(n, generator=generator)[:config.batch_size]
            part = take(inputs, idx)
            mask = cache.mask[idx] if cache.mask is not None else None
            with torch.enable_grad():
                loss = sum(feature_error(end_features(palette, c, cache.hidden[c.front][c.front_last + 1][idx], part),
                                         cache.target[c.end][idx], mask) for c in cuts) / len(cuts)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if not math.isfinite(float(loss.detach())):
                raise EstaError(f"calibration of stitching layer {key} diverged (loss {float(loss)}); lower the "
                                f"calibration learning rate ({config.lr:g})")
            optimizer.step()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
        after = layer_error(palette, key, inputs, cache)
        if not after < before:  # a learning rate too high for this layer: keep the least-squares fit
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            after = before
        report[key] = {"before": before, "after": after}
    palette.train(was_training)
    return report
