"""What a run hands back to people: results.json, results.csv and a Pareto plot (accuracy against GFLOPs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

STITCH_COLUMNS = ["id", "name", "is_anchor", "front", "end", "flops", "params", "accuracy", "importance",
                  "updates", "group", "deployed"]


def write_results(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=STITCH_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(results["stitches"])


def pareto_plot(results: dict, path: Path, title: str = "") -> None:
    """Every stitch as a dot, anchors as stars, deployed stitches ringed and joined: accuracy vs GFLOPs."""
    stitches = [s for s in results["stitches"] if s.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pairs = sorted({(s["front"], s["end"]) for s in stitches if not s["is_anchor"]})
    cmap = plt.get_cmap("tab10")
    for k, (a, b) in enumerate(pairs):
        pts = [s for s in stitches if not s["is_anchor"] and (s["front"], s["end"]) == (a, b)]
        ax.scatter([s["flops"] / 1e9 for s in pts], [100 * s["accuracy"] for s in pts], s=14, alpha=0.55,
                   color=cmap(k % 10), label=f"stitches {a}\u2192{b}")
    anchors = [s for s in stitches if s["is_anchor"]]
    ax.scatter([s["flops"] / 1e9 for s in anchors], [100 * s["accuracy"] for s in anchors], marker="*", s=220,
               color="gold", edgecolor="black", zorder=4, label="anchors")
    deployed = sorted((d for d in results["deployed"] if d.get("accuracy") is not None), key=lambda d: d["flops"])
    if deployed:
        ax.plot([d["flops"] / 1e9 for d in deployed], [100 * d["accuracy"] for d in deployed], "-o", color="crimson",
                mfc="none", ms=9, lw=1.2, zorder=5, label="deployed (one per budget)")
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def bench_plot(methods: dict, path: Path, title: str = "") -> None:
    """One task of a bench: each method's deployed stitch per budget (mean over seeds), all methods overlaid."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"esta": ("crimson", "-o"), "esta-uniform": ("tab:orange", "--s"), "esta-shared-bias": ("tab:purple", ":^"),
              "snnet": ("tab:blue", "-D"), "anchors-lora": ("goldenrod", "*")}
    for name, r in methods.items():
        colour, style = styles.get(name, ("grey", "-x"))
        xs = [f / 1e9 for f in r["group_flops"]]
        ys = [100 * a for a in r["group_accuracy"]]
        if name == "anchors-lora":  # the stars: each anchor fine-tuned alone, only at the cost of an anchor
            pts = sorted(set(zip(xs, ys)))
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="*", s=220, color=colour,
                       edgecolor="black", zorder=4, label=name)
        else:
            ax.plot(xs, ys, style, color=colour, ms=5, lw=1.2, label=f"{name} ({100 * r['mean_accuracy']:.1f}%)")
    ax.set_xlabel("GFLOPs per image (deployed stitch)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
