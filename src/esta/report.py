"""What a run hands back to people: results.json, results.csv and plots (an image run's Pareto plot of accuracy
against GFLOPs; a language run's perplexity and multiple-choice accuracy against parameters)."""

from __future__ import annotations

import csv
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from .files import atomic_write, write_json
from .html_report import route_of

# Figures are built with matplotlib's object API (Figure, not pyplot): it draws to files with the Agg canvas
# without switching the process's backend, so importing esta changes nothing in the user's matplotlib.

STITCH_COLUMNS = ["id", "name", "is_anchor", "front", "end", "flops", "params", "accuracy", "importance",
                  "updates", "train_loss", "validation_accuracy", "group", "deployed"]


def write_results(results: dict, out_dir: Path) -> None:
    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=STITCH_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(results["stitches"])

    write_json(out_dir / "results.json", results)
    atomic_write(out_dir / "results.csv", write_csv)


def pareto_plot(results: dict, path: Path, title: str = "") -> None:
    """Every stitch as a dot, anchors as stars, deployed stitches ringed and joined: accuracy vs GFLOPs."""
    stitches = [s for s in results["stitches"] if s.get("accuracy") is not None]
    curves = [p for p in results.get("pairs", []) if p["points"]]
    fig = Figure(figsize=(12 if curves else 7, 4.5), dpi=120)
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [7, 5]}) if curves else [fig.subplots()]
    ax = axes[0]
    routes = sorted({route_of(s) for s in stitches if not s["is_anchor"]})
    cmap = colormaps["tab10"]
    for k, route in enumerate(routes):
        pts = [s for s in stitches if not s["is_anchor"] and route_of(s) == route]
        ax.scatter([s["flops"] / 1e9 for s in pts], [100 * s["accuracy"] for s in pts], s=14, alpha=0.55,
                   color=cmap(k % 10), label="stitches " + "\u2192".join(map(str, route)))
    anchors = [s for s in stitches if s["is_anchor"]]
    ax.scatter([s["flops"] / 1e9 for s in anchors], [100 * s["accuracy"] for s in anchors], marker="*", s=220,
               color="gold", edgecolor="black", zorder=4, label="anchors (in the palette)")
    names = {a["stitch_id"]: a["name"] for a in results.get("anchors_in_palette", [])}
    for s in anchors:
        ax.annotate(names.get(s["id"], s["name"]), (s["flops"] / 1e9, 100 * s["accuracy"]),
                    textcoords="offset points", xytext=(7, -12), fontsize=9)
    marks = {"anchors-lora": ("*", 170, "alone (LoRA)"), "linear-probe": ("P", 70, "probe")}
    labelled = set()
    for ref in results.get("references", []):  # the same anchors tuned alone / probed, when the run has them
        marker, size, word = marks.get(ref["method"], ("X", 70, ref["method"]))
        ax.scatter([ref["flops"] / 1e9], [100 * ref["accuracy"]], marker=marker, s=size, facecolor="none",
                   edgecolor="black", zorder=4,
                   label=None if ref["method"] in labelled else f"anchors {word} ({ref['steps']} steps)")
        labelled.add(ref["method"])
        ax.annotate(f"{ref['name']} {word}", (ref["flops"] / 1e9, 100 * ref["accuracy"]),
                    textcoords="offset points", xytext=(7, 4 if ref["method"] == "anchors-lora" else -4),
                    fontsize=7)
    deployed = sorted((d for d in results["deployed"] if d.get("accuracy") is not None), key=lambda d: d["flops"])
    if deployed:
        ax.plot([d["flops"] / 1e9 for d in deployed], [100 * d["accuracy"] for d in deployed], "-o", color="crimson",
                mfc="none", ms=9, lw=1.2, zorder=5, label="deployed (one per budget)")
    for s in anchors:
        ax.axvline(s["flops"] / 1e9, color="black", lw=0.6, ls=":", alpha=0.5)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs cost", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if curves:
        pair_plot(axes[1], curves, "accuracy", 100.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or "png"))


def pair_plot(ax, curves: list[dict], metric: str, scale: float) -> None:
    """Each anchor pair's stitches against the share of the end anchor's blocks they run, with the pair's anchors
    as horizontal lines: a palette that works climbs from the front anchor's line to the end anchor's."""
    cmap = colormaps["tab10"]
    for k, p in enumerate(curves):
        colour = cmap(k % 10)
        pts = sorted(p["points"], key=lambda q: (q["share"], q["cost"]))
        ax.plot([q["share"] for q in pts], [scale * q[metric] for q in pts], "o", ms=3.5, alpha=0.75, color=colour,
                label=f"{p['front_name']}\u2192{p['end_name']} (Spearman {p['spearman']:.2f})")
        for side, ls in (("front", ":"), ("end", "--")):
            v = p.get(f"{side}_{metric}")
            if v is not None:
                ax.axhline(scale * v, color=colour, ls=ls, lw=1)
                ax.annotate(p[f"{side}_name"], (1.0 if side == "end" else 0.0, scale * v), fontsize=8, color=colour,
                            xytext=(-14 if side == "end" else 2, 2), textcoords="offset points")
    ax.set_xlabel("share of the end anchor's blocks run by the stitch")
    ax.set_ylabel(f"test {metric}" + (" (%)" if scale == 100.0 else ""))
    ax.set_title("per pair: stitches between their anchors (dotted: front, dashed: end)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def bench_plot(methods: dict, path: Path, title: str = "") -> None:
    """One task of a bench: each method's deployed network per budget (mean over seeds, bars: ± one standard
    deviation), the anchors tuned alone and their linear probes as named markers; accuracy (or perplexity)
    against the Task's cost (GFLOPs per image, or millions of parameters)."""
    from .budget import AXES
    from .results import METRICS

    first = next(iter(methods.values()))
    m, axis = METRICS[first["metric"]], AXES[first["cost_axis"]]
    x = lambda row: row["cost"] / axis.scale  # noqa: E731
    y = lambda row: m.scale * row[m.name]  # noqa: E731
    err = lambda row: m.scale * (row[f"{m.name}_std"] or 0)  # noqa: E731
    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.subplots()
    styles = {"esta": ("crimson", "-o"), "esta-uniform": ("tab:orange", "--s"), "esta-shared-bias": ("tab:purple", ":^"),
              "snnet": ("tab:blue", "-D"), "snnet-groups": ("tab:cyan", "--D")}
    singles = {"anchors-lora": ("goldenrod", "*", 220), "linear-probe": ("tab:gray", "P", 90)}
    for name, r in methods.items():
        pts = [d for d in r["deployed"] if d[m.name] is not None]
        if name in singles:  # anchors only: one marker per anchor, named
            colour, marker, size = singles[name]
            anchors = [a for a in r["anchors"] if a[m.name] is not None]
            ax.errorbar([x(a) for a in anchors], [y(a) for a in anchors], yerr=[err(a) for a in anchors], fmt="none",
                        ecolor=colour, capsize=3)
            ax.scatter([x(a) for a in anchors], [y(a) for a in anchors], marker=marker, s=size, color=colour,
                       edgecolor="black", zorder=4, label=f"{name} (each anchor alone)")
            for a in anchors:
                ax.annotate(a["name"], (x(a), y(a)), textcoords="offset points",
                            xytext=(6, -10 if name == "linear-probe" else 6), fontsize=8, color=colour)
            continue
        colour, style = styles.get(name, ("grey", "-x"))
        mean = r[f"mean_{m.name}"]
        ax.errorbar([x(d) for d in pts], [y(d) for d in pts], yerr=[err(d) for d in pts], fmt=style, color=colour,
                    ms=5, lw=1.2, capsize=2, label=f"{name} ({m.show(mean)}{m.unit} mean)")
    marks = next((r["anchors"] for r in methods.values() if r.get("anchors")), [])
    for a in marks:  # the anchors' costs, named, so every curve can be read against Ti / S / B
        ax.axvline(x(a), color="black", lw=0.6, ls=":", alpha=0.6)
        ax.annotate(a["name"], (x(a), 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=9, fontweight="bold")
    ax.set_xlabel(f"{axis.unit} (deployed network)")
    ax.set_ylabel(f"test {m.name}" + (f" ({m.unit})" if m.unit else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right" if m.higher_is_better else "upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or "png"))


def plot_lm(results: dict, path: Path) -> None:
    """A language run: perplexity and multiple-choice ``acc_norm`` (mean of the tasks, 95 % intervals) against
    parameters, the anchors named, the deployed stitches joined; the validation perplexity of every trained stitch
    per anchor pair beside them where the run measured it."""
    from matplotlib.ticker import FormatStrFormatter

    from .families import anchor_names

    metrics = [m for m in ("perplexity", "mc_acc_norm") if any(r.get(m) is not None for r in results["anchors"])]
    curves = [p for p in results.get("pairs", []) if p["points"]]
    panels = len(metrics) + bool(curves)
    fig = Figure(figsize=(5 * max(1, panels), 3.9), dpi=120)
    axes = fig.subplots(1, max(1, panels))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    names = anchor_names([r["source"] for r in results["anchors"]])
    for ax, m in zip(axes, metrics):
        a = [r for r in results["anchors"] if r.get(m) is not None]
        d = [r for r in results["deployed"] if r.get(m) is not None]
        ci = (lambda r: r.get("mc_acc_norm_ci95") or 0) if m == "mc_acc_norm" else (lambda r: 0)  # noqa: E731
        ax.errorbar([r["params"] / 1e6 for r in a], [r[m] for r in a], yerr=[ci(r) for r in a], fmt="*", ms=15,
                    color="gold", mec="black", ecolor="gray", capsize=3, zorder=4, label="anchors")
        for r, n in zip(results["anchors"], names):
            if r.get(m) is not None:
                ax.annotate(n, (r["params"] / 1e6, r[m]), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ax.errorbar([r["params"] / 1e6 for r in d], [r[m] for r in d], yerr=[ci(r) for r in d], fmt="-o",
                    color="crimson", capsize=3, label="deployed stitches" + (" (95 % intervals)" if ci(d[0] if d else {})
                                                                             else ""))
        ax.set_xlabel("parameters (M)")
        label = {"perplexity": "held-out perplexity (log scale)",
                 "mc_acc_norm": "multiple choice acc_norm (mean of tasks)"}[m]
        ax.set_ylabel(label)
        if m == "perplexity":  # one broken stitch can be 10x the anchors: keep the rest readable
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if curves:
        ax = axes[len(metrics)]
        cmap = colormaps["tab10"]
        for k, p in enumerate(curves):
            pts = sorted(p["points"], key=lambda q: q["cost"])
            ax.plot([q["cost"] / 1e6 for q in pts], [q["perplexity"] for q in pts], "o", ms=3.5, color=cmap(k),
                    label=f"{names[p['front']]}\u2192{names[p['end']]} stitches (Spearman {-p['spearman']:.2f} with "
                          f"params)")
            for side, ls in (("front", ":"), ("end", "--")):
                if p.get(f"{side}_perplexity") is not None:
                    ax.axhline(p[f"{side}_perplexity"], color=cmap(k), ls=ls, lw=1, label=names[p[side]])
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("validation perplexity")
        ax.set_title("every trained stitch", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or "png"))


def model_card(esta_config: dict, point: dict, run: dict, command: str | None) -> str:
    """A deployed folder's ``README.md``: what it is, what it costs, how it scored, how to load it, what made it.

    ``point``: the deployed network's entry of the run's typed results (``results.json`` -> ``run`` ->
    ``deployed``); ``run``: that section's other fields (task, metric, method, seed, steps)."""
    from .budget import AXES
    from .results import METRICS

    stitch, front, end = esta_config["stitch"], esta_config["front"], esta_config["end"]
    plain = esta_config.get("weights") == "transformers"  # a whole anchor saved as the plain transformers model
    metric, axis = METRICS[run["metric"]], AXES[run["cost_axis"]]
    if stitch.get("layer") is None:
        what = f"anchor {front['source']} (all {front['config']['num_hidden_layers']} blocks), adapted to the task"
    elif stitch.get("mid") is not None:
        mid = esta_config["mid"]
        what = (f"blocks 0-{stitch['front_last']} of {front['source']}, a linear stitching layer, blocks "
                f"{stitch['mid_first']}-{stitch['mid_last']} of {mid['source']}, another stitching layer, then "
                f"blocks {stitch['end_first']}-{end['config']['num_hidden_layers'] - 1} of {end['source']}")
    else:
        what = (f"blocks 0-{stitch['front_last']} of {front['source']}, a linear stitching layer, then blocks "
                f"{stitch['end_first']}-{end['config']['num_hidden_layers'] - 1} of {end['source']}")
    value = metric.show(point.get("value"))
    budget = point.get("budget")
    from .families import anchor_class

    tag, imports, use = anchor_class(front["family"]).card_usage(front, plain)
    per = " per image" if axis.key == "flops" else ""
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {tag}",
        "tags: [esta, stitchable-networks, model-stitching]", "---", "",
        f"# {point.get('name', stitch.get('name', 'stitch'))}: a network deployed by esta for {run['task']}", "",
        f"A stitched network from esta (Efficient Stitchable Task Adaptation): {what}.", "",
        "| | |", "|---|---|",
        f"| budget | {axis.show(budget) if budget is not None else '-'} |",
        f"| cost | {axis.show(point['cost'])}{per} ({point['params'] / 1e6:.2f} M parameters) |",
        f"| {metric.name} on held-out data | {value} |",
        f"| method, seed, steps | {run['method']}, {run['seed']}, {run['steps']} |",
        f"| chosen by | {run['deploy_by']} |", "",
        "## Use", "", "```python",
        "# a whole anchor: plain transformers, esta not needed" if plain else
        "import esta  # registers esta's model types with the Auto classes (no trust_remote_code)",
        f"from transformers import {imports}", "", *use, "```", "",
    ]
    if command:
        lines += ["## Made by", "", "```bash", command, "```", ""]
    return "\n".join(lines)
