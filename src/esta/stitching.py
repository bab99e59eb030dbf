"""Stitching layers: a linear map from the front anchor's width to the end anchor's, fitted by least squares.

SN-Net's initialisation: on one calibration batch, X = the tokens leaving front block ``j`` and Y = the tokens that
end block ``m`` normally receives (the output of end block ``m-1``, or the end anchor's embedding when ``m = 0``);
solve ``[X 1] W ~= Y`` in float64, and average the solutions of all cuts that share the layer. An optional ridge
term keeps the fit from chasing a few outlier features when the calibration tokens are few for the width (LLMs).

Ours, for families whose tokens sit at fixed positions (ViT: [CLS] and the patches): a learned *offset per token
position* beside the shared map (``y = W x + o[t]``), fitted in the same least squares (per position, the offset is
the mean residual). Why: the end anchor's hidden states carry its own position embeddings, which the front
anchor's tokens cannot supply through one map shared by all positions; an offset per position (and [CLS]'s own)
supplies them exactly. Measured on the mini family (Fashion-MNIST, the anchors' own heads, no training, a layer per
cut, 1,000 test images): the stitch that enters S at its embedding 72.5 -> 82.0 % (S alone 83.6 %), the one that
enters B at its embedding 76.8 -> 84.6 % (B 86.3 %); no cut measured worse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import EstaError
from .space import StitchSpace


def least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0,
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[d_out, d_in]`` and bias ``[d_out]`` minimising ``sum_rows weight * |x W^T + b - y|^2``.

    ``ridge`` > 0 adds ``ridge * rows * mean feature variance * |W|^2`` (scale-free; the bias is not penalised).
    """
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    a = torch.cat([x, ones], dim=1)
    if weight is not None:  # weighted rows = plain least squares on rows scaled by sqrt(weight)
        sw = weight.reshape(-1, 1).double().sqrt()
        a, y = a * sw, y * sw
    if ridge > 0:
        # Normal equations: the ridge makes them well conditioned, and one [d, d] solve is much faster than an SVD
        # of [rows, d] when rows are LLM calibration tokens (tens of thousands).
        penalty = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
        penalty[-1] = 0  # the bias is not penalised
        lam = ridge * x.shape[0] * float(x.var(0).mean())
        wb = torch.linalg.solve(a.t() @ a + torch.diag(lam * penalty), a.t() @ y)
    else:
        # gelsd (SVD based) copes with rank-deficient features; the CPU default (gelsy) also does, gels would not.
        wb = torch.linalg.lstsq(a, y, driver="gelsd" if x.device.type == "cpu" else None).solution
    # wb: [d_in + 1, d_out]
    return wb[:-1].t().contiguous(), wb[-1].contiguous()


class StitchingLayer(nn.Linear):
    """``y = W x + b`` per token, plus a learned offset per token position when ``tokens > 0`` (see above), and for
    causal LMs optionally a first-token state (``first_state``: see :func:`with_first_state`)."""

    def __init__(self, in_features: int, out_features: int, tokens: int = 0, first_state: bool | int = False, *,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, dtype=dtype)
        self.offset = nn.Parameter(torch.zeros(tokens, out_features, dtype=dtype)) if tokens else None
        self.first_state = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if first_state else None

    @property
    def tokens(self) -> int:
        return 0 if self.offset is None else int(self.offset.shape[0])

    def add_offset(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` (``[batch, tokens, out]``) plus the per-position offset, if this layer has one."""
        if self.offset is None:
            return y
        if y.dim() != 3 or y.shape[1] != self.offset.shape[0]:
            raise EstaError(f"this stitching layer has offsets for {self.offset.shape[0]} token positions, got "
                            f"tokens of shape {list(y.shape)}")
        return y + self.offset.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_offset(super().forward(x))


def with_first_state(layer: nn.Module, h: torch.Tensor, ctx: Any) -> torch.Tensor:
    """``h`` (a stitching layer's output) with the layer's first-token state at position 0, if it has one.

    Why (ours, causal LMs): the first token sees only itself, so an anchor's state there depends on that one token,
    and from its early blocks on Qwen2.5 puts its "massive activations" (the attention sink the later blocks lean on)
    there. Least squares leaves that token out (it would swamp the fit), so a stitch entered the end anchor with an
    ordinary-looking first token. The end anchor's own state at the cut for the calibration records' first token
    (one vector; the chat template's first token is always the same) took the screening perplexity of 74 Qwen cuts
    at init from a median of 39.1 to 29.8 (docs/llm.md). Applied where the position id is 0, so the decoding steps
    of a KV-cached generation (positions > 0) are unchanged. ``layer`` may be PST-wrapped (its ``base`` holds it).
    """
    state = getattr(getattr(layer, "base", layer), "first_state", None)
    positions = ctx.get("position_ids") if isinstance(ctx, dict) else None
    if state is None or positions is None:
        return h
    return torch.where((positions == 0).unsqueeze(-1), state.to(h.dtype), h)


def make_stitching_layers(space: StitchSpace, widths: list[int], dtype: torch.dtype = torch.float32,
                          tokens: int = 0, first_state: bool = False) -> nn.ModuleDict:
    """One layer per key of the space; ``tokens > 0``: with an offset per token position (fixed-position families);
    ``first_state``: with a first-token state (causal LMs, see :func:`with_first_state`)."""
    return nn.ModuleDict({
        key: StitchingLayer(widths[a], widths[b], tokens, first_state, dtype=dtype)
        for key, (a, b) in space.layers.items()
    })


def least_squares_offset(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[d_out, d_in]`` and per-position offset ``[tokens, d_out]`` minimising
    ``sum weight * |x W^T + o[t] - y|^2`` over ``x, y`` of shape ``[batch, tokens, d]``: the offset of a position is
    its mean residual, so ``W`` is the weighted fit of the tokens centred on their position's mean."""
    x, y = x.double(), y.double()
    xm, ym = x.mean(0), y.mean(0)
    w, _ = least_squares(x - xm, y - ym, 0.0, weight)
    return w, ym - xm @ w.t()


def drop_outliers(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, ratio: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The rows (tokens, ``[n, d]``) whose target norm is at most ``ratio`` x the median target norm.

    Why (ours): from its 5th block on, Qwen2.5-Coder-1.5B gives a few tokens per record besides the first (49 of
    1,007 in 8 records) "massive activations", norms 10-20x the median, and a squared error is dominated by those
    few rows. Measured on the 0.5B -> 1.5B pair (64 calibration records, screening perplexity on 8 others; the
    0.5B anchor 37.3): without them 45 of 74 cuts start better and 15 worse, median 45.2 -> 39.0, and 26 stitches
    instead of 11 pass screening (cuts of 1.0-1.25 B now among them); but the cuts entering the 1.5B at its blocks
    4-8 get worse (e.g. 57 -> 126) and, at 300 steps, the extra candidates end worse than the 0.5B anchor.
    """
    norms = y.double().norm(dim=-1)
    keep = norms <= ratio * norms.median()
    if bool(keep.all()) or int(keep.sum()) <= x.shape[-1]:  # nothing to drop, or too few rows left to fit
        return x, y, weight
    return x[keep], y[keep], weight[keep] if weight is not None else None


@torch.no_grad()
def init_least_squares(layers: nn.ModuleDict, space: StitchSpace,
                       hidden: list[list[torch.Tensor]], masks: list[torch.Tensor | None], ridge: float = 0.0,
                       progress: bool = False, weights: list[torch.Tensor | None] | None = None,
                       outliers: float = 0.0) -> None:
    """Fit every stitching layer from per-anchor hidden states (``hidden[a][k]``: input of block ``k`` of anchor a).

    ``masks[a]`` (``[batch, tokens]`` bool or None) selects the tokens to fit on, e.g. no padding; ``weights[a]``
    (``[batch, tokens]`` or None) weighs them (see ``Anchor.token_weights``); ``outliers`` > 0 (layers without
    offsets): each cut is fitted without the tokens whose target norm is over ``outliers`` x the median (see
    :func:`drop_outliers`).
    """
    weights = weights or [None] * len(hidden)
    for key, layer in tqdm(layers.items(), desc="least-squares init", disable=not progress, leave=False):
        ws, bs = [], []
        for cut in space.cuts_of_layer(key):
            a, b = cut.front, cut.end
            x = hidden[a][cut.front_last + 1]  # output of front block j
            y = hidden[b][cut.end_first]  # input of end block m
            mask = masks[a] if masks[a] is not None else masks[b]
            weight = weights[a] if weights[a] is not None else weights[b]
            if getattr(layer, "offset", None) is not None:  # fixed positions: no padding to mask out
                w, bias = least_squares_offset(x, y, weight)
            else:
                if mask is not None:
                    x, y = x[mask], y[mask]
                    weight = weight[mask] if weight is not None else None
                if outliers > 0:
                    x, y, weight = drop_outliers(x, y, weight, outliers)
                w, bias = least_squares(x, y, ridge, weight)
            ws.append(w)
            bs.append(bias)
        layer.weight.copy_(torch.stack(ws).mean(0).to(layer.weight.dtype))
        if getattr(layer, "first_state", None) is not None:  # the end anchor's own state at position 0
            first = [hidden[c.end][c.end_first][:, 0].float().mean(0) for c in space.cuts_of_layer(key)]
            layer.first_state.copy_(torch.stack(first).mean(0).to(layer.first_state.dtype))
        if getattr(layer, "offset", None) is not None:
            layer.bias.zero_()  # the offsets hold the constant part, position by position
            layer.offset.copy_(torch.stack(bs).mean(0).to(layer.offset.dtype))
        else:
            layer.bias.copy_(torch.stack(bs).mean(0).to(layer.bias.dtype))
