"""The stitching layers' least-squares fit summed over many calibration batches (ours, for language families).

``init_least_squares`` fits on the hidden states of one batch held in memory at once: for the Qwen2.5 pair that is
64 records (12k tokens) for maps of 897 x 1,536 weights, and 64 records is about what fits beside the two models.
The fit is starved of data there. Measured on the 0.5B -> 1.5B pair (validation perplexity at init, no training,
first-token state on; anchors 7.09 / 4.86): ``0[:15]->1[17:]`` 9.44 / 8.76 / 8.12 and ``0[:11]->1[13:]`` 8.86 /
8.26 / 7.67 with 64 / 128 / 256 calibration records.

So the fit keeps only the sums of its normal equations, ``[X 1]^T [X 1]`` and ``[X 1]^T Y``, batch by batch: memory is
one [d+1, d+1] matrix per front block and one [d+1, d_out] matrix per cut, whatever the number of records, and the
solution is the one ``least_squares`` gives on all rows at once (with a ridge: the same normal equations). Products
are taken in float32 per batch and summed in float64.

Tokens with massive activations (``outliers`` > 0, see ``stitching.drop_outliers``) are left out per cut against
the median target norm of the *first* batch (a median cannot be summed); their rows are subtracted from the shared
front-block sums. The first-token state is the mean of the end anchor's position-0 states over all batches.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import EstaError
from .space import StitchSpace


class NormalEquations:
    """Sums of every stitching layer's least-squares problem over calibration batches: ``add`` each batch's hidden
    states (``Anchor.hidden_states``), then ``solve`` sets the layers."""

    def __init__(self, layers: nn.ModuleDict, space: StitchSpace, outliers: float = 0.0) -> None:
        if any(getattr(layer, "offset", None) is not None for layer in layers.values()):
            raise EstaError("the batched least-squares fit does not fit per-position offsets (vision families)")
        self.layers, self.space, self.outliers = layers, space, outliers
        self.cuts = {key: space.cuts_of_layer(key) for key in layers}
        self.gram: dict[tuple[int, int], torch.Tensor] = {}  # (anchor, hidden index) -> [X 1]^T [X 1], all rows
        self.dropped: dict[int, torch.Tensor] = {}  # cut id -> the same over its outlier rows (subtracted)
        self.cross: dict[int, torch.Tensor] = {}  # cut id -> [X 1]^T Y over its kept rows
        self.first: dict[int, list] = {}  # cut id -> [sum of the end anchor's position-0 states, count]
        self.median: dict[int, float] = {}  # cut id -> median target norm of the first batch
        self.batches = 0

    @torch.no_grad()
    def add(self, hidden: list[list[torch.Tensor]], masks: list[torch.Tensor | None]) -> None:
        """One batch: ``hidden[a][k]`` the input of block ``k`` of anchor ``a``; ``masks[a]`` the tokens to fit."""
        done: set[tuple[int, int]] = set()
        for cuts in self.cuts.values():
            for cut in cuts:
                a, b, j = cut.front, cut.end, cut.front_last + 1
                mask = masks[a] if masks[a] is not None else masks[b]
                y_all = hidden[b][cut.end_first]
                first = self.first.setdefault(cut.id, [0.0, 0])
                first[0] = first[0] + y_all[:, 0].double().sum(0)
                first[1] += y_all.shape[0]
                x = hidden[a][j][mask] if mask is not None else hidden[a][j].flatten(0, -2)
                y = (y_all[mask] if mask is not None else y_all.flatten(0, -2)).float()
                rows = torch.cat([x.float(), torch.ones(x.shape[0], 1)], dim=1)
                if (a, j) not in done:  # shared by every cut that leaves anchor a at this block
                    self.gram[(a, j)] = self.gram.get((a, j), 0) + (rows.t() @ rows).double()
                    done.add((a, j))
                if self.outliers > 0:
                    norms = y.norm(dim=-1)
                    median = self.median.setdefault(cut.id, float(norms.median()))
                    drop = norms > self.outliers * median
                    if bool(drop.any()):
                        out = rows[drop]
                        self.dropped[cut.id] = self.dropped.get(cut.id, 0) + (out.t() @ out).double()
                        y = y * (~drop).unsqueeze(1)  # a dropped row adds nothing to [X 1]^T Y
                self.cross[cut.id] = self.cross.get(cut.id, 0) + (rows.t() @ y).double()
        self.batches += 1

    @torch.no_grad()
    def solve(self, ridge: float = 0.0) -> None:
        """Set every layer to its fit (the mean over the cuts that share it), as ``init_least_squares`` does."""
        if not self.batches:
            raise EstaError("no calibration batch was added to the least-squares fit")
        for key, layer in self.layers.items():
            ws, bs = [], []
            for cut in self.cuts[key]:
                gram = self.gram[(cut.front, cut.front_last + 1)] - self.dropped.get(cut.id, 0)
                n = float(gram[-1, -1])  # the ones column: its own sum is the number of rows
                if n <= gram.shape[0]:
                    raise EstaError(f"{int(n)} calibration tokens for a stitching layer of width {gram.shape[0] - 1}:"
                                    " pass more calibration records")
                if ridge > 0:  # least_squares' scale-free ridge: ridge * rows * mean feature variance
                    mean = gram[-1, :-1] / n  # x.var(0), unbiased as torch's, from the sums
                    lam = ridge * n * float(((gram.diagonal()[:-1] - n * mean ** 2) / (n - 1)).mean())
                    penalty = torch.full((gram.shape[0],), lam, dtype=gram.dtype)
                    penalty[-1] = 0  # the bias is not penalised
                    wb = torch.linalg.solve(gram + torch.diag(penalty), self.cross[cut.id])
                else:
                    wb = torch.linalg.lstsq(gram, self.cross[cut.id], driver="gelsd").solution
                ws.append(wb[:-1].t())
                bs.append(wb[-1])
            layer.weight.copy_(torch.stack(ws).mean(0).to(layer.weight.dtype))
            layer.bias.copy_(torch.stack(bs).mean(0).to(layer.bias.dtype))
            if getattr(layer, "first_state", None) is not None:
                first = [self.first[c.id][0] / self.first[c.id][1] for c in self.cuts[key]]
                layer.first_state.copy_(torch.stack(first).mean(0).to(layer.first_state.dtype))
