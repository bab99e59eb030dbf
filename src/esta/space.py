"""Which stitches exist: SN-Net's paired stitching, generalised to anchors of unequal depth.

A stitch runs blocks ``0..j`` of a *front* anchor, maps the tokens with a stitching layer, then runs blocks
``m..L-1`` of an *end* anchor and the end anchor's head. The anchors themselves are stitches too.

Paired stitching (SN-Net): a window of ``kernel`` block positions slides with ``stride`` over the front anchor.
Window ``i`` holds front blocks ``F = [i, i+kernel)`` and end start positions ``E``; every pair ``(j, m)`` in
``F x E`` that no earlier window produced is a cut, and all cuts of one window share one stitching layer.
For equal depths ``E = F`` (SN-Net exactly: 34 cuts and 11 layers per pair of 12-block anchors). For unequal
depths (ours) the window is moved to where front block ``i`` lands in the end anchor: a front cut after block
``j`` of an ``La``-block anchor continues naturally at block ``round((j+1) * Lb / La)`` of an ``Lb``-block one,
and ``E = [n(i) - 1, n(i) - 1 + kernel)`` with ``n(i)`` that natural start, which is ``F`` again when
``La == Lb``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Literal

from .errors import EstaError

Pairing = Literal["nearest", "all"]
#: "per-window": all cuts of a window share one stitching layer (SN-Net); "per-cut": every cut has its own (ours)
StitchLayers = Literal["per-window", "per-cut"]


@dataclass(frozen=True)
class Stitch:
    """One network of the palette. For an anchor, ``front == end`` and the cut fields are ``None``."""

    id: int
    front: int  # index of the front anchor (the one whose embedding runs)
    end: int  # index of the end anchor (the one whose head runs)
    front_last: int | None = None  # j: the front anchor runs blocks 0..j
    end_first: int | None = None  # m: the end anchor runs blocks m..L-1
    layer: str | None = None  # key of the stitching layer this cut uses

    @property
    def is_anchor(self) -> bool:
        return self.layer is None

    @property
    def name(self) -> str:
        if self.is_anchor:
            return f"anchor{self.front}"
        return f"{self.front}[:{self.front_last + 1}]->{self.end}[{self.end_first}:]"  # Python slices of the blocks


@dataclass(frozen=True)
class StitchSpace:
    """The palette's stitches, in a fixed order (anchors first). ``stitches[i].id == i``."""

    depths: tuple[int, ...]
    stitches: tuple[Stitch, ...]
    kernel: int
    stride: int
    pairing: Pairing
    two_way: bool
    stitch_layers: StitchLayers = "per-window"

    def anchor_ids(self) -> list[int]:
        """The ids of the anchors themselves (the stitches with no cut), smallest anchor first."""
        return sorted((s.id for s in self.stitches if s.is_anchor), key=lambda i: self.stitches[i].front)

    def __len__(self) -> int:
        return len(self.stitches)

    def __getitem__(self, i: int) -> Stitch:
        return self.stitches[i]

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        """Stitching-layer key -> (front anchor, end anchor), in first-use order."""
        out: dict[str, tuple[int, int]] = {}
        for s in self.stitches:
            if s.layer is not None and s.layer not in out:
                out[s.layer] = (s.front, s.end)
        return out

    def cuts_of_layer(self, key: str) -> list[Stitch]:
        return [s for s in self.stitches if s.layer == key]

    def to_dict(self) -> dict:
        per_pair: dict[str, dict[str, int]] = {}
        for s in self.stitches:
            if s.is_anchor:
                continue
            d = per_pair.setdefault(f"{s.front}->{s.end}", {"stitches": 0, "stitching_layers": 0})
            d["stitches"] += 1
        for key, (a, b) in self.layers.items():
            per_pair[f"{a}->{b}"]["stitching_layers"] += 1
        return {
            "depths": list(self.depths),
            "kernel": self.kernel,
            "stride": self.stride,
            "pairing": self.pairing,
            "two_way": self.two_way,
            "stitch_layers": self.stitch_layers,
            "count": len(self.stitches),
            "anchors": len(self.depths),
            "stitching_layers": len(self.layers),
            "pairs": per_pair,
            "stitches": [asdict(s) for s in self.stitches],
        }

    def describe(self) -> str:
        """How many stitches and stitching layers, in all and per anchor pair."""
        d = self.to_dict()
        return "\n".join([f"{d['count']} stitches ({d['anchors']} anchors), {d['stitching_layers']} stitching layers",
                          *(f"  anchors {pair}: {v['stitches']} stitches, {v['stitching_layers']} stitching layers"
                            for pair, v in d["pairs"].items())])

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def depths_of(anchors: list[str]) -> list[int]:
    """The depths of these anchor folders or hub ids, from their configs alone (no weights, never remote code)."""
    from .families import _config

    return [int(_config(a)[0].num_hidden_layers) for a in anchors]


def natural_start(j: int, front_depth: int, end_depth: int) -> int:
    """The end-anchor block that naturally follows front block ``j`` (``j + 1`` for equal depths)."""
    # Half-up rounding, written out: Python's round() rounds halves to even, which would make the map depend on parity.
    return math.floor((j + 1) * end_depth / front_depth + 0.5)


def paired_cuts(front_depth: int, end_depth: int, kernel: int = 2, stride: int = 1) -> list[list[tuple[int, int]]]:
    """Cuts ``(j, m)`` between two anchors, grouped by the stitching layer (window) they share."""
    if kernel < 1 or stride < 1:
        raise EstaError(f"stitching window needs kernel >= 1 and stride >= 1, got kernel={kernel} stride={stride}")
    seen: set[tuple[int, int]] = set()
    windows: list[list[tuple[int, int]]] = []
    for i in range(0, front_depth, stride):
        fronts = range(i, min(i + kernel, front_depth))
        e0 = natural_start(i, front_depth, end_depth) - 1
        ends = range(max(e0, 0), min(e0 + kernel, end_depth))
        new = [(j, m) for j in fronts for m in ends if (j, m) not in seen]
        if new:
            seen.update(new)
            windows.append(new)
    return windows


def build_space(
    depths: list[int] | tuple[int, ...],
    kernel: int = 2,
    stride: int = 1,
    pairing: Pairing = "nearest",
    two_way: bool = False,
    stitch_layers: StitchLayers = "per-window",
) -> StitchSpace:
    """All stitches of a family whose anchors (sorted small to large) have the given depths.

    ``pairing="nearest"`` stitches neighbours only (Ti->S, S->B); ``"all"`` every pair. Stitches go small -> large;
    ``two_way=True`` adds large -> small (SN-Netv2). ``stitch_layers="per-cut"`` gives every cut its own stitching
    layer instead of one per window (the same stitches; ours). Why: least squares fits each cut's own map, and the
    average of the window's solutions fits none of them. Measured on the mini family (Fashion-MNIST, anchors' own
    heads, no training, 1,000 test images): the first S->B window's four cuts 52/59/42/40 % with the averaged layer,
    77/66/72/77 % with a layer each; Ti->S window 1 47/46/43 % -> 59/68/69 %.
    """
    depths = tuple(int(d) for d in depths)
    if len(depths) < 1 or any(d < 1 for d in depths):
        raise EstaError(f"every anchor needs at least one block, got depths {list(depths)}")
    if pairing not in ("nearest", "all"):
        raise EstaError(f"pairing must be 'nearest' or 'all', got {pairing!r}")
    if stitch_layers not in ("per-window", "per-cut"):
        raise EstaError(f"stitch_layers must be 'per-window' or 'per-cut', got {stitch_layers!r}")
    n = len(depths)
    pairs = [(a, a + 1) for a in range(n - 1)] if pairing == "nearest" else list(combinations(range(n), 2))
    if two_way:
        pairs = pairs + [(b, a) for a, b in pairs]

    stitches: list[Stitch] = [Stitch(id=a, front=a, end=a) for a in range(n)]
    for a, b in pairs:
        for w, cuts in enumerate(paired_cuts(depths[a], depths[b], kernel, stride)):
            key = f"{a}to{b}_w{w}"  # no dots: the key names a module in an nn.ModuleDict
            for j, m in cuts:
                layer = key if stitch_layers == "per-window" else f"{a}to{b}_j{j}m{m}"
                stitches.append(Stitch(len(stitches), a, b, front_last=j, end_first=m, layer=layer))
    return StitchSpace(depths, tuple(stitches), kernel, stride, pairing, two_way, stitch_layers)
