"""Per-pair curves: does a stitch climb from its front anchor towards its end anchor as it runs more of the end?

A palette is worth more than its anchors only through its in-between networks, and those of one anchor pair should
lie on a curve from the cheaper anchor to the costlier one. For each pair (front -> end) of a run's stitches this
reads, from the evaluated metric of every stitch: the points (share of the end anchor's blocks, cost, metric), the
Spearman correlation of cost with quality among the pair's in-between stitches (quality: accuracy, or minus the
perplexity), the *most-end* stitch (fewest front blocks, then most end blocks) and its gap to the end anchor, and
how many in-between stitches beat the cheaper anchor. Written to ``results.json`` (``pairs``), printed in the
summary and drawn beside the Pareto plot.
"""

from __future__ import annotations

import math
from typing import Any

from .evaluate import spearman


def pair_curves(stitches: list[dict[str, Any]], metric: str = "accuracy", cost: str = "flops",
                higher_is_better: bool = True, depths: list[int] | None = None,
                names: list[str] | None = None) -> list[dict[str, Any]]:
    """One entry per anchor pair of ``stitches`` (rows of results.json's ``stitches``: ``id``, ``name``,
    ``is_anchor``, ``front``, ``end``, ``front_last``, ``end_first``, the cost and the metric); rows without a
    metric are skipped. ``depths``: each anchor's number of blocks (default: read from the cuts)."""
    # a three-segment route (``mid`` set) belongs to no one pair of anchors: it is left out of the curves
    rows = [s for s in stitches if s.get(metric) is not None and s.get("mid") is None]
    anchors = {s["front"]: s for s in rows if s["is_anchor"]}
    if depths is None:
        depths_of: dict[int, int] = {}
        for s in stitches:
            if not s["is_anchor"] and s.get("mid") is None:
                depths_of[s["front"]] = max(depths_of.get(s["front"], 0), s["front_last"] + 1)
                depths_of[s["end"]] = max(depths_of.get(s["end"], 0), s["end_first"] + 1)
    sign = 1.0 if higher_is_better else -1.0
    out = []
    for a, b in sorted({(s["front"], s["end"]) for s in rows if not s["is_anchor"]}):
        pts = [s for s in rows if not s["is_anchor"] and (s["front"], s["end"]) == (a, b)]
        end_depth = depths[b] if depths is not None else depths_of[b]
        points = sorted(({"id": s["id"], "name": s["name"], "share": (end_depth - s["end_first"]) / end_depth,
                          "cost": s[cost], metric: s[metric]} for s in pts), key=lambda p: (p["cost"], p["id"]))
        fa, fb = anchors.get(a), anchors.get(b)
        most_end = min(pts, key=lambda s: (s["front_last"], s["end_first"]))
        cheaper = min((x for x in (fa, fb) if x is not None), key=lambda x: x[cost], default=None)
        both = [x for x in (fa, fb) if x is not None]
        entry = {
            "front": a, "end": b,
            "front_name": names[a] if names else f"anchor{a}", "end_name": names[b] if names else f"anchor{b}",
            "front_" + metric: fa[metric] if fa else None, "end_" + metric: fb[metric] if fb else None,
            "cheaper_" + metric: cheaper[metric] if cheaper else None,
            "count": len(pts),
            "spearman": spearman([p["cost"] for p in points], [sign * p[metric] for p in points]),
            "spearman_with_anchors": spearman([p[cost] for p in pts + both], [sign * p[metric] for p in pts + both]),
            "most_end": {"name": most_end["name"], metric: most_end[metric],
                         "gap_to_end": (sign * (fb[metric] - most_end[metric])) if fb else None},
            "above_cheaper": (sum(sign * (p[metric] - cheaper[metric]) > 0 for p in pts) if cheaper else None),
            "points": points,
        }
        out.append(entry)
    return out


def describe(pairs: list[dict[str, Any]], metric: str = "accuracy", scale: float = 100.0, unit: str = "%",
             label: str | None = None) -> list[str]:
    """One line per pair for the printed summary; ``metric`` is the key in ``pairs``, ``label`` how it is named."""
    lines = []
    for p in pairs:
        fmt = (lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{scale * v:.2f}{unit}")
        gap = p["most_end"]["gap_to_end"]
        lines.append(
            f"pair {p['front_name']}->{p['end_name']}: {p['count']} stitches, Spearman(cost, {label or metric}) "
            f"{p['spearman']:.2f}; most-end stitch {p['most_end']['name']} {fmt(p['most_end'][metric])} "
            f"({'-' if gap is None else f'{scale * gap:+.2f}'} behind {p['end_name']} at "
            f"{fmt(p['end_' + metric])}); {p['above_cheaper']} of {p['count']} beat the cheaper anchor "
            f"({fmt(p['cheaper_' + metric])})")
    return lines
