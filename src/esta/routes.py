"""The peers' stitch spaces, route by route: SN-Net's (with and without nearest stitching) and SN-Netv2's two-way
space with its three-segment routes, rebuilt from the rules of their public code (read, not copied).

A route runs segments in order: ``(anchor, first block, last block)``, the first with the anchor's embedding and
the last with its head, a stitching layer between consecutive segments. esta's default palette is SN-Net's nearest
stitching (71 for Ti/S/B); ``build_space`` turns the other two into palettes (``two_way``, ``pairing="all"``),
three-segment routes included, and ``esta space --peers`` counts them for any depths.

- SN-Net: per anchor pair, windows ``W = [i, i + kernel)`` (cut at the last block) slide with ``stride``; every
  pair ``(a, b)`` of ``W x W`` not seen before is a cut: the front anchor runs blocks ``0..a``, the end anchor
  from block ``b``. Without nearest stitching every increasing pair of anchors is stitched and, for three anchors,
  every chain ``0 -> 1 -> 2`` of a cut ``(a, b)`` into anchor 1 and a cut ``(c, d)`` out of it with ``c >= b``.
  Ti/S/B at kernel 2, stride 1: 71 with nearest stitching, 732 without (3 + 3 x 34 + 627).
- SN-Netv2 (two anchors, small S of ``dS`` blocks and large L of ``dL``): S->L cuts ``(i, (i + 1) * dL // dS)``;
  L->S cuts ``(i, floor(i * dS / dL) + 1)`` at odd ``i < dL - 1`` when the depths differ (every ``i < dL - 1``
  when equal); L->S->L routes chain an L->S cut with a later S->L cut, S->L->S the other way. The S->L cut after
  S's last block (no L block left) is built by SN-Netv2 but not among its selectable routes. 12/24 blocks: 134.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from .errors import EstaError


@dataclass(frozen=True)
class Route:
    segments: tuple[tuple[int, int, int], ...]  # (anchor, first block, last block), in the order they run

    @property
    def name(self) -> str:
        return "->".join(f"{a}[{f}:{last + 1}]" for a, f, last in self.segments)

    @property
    def kind(self) -> str:
        return "anchor" if len(self.segments) == 1 else "->".join(str(a) for a, _, _ in self.segments)


def window_pairs(depth: int, kernel: int = 2, stride: int = 1) -> list[tuple[int, int]]:
    """SN-Net's cuts between two anchors of ``depth`` blocks: ``(a, b)``, front blocks ``0..a``, end from ``b``."""
    if kernel < 1 or stride < 1:
        raise EstaError(f"stitching window needs kernel >= 1 and stride >= 1, got {kernel} and {stride}")
    seen: list[tuple[int, int]] = []
    for i in range(0, depth, stride):
        window = range(i, min(i + kernel, depth))
        seen += [(a, b) for a in window for b in window if (a, b) not in seen]
    return seen


def snnet_routes(depths: list[int], kernel: int = 2, stride: int = 1, nearest: bool = True) -> list[Route]:
    """SN-Net's configurations: the anchors, the cuts of each stitched pair, and (without nearest stitching) the
    routes through three anchors. Its code assumes anchors of one depth; so does this."""
    if len(set(depths)) != 1:
        raise EstaError(f"SN-Net's space takes anchors of one depth, got {depths}")
    depth, n = depths[0], len(depths)
    pairs = window_pairs(depth, kernel, stride)
    routes = [Route(((a, 0, depth - 1),)) for a in range(n)]
    for combo in (c for k in (2, 3) for c in combinations(range(n), k)):
        if nearest and (len(combo) == 3 or combo[1] - combo[0] != 1):  # nearest: neighbouring pairs only
            continue
        if len(combo) == 2:
            f, e = combo
            routes += [Route(((f, 0, a), (e, b, depth - 1))) for a, b in pairs]
        else:
            x, y, z = combo
            routes += [Route(((x, 0, a), (y, b, c), (z, d, depth - 1))) for a, b in pairs for c, d in pairs if c >= b]
    return routes


def snnetv2_routes(depths: list[int]) -> list[Route]:
    """SN-Netv2's selectable routes between a small anchor (0) and a large one (1): both anchors, S->L and L->S
    cuts, and the three-segment L->S->L and S->L->S routes."""
    if len(depths) != 2 or depths[0] > depths[1] or depths[1] % depths[0]:
        raise EstaError(f"SN-Netv2's space takes a small anchor and a large one a multiple as deep, got {depths}")
    ds, dl = depths
    r = dl // ds
    sl = [(i, (i + 1) * r) for i in range(ds)]  # S blocks 0..i, then L from (i + 1) * r
    ls = [(i, i * ds // dl + 1) for i in range(dl - 1) if ds == dl or i % 2 == 1]  # L 0..i, then S from the next
    routes = [Route(((0, 0, ds - 1),)), Route(((1, 0, dl - 1),))]
    routes += [Route(((0, 0, i), (1, j, dl - 1))) for i, j in sl if i != ds - 1]  # the last cut leaves no L block
    routes += [Route(((1, 0, i), (0, j, ds - 1))) for i, j in ls]
    routes += [Route(((1, 0, i), (0, j, k), (1, m, dl - 1))) for i, j in ls for k, m in sl if k != ds - 1 and k >= j]
    routes += [Route(((0, 0, i), (1, j, k), (0, m, ds - 1))) for i, j in sl for k, m in ls if k >= j]
    return routes


def peer_space(peer: str, depths: list[int], kernel: int = 2, stride: int = 1) -> list[Route]:
    """``snnet`` (nearest stitching), ``snnet-all`` (without) or ``snnetv2`` (two-way, three-segment routes)."""
    if peer == "snnet":
        return snnet_routes(depths, kernel, stride, nearest=True)
    if peer == "snnet-all":
        return snnet_routes(depths, kernel, stride, nearest=False)
    if peer == "snnetv2":
        return snnetv2_routes(depths)
    raise EstaError(f"unknown peer space {peer!r}: snnet, snnet-all, snnetv2")


def describe_routes(routes: list[Route]) -> str:
    kinds: dict[str, int] = {}
    for r in routes:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return "\n".join([f"{len(routes)} routes", *(f"  {k}: {v}" for k, v in kinds.items())])
