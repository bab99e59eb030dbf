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
from .routes import Route, snnet_routes, snnetv2_routes

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
    # A three-segment route (SN-Netv2's L->S->L, SN-Net's Ti->S->B) runs a middle anchor's blocks mid_first..mid_last
    # between the front and the end, entered through ``layer`` and left through ``layer2``.
    mid: int | None = None
    mid_first: int | None = None
    mid_last: int | None = None
    layer2: str | None = None

    @property
    def is_anchor(self) -> bool:
        return self.layer is None

    @property
    def segments(self) -> list[tuple[int, int, int | None]]:
        """``(anchor, first block, last block)`` in the order they run; ``None`` as the last block: to the end."""
        if self.is_anchor:
            return [(self.front, 0, None)]
        middle = [] if self.mid is None else [(self.mid, self.mid_first, self.mid_last)]
        return [(self.front, 0, self.front_last), *middle, (self.end, self.end_first, None)]

    @property
    def layer_keys(self) -> list[str]:
        """The stitching layers between consecutive segments, in order."""
        return [k for k in (self.layer, self.layer2) if k is not None]

    @property
    def name(self) -> str:
        if self.is_anchor:
            return f"anchor{self.front}"
        middle = "" if self.mid is None else f"{self.mid}[{self.mid_first}:{self.mid_last + 1}]->"
        return f"{self.front}[:{self.front_last + 1}]->{middle}{self.end}[{self.end_first}:]"  # Python slices


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
        """Stitching-layer key -> (anchor it maps from, anchor it maps into), in first-use order."""
        out: dict[str, tuple[int, int]] = {}
        for s in self.stitches:
            if s.mid is None and s.layer is not None and s.layer not in out:
                out[s.layer] = (s.front, s.end)
        return out

    def cuts_of_layer(self, key: str) -> list[Stitch]:
        """The two-segment stitches whose one stitching layer is ``key``: what its fit and calibration see (every
        layer a three-segment route runs is also the layer of a two-segment cut, see ``build_space``)."""
        return [s for s in self.stitches if s.mid is None and s.layer == key]

    def users_of_layer(self, key: str) -> list[Stitch]:
        """Every stitch that runs layer ``key``, three-segment routes included."""
        return [s for s in self.stitches if key in s.layer_keys]

    def to_dict(self) -> dict:
        per_pair: dict[str, dict[str, int]] = {}
        for s in self.stitches:
            if s.is_anchor:
                continue
            route = f"{s.front}->{s.end}" if s.mid is None else f"{s.front}->{s.mid}->{s.end}"
            d = per_pair.setdefault(route, {"stitches": 0, "stitching_layers": 0})
            d["stitches"] += 1
        for key, (a, b) in self.layers.items():
            per_pair.setdefault(f"{a}->{b}", {"stitches": 0, "stitching_layers": 0})["stitching_layers"] += 1
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
    ``two_way=True`` adds large -> small. ``stitch_layers="per-cut"`` gives every cut its own stitching layer
    instead of one per window (the same stitches; ours). Why: least squares fits each cut's own map, and the
    average of the window's solutions fits none of them. Measured on the mini family (Fashion-MNIST, anchors' own
    heads, no training, 1,000 test images): the first S->B window's four cuts 52/59/42/40 % with the averaged layer,
    77/66/72/77 % with a layer each; Ti->S window 1 47/46/43 % -> 59/68/69 %.

    Where a peer defines the space, it is the peer's, three-segment routes included (:mod:`esta.routes`):
    ``two_way`` over two anchors, the large one as deep as the small one or a multiple, is SN-Netv2's (134 routes
    for 12/24 blocks; every cut its own stitching layer, as its cuts form no windows); ``pairing="all"`` over three
    or more anchors of one depth is SN-Net's without nearest stitching (732 for Ti/S/B at kernel 2, stride 1).
    Elsewhere (other depths, more anchors, both options) the space is esta's two-segment generalisation.
    """
    depths = tuple(int(d) for d in depths)
    if len(depths) < 1 or any(d < 1 for d in depths):
        raise EstaError(f"every anchor needs at least one block, got depths {list(depths)}")
    if pairing not in ("nearest", "all"):
        raise EstaError(f"pairing must be 'nearest' or 'all', got {pairing!r}")
    if stitch_layers not in ("per-window", "per-cut"):
        raise EstaError(f"stitch_layers must be 'per-window' or 'per-cut', got {stitch_layers!r}")
    n = len(depths)
    if two_way and pairing == "nearest" and n == 2 and depths[1] >= depths[0] and depths[1] % depths[0] == 0:
        return _peer_space(depths, snnetv2_routes(list(depths)), kernel, stride, pairing, two_way, "per-cut")
    if pairing == "all" and not two_way and n >= 3 and len(set(depths)) == 1:
        routes = snnet_routes(list(depths), kernel, stride, nearest=False)
        return _peer_space(depths, routes, kernel, stride, pairing, two_way, stitch_layers)
    pairs = [(a, a + 1) for a in range(n - 1)] if pairing == "nearest" else list(combinations(range(n), 2))
    if two_way:
        pairs = pairs + [(b, a) for a, b in pairs]

    stitches: list[Stitch] = [Stitch(id=a, front=a, end=a) for a in range(n)]
    for a, b in pairs:
        for w, cuts in enumerate(paired_cuts(depths[a], depths[b], kernel, stride)):
            for j, m in cuts:
                stitches.append(Stitch(len(stitches), a, b, front_last=j, end_first=m,
                                       layer=_layer_key(a, b, j, m, w, stitch_layers)))
    return StitchSpace(depths, tuple(stitches), kernel, stride, pairing, two_way, stitch_layers)


def _layer_key(a: int, b: int, j: int, m: int, window: int, stitch_layers: StitchLayers) -> str:
    # no dots: the key names a module in an nn.ModuleDict
    return f"{a}to{b}_w{window}" if stitch_layers == "per-window" else f"{a}to{b}_j{j}m{m}"


def _peer_space(depths: tuple[int, ...], routes: list[Route], kernel: int, stride: int, pairing: Pairing,
                two_way: bool, stitch_layers: StitchLayers) -> StitchSpace:
    """A peer's routes as stitches: a three-segment route runs the stitching layers of its two cuts, which the
    space also holds as two-segment stitches (so every layer is fitted and calibrated on a cut of its own)."""
    window = {(a, b, j, m): w for a, b in combinations(range(len(depths)), 2) if depths[a] == depths[b]
              for w, cuts in enumerate(paired_cuts(depths[a], depths[b], kernel, stride)) for j, m in cuts}

    def key(a: int, j: int, b: int, m: int) -> str:
        return _layer_key(a, b, j, m, window.get((a, b, j, m), -1), stitch_layers)

    stitches: list[Stitch] = []
    for r in routes:
        (a, _, j), *rest = r.segments
        sid = len(stitches)
        if not rest:
            stitches.append(Stitch(sid, a, a))
        elif len(rest) == 1:
            (b, m, _), = rest
            stitches.append(Stitch(sid, a, b, front_last=j, end_first=m, layer=key(a, j, b, m)))
        else:
            (b, mf, ml), (c, m, _) = rest
            stitches.append(Stitch(sid, a, c, front_last=j, end_first=m, layer=key(a, j, b, mf), mid=b, mid_first=mf,
                                   mid_last=ml, layer2=key(b, ml, c, m)))
    space = StitchSpace(depths, tuple(stitches), kernel, stride, pairing, two_way, stitch_layers)
    fitted = set(space.layers)
    if any(k not in fitted for s in stitches for k in s.layer_keys):  # the peers' rules guarantee it; checked
        raise EstaError("a three-segment route runs a stitching layer no two-segment cut fits")
    return space
