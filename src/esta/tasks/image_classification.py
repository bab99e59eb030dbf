"""Image classification: a vision family adapted to a labelled image task, budgets in GFLOPs per image.

Data: a built-in task, an image folder or a Hugging Face dataset, converted to the family's image size and
channels; a validation set is held out of the test split and the evaluation subset drawn from the rest, so the two
never overlap. Every new task head starts as a linear probe of its anchor's frozen features. The honest check:
every trained stitch's accuracy on the evaluation subset, and each deployed folder reloaded from disk.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..budget import FLOPS, CostAxis
from ..calibration import calibrate_stitching
from ..config import RecipeConfig
from ..data import (
    default_cache_dir,
    held_out_sets,
    load_image_task,
    materialize,
    stratified_split,
    warn_missing_classes,
)
from ..deploy import DeployedStitch
from ..errors import EstaError
from ..evaluate import accuracy, largest_drop, spearman, sweep
from ..families import anchor_names, load_family
from ..html_report import point, profiled_latencies, report_curves, route_label, write_html_report
from ..methods import get_method
from ..pairs import pair_curves
from ..palette import Palette
from ..probe import probe_heads
from ..report import pareto_plot, write_results
from ..results import ACCURACY, Point, in_between_served, run_results
from ..train import TrainConfig, classification_loss
from .base import Task

log = logging.getLogger("esta")


@dataclass
class AdaptConfig(RecipeConfig):
    """``esta train`` / ``esta demo``: the recipe's settings plus image classification's own."""

    axis: ClassVar[CostAxis] = FLOPS  # budgets in GFLOPs per image

    #: four stitches per step, each on a quarter of the batch (ours; see ``TrainConfig.stitches_per_step``), for
    #: 40 epochs: what `esta demo` and `esta train` run (the demo's 3 minutes of training here)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40.0, stitches_per_step=4))
    #: the [CLS] token's share of the least-squares fit of the stitching layers (0: all tokens equal, SN-Net's fit)
    stitch_cls_weight: float = 0.5
    eval_examples: int | None = 2000  # stratified test examples for every accuracy (0 or none: the whole split)
    #: how every new task head starts: "probe" (ours: a linear probe of its anchor's frozen features on the
    #: training set) or "random" (trunc-normal, as ViT); the same for every method, so they stay comparable
    head_init: str = "probe"
    validation_sweep: bool = False  # also record every stitch's validation accuracy (to study deployment rules)
    strict: bool = False  # a class missing from a split is an error instead of a warning
    probe_examples: int = 5000  # training examples the probes are fitted on (a stratified subset beyond that)
    sweep: bool = True  # evaluate every stitch (the honest check of the choice; SN-Net's way to choose)
    #: training examples used ("default": the built-in task's own size; none: all)
    train_examples: int | str | None = "default"
    cache_dir: str | None = None  # where data, probes and conversions are cached (default ~/.cache/esta)

    def check(self) -> None:
        super().check()
        if self.probe_examples < 1:
            raise EstaError(f"probe examples must be at least 1, got {self.probe_examples}")
        if self.eval_examples is not None and self.eval_examples < 0:
            raise EstaError(f"evaluation examples must be >= 0 (0: all), got {self.eval_examples}")
        if not 0 <= self.stitch_cls_weight < 1:
            raise EstaError(f"stitch_cls_weight must be in [0, 1), got {self.stitch_cls_weight}")
        if self.head_init not in ("probe", "random"):
            raise EstaError(f"head_init must be 'probe' or 'random', got {self.head_init!r}")


class ImageClassification(Task):
    kind, modality, axis, metric = "image-classification", "image", FLOPS, ACCURACY
    reference_overrides = {"validation_sweep": False}

    def load_anchors(self, num_labels: int = 1) -> list:
        anchors = load_family(self.config.anchors, num_labels=num_labels)
        if anchors[0].modality != self.modality:
            raise EstaError("image classification takes vision anchors; use esta lm-train for causal LMs")
        return anchors

    def load(self, deploy_by: str) -> None:
        cfg, seed = self.config, self.config.train.seed
        self.anchors = self.load_anchors()  # checked before any data is fetched; the new heads are set below
        a = self.anchors[0]
        task = load_image_task(cfg.data, image_size=a.image_size, num_channels=a.num_channels,
                               cache_dir=cfg.cache_dir, train_examples=cfg.train_examples, seed=seed)
        if len(task.train) == 0 or len(task.test) == 0:
            raise EstaError(f"task {cfg.data!r} has an empty train or test split")
        warn_missing_classes(task, cfg.strict)
        torch.manual_seed(seed)
        for anchor in self.anchors:
            anchor.new_task_head(len(task.classes))
        self.task, self.train_set, self.loss_fn = task, task.train, classification_loss
        self.name, self.classes = task.name, task.classes
        self.val_set, self.eval_set = held_out_sets(task.test, cfg.validation_examples, cfg.eval_examples or None, seed)
        if len(self.val_set) == 0 and deploy_by == "validation":
            raise EstaError(f"the test split of {task.name} has {len(task.test)} examples: too few to hold out a "
                            f"validation set (a quarter of it) for deploying by validation accuracy")

    def restore(self, info: dict) -> None:
        super().restore(info)
        self.classes = info["classes"]

    def fit_stitching(self, palette: Palette) -> None:
        cfg, train = self.config, self.task.train
        n = min(cfg.calibration_examples, len(train))
        idx = stratified_split(train.labels, n, cfg.train.seed + 7)[0] if n < len(train) else range(n)
        self.calibration = materialize(train, idx)
        palette.init_stitching(self.calibration.images, summary_weight=cfg.stitch_cls_weight)
        self.calibration_report = {}
        if cfg.calibration.steps and not cfg.resume:  # label-free; a resumed run's checkpoint holds the layers: the training images without their labels
            t0 = time.perf_counter()
            n = min(cfg.calibration.examples, len(train))
            idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.train.seed + 11))[:n]
            images = materialize(train, idx).images
            layers = calibrate_stitching(palette, images, cfg.calibration, cfg.train.seed, cfg.progress)
            self.calibration_report = {"seconds": time.perf_counter() - t0, "layers": layers}
            log.info("calibrated %d stitching layers towards their end anchors in %.0f s (end-feature error %.3f -> "
                     "%.3f on average)", len(layers), self.calibration_report["seconds"],
                     sum(v["before"] for v in layers.values()) / len(layers),
                     sum(v["after"] for v in layers.values()) / len(layers))

    def cost_input(self) -> torch.Tensor:
        return self.calibration.images[:1]

    def before_pst(self, palette: Palette, costs: list) -> None:
        # the heads start as linear probes only now, after every check that can refuse the run (they log a line each)
        cfg = self.config
        self.head_init = "probe" if not get_method(cfg.method).train else cfg.head_init  # a probe is that method
        cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        self.probes = probe_heads(self.anchors, self.task, cfg.probe_examples, cfg.train.seed, cache / "probes") \
            if self.head_init == "probe" else []
        if self.probes and cfg.sweep:  # each probe alone on the evaluation set: the cheapest thing a user would try
            for a, p in zip(self.anchors, self.probes):
                was_training = a.training
                p["accuracy"] = accuracy(a.eval(), self.eval_set)
                a.train(was_training)
        return None

    def describe(self, palette: Palette, method) -> None:
        task = self.task
        log.info("task %s: %d classes, %d training examples, %d test examples (evaluating on %d, %d held out for "
                 "validation); method %s", task.name, len(task.classes), len(task.train), len(task.test),
                 len(self.eval_set), len(self.val_set), method.name)
        log.info("palette: %d stitches (%d anchors), %d stitching layers; trainable %d of %d parameters",
                 len(palette), len(self.anchors), len(palette.stitching), palette.trainable_parameters(),
                 palette.total_parameters())

    def run_info(self, costs: list) -> dict:
        return {"classes": self.task.classes, "task": self.task.name, "flops": [c.flops for c in costs]}

    def validation_scores(self, palette: Palette, groups: list[list[int]], progress: bool) -> dict[int, float]:
        if len(self.val_set) == 0:
            raise EstaError("deploying by validation accuracy needs held-out examples (validation_examples=0, or "
                            "a test split under 4 examples)")
        return sweep(palette, self.val_set, stitches=sorted(s for g in groups for s in g), progress=progress)

    def deploy_meta(self, costs: list, result):
        return lambda c: {"budget_flops": c.budget, "flops": costs[c.stitch_id].flops,
                          "params": costs[c.stitch_id].params, "importance": result.importance[c.stitch_id],
                          "task": self.name, "classes": self.classes}

    def report(self, palette, costs, result, choices, dirs, val_scores, deploy_by, timing) -> dict:
        cfg, trained = self.config, sorted(s for g in result.groups for s in g)
        t0 = time.perf_counter()
        sweep_acc = sweep(palette, self.eval_set, stitches=None if trained == list(range(len(palette))) else trained,
                          progress=cfg.progress) if cfg.sweep else {}
        timing["sweep_seconds"] = time.perf_counter() - t0
        deployed_acc = [accuracy(DeployedStitch.from_pretrained(d), self.eval_set) for d in dirs]
        # held-out accuracy of the chosen stitches: what a learning-rate sweep may look at (never the evaluation set)
        val_acc = [accuracy(lambda x, s=c.stitch_id: palette(x, stitch=s), self.val_set) for c in choices] \
            if len(self.val_set) else [None] * len(choices)
        if cfg.validation_sweep and not val_scores and len(self.val_set):  # for studying the deployment rules
            val_scores = sweep(palette, self.val_set, stitches=trained, progress=cfg.progress)
        results = image_results(cfg, self.task, palette, costs, result, choices, sweep_acc, deployed_acc, dirs,
                                len(self.eval_set), val_scores, deploy_by)
        for d, v in zip(results["deployed"], val_acc):
            d["validation_accuracy"] = v
        results["summary"]["mean_validation_accuracy"] = sum(val_acc) / len(val_acc) \
            if val_acc and len(self.val_set) else None
        results["validation_examples"] = len(self.val_set)
        results["head_init"] = {"mode": self.head_init, "probes": self.probes}
        results["calibration"] = self.calibration_report
        results["timing"] = timing
        names = anchor_names([a.source for a in palette.anchors])
        results["references"] = [
            {"method": "linear-probe", "name": n, "flops": costs[s].flops, "accuracy": p["accuracy"], "steps": 0}
            for n, s, p in zip(names, palette.space.anchor_ids(), self.probes) if p.get("accuracy") is not None
        ] if get_method(cfg.method).train else []
        summary = results["summary"]
        results["run"] = run_results(
            self, result, deploy_by, timing,
            deployed=[Point(d["name"], d["flops"], d["flops"], d["params"], d["accuracy"], d["budget"],
                            result.updates[d["stitch_id"]], d["validation_accuracy"]) for d in results["deployed"]],
            anchors=[Point(a["name"], a["flops"], a["flops"], a["params"], a["accuracy"], updates=a["updates"])
                     for a in results["anchors_in_palette"]],
            mean_regret=summary["mean_regret"], mean_regret_in_budget=summary["mean_regret_in_budget"],
            pairs=results["pairs"], in_between=summary["in_between"]).to_json()
        return results

    @staticmethod
    def summary(results: dict, out: str) -> str:
        return summary_text(results, out)

    def write(self, results: dict, out: Path) -> None:
        write_report(results, out, plot=self.config.sweep)

    @staticmethod
    def write_html(results: dict, out: Path) -> Path:
        """``report.html``: every stitch, the anchors tuned alone and probed, the per-pair curves."""
        return html_report(results, out)


def write_report(results: dict, out: Path, plot: bool) -> None:
    """results.json / results.csv, report.html, and the Pareto plot when every stitch was evaluated."""
    write_results(results, out)
    html_report(results, out)
    if plot:
        pareto_plot(results, out / "pareto.png",
                    title=f"{results['method']} on {results['task']}: {len(results['stitches'])} stitches")


def html_report(results: dict, out: Path) -> Path:
    names = {a["stitch_id"]: a["name"] for a in results.get("anchors_in_palette", [])}
    label = {(c["front"], c["end"]): f"{c['front_name']}\u2192{c['end_name']}" for c in results.get("pairs", [])}
    latency = profiled_latencies(out)
    pts = [point("anchor" if s["is_anchor"] else "stitch", names.get(s["id"], s["name"]) if s["is_anchor"]
                 else s["name"], s["flops"], s["accuracy"], params=s["params"], updates=s["updates"],
                 importance=s["importance"], deployed=bool(s["deployed"]), latency_ms=latency.get(s["id"]),
                 pair=None if s["is_anchor"] else route_label(s, label),
                 label=names.get(s["id"]))
           for s in results["stitches"]]
    pts += [point("alone" if r["method"] == "anchors-lora" else "probe", f"{r['name']} ({r['method']})", r["flops"],
                  r["accuracy"], steps=r["steps"]) for r in results.get("references", [])]
    deployed = sorted({d["name"] for d in results.get("deployed", [])})
    summary = (f"{results['method']}: {len(results['stitches'])} networks adapted to {results['task']} in "
               f"{results['train']['seconds']:.0f} s ({results['train']['steps']} steps); deployed by "
               f"{results.get('deploy_by')} at {len(results.get('deployed', []))} budgets: {', '.join(deployed)}.")
    return write_html_report(out, f"esta palette: {results['method']} on {results['task']}", summary, pts,
                             report_curves(results, "accuracy"), ACCURACY, FLOPS)


def image_results(config: AdaptConfig, task, palette: Palette, costs, result, choices, sweep_acc: dict[int, float],
                  deployed_acc: list[float], deployed_dirs: list[Path], n_eval: int, val_sweep: dict[int, float],
                  deploy_by: str) -> dict:
    """``results.json`` of an image run: every stitch, every deployed network, the anchors, the summary."""
    group_of = {s: g for g, members in enumerate(result.groups) for s in members}
    chosen = {c.stitch_id for c in choices}
    stitches = [{
        "id": s.id, "name": s.name, "is_anchor": s.is_anchor, "front": s.front, "end": s.end,
        "front_last": s.front_last, "end_first": s.end_first, "layer": s.layer, "mid": s.mid,
        "flops": costs[s.id].flops, "params": costs[s.id].params,
        "accuracy": sweep_acc.get(s.id), "importance": result.importance[s.id],
        "updates": result.updates[s.id], "group": group_of.get(s.id), "deployed": s.id in chosen,
        "train_loss": result.train_loss[s.id] if result.train_loss else None,
        "validation_accuracy": val_sweep.get(s.id),
    } for s in palette.space.stitches]
    deployed = []
    for c, acc, d in zip(choices, deployed_acc, deployed_dirs):
        # regret: against the best of the stitches the rule chose among (its budget group for importance);
        # regret_in_budget: against every evaluated stitch that fits the budget, what a user could have had
        best = max((sweep_acc[s] for s in c.candidates if s in sweep_acc), default=None) if sweep_acc else None
        fits = [a for s, a in sweep_acc.items() if costs[s].flops <= c.budget]
        best_fit = max(fits) if fits else None
        deployed.append({
            "budget": c.budget, "stitch_id": c.stitch_id, "name": palette.space[c.stitch_id].name,
            "flops": costs[c.stitch_id].flops, "params": costs[c.stitch_id].params,
            "accuracy": acc, "accuracy_in_palette": sweep_acc.get(c.stitch_id),
            "best_accuracy_in_budget": best_fit, "regret_in_budget": (best_fit - acc) if best_fit is not None else None,
            "best_accuracy_in_candidates": best, "regret": (best - acc) if best is not None else None,
            "candidates": c.candidates, "path": str(d),
        })
    accs = [d["accuracy"] for d in deployed]
    names = anchor_names([a.source for a in palette.anchors])
    pairs = pair_curves(stitches, "accuracy", "flops", depths=[a.depth for a in palette.anchors], names=names)
    anchors = [{"name": names[s.front], "source": palette.anchors[s.front].source, "stitch_id": s.id,
                "flops": costs[s.id].flops, "params": costs[s.id].params, "accuracy": sweep_acc.get(s.id),
                "updates": result.updates[s.id]} for s in palette.space.stitches if s.is_anchor]
    regrets = [d["regret"] for d in deployed] if sweep_acc and deployed else None
    return {
        "method": config.method, "task": task.name, "classes": task.classes,
        "anchors": [a.source for a in palette.anchors], "eval_examples": n_eval, "train_examples": len(task.train),
        "space": {k: v for k, v in palette.space.to_dict().items() if k != "stitches"},
        "stitches": stitches, "deployed": deployed, "anchors_in_palette": anchors, "pairs": pairs,
        "summary": {
            "spearman_budget_accuracy": spearman([d["budget"] for d in deployed], accs),
            "mean_deployed_accuracy": sum(accs) / len(accs) if accs else None,
            "group_accuracy": accs,
            "mean_regret": sum(regrets) / len(regrets) if regrets else None,
            "mean_regret_in_budget": (sum(d["regret_in_budget"] for d in deployed) / len(deployed))
            if regrets else None,
            "largest_drop": largest_drop([d["accuracy"] for d in sorted(deployed, key=lambda d: d["budget"])]),
            "anchor_accuracy": {f"anchor{s.front}": sweep_acc.get(s.id) for s in palette.space.stitches
                                if s.is_anchor},
            "in_between": in_between_served(deployed, anchors, pairs, ACCURACY),
        },
        "deploy_by": deploy_by,
        "train": {"seconds": result.seconds, "steps": result.steps, "trainable_params": result.trainable_params,
                  "total_params": result.total_params, "peak_rss_mb": result.peak_rss_mb,
                  "train_rss_increase_mb": result.train_rss_increase_mb, "final_loss": result.final_loss},
        "config": config.to_dict(),
    }


def summary_text(results: dict, out: str) -> str:
    """What `esta train` prints after a run: the palette's anchors beside the references, the deployed networks, the
    per-pair curves."""
    buf = io.StringIO()
    say = functools.partial(print, file=buf)
    s = results["summary"]
    say(f"\n[{results['method']}] {len(results['stitches'])} stitches adapted to {results['task']} in "
          f"{results['train']['seconds']:.0f} s, {results['train']['steps']} steps "
          f"({results['train']['trainable_params']:,} trainable of {results['train']['total_params']:,} parameters); "
          f"deployed by {results.get('deploy_by', 'importance')}")
    anchors = [a for a in results.get("anchors_in_palette", []) if a["accuracy"] is not None]
    refs = results.get("references", [])
    for a in anchors:  # each anchor in the palette beside the same anchor tuned alone / probed
        others = "".join(f", {r['method']} {100 * r['accuracy']:.2f}% ({r['steps']} steps)" for r in refs
                         if r["name"] == a["name"])
        say(f"anchor {a['name']}: in the palette {100 * a['accuracy']:.2f}% ({a['updates']} steps){others}")
    say(f"{'budget GFLOPs':>14} {'stitch':>24} {'GFLOPs':>7} {'acc %':>6} {'best %':>7} {'regret':>7}")
    for d in results["deployed"]:
        best = d["best_accuracy_in_budget"]
        say(f"{d['budget'] / 1e9:14.3f} {d['name']:>24} {d['flops'] / 1e9:7.3f} {100 * d['accuracy']:6.2f} "
              + (f"{100 * best:7.2f} {100 * d['regret_in_budget']:7.2f}" if best is not None else f"{'-':>7} {'-':>7}"))
    if s["mean_regret"] is not None:
        say(f"mean regret {100 * s['mean_regret_in_budget']:.2f} points against the best stitch within each budget "
              f"({100 * s['mean_regret']:.2f} against the stitches the rule chose among); ", end="")
    say(f"Spearman(budget, accuracy) = {s['spearman_budget_accuracy']:.3f}; largest fall below a cheaper budget's "
          f"pick {100 * s['largest_drop']:.2f} points")
    from ..pairs import describe

    for line in describe(results.get("pairs", [])):
        say(line)
    say(f"wrote {out}/results.json, {out}/results.csv" + (f", {out}/pareto.png" if
          any(x["accuracy"] is not None for x in results["stitches"]) else "") + f", {out}/deployed/")
    return buf.getvalue().rstrip()
