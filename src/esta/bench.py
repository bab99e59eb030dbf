"""``esta bench``: every method on every task with the same data, steps and seeds, side by side in one run.

The protocol (the paper's price: a whole palette for about one fine-tuning): every palette method trains for
``steps`` steps in all; ``anchors-lora`` trains each anchor alone for ``steps`` steps; ``linear-probe`` fits the
anchors' heads and trains nothing. ``steps`` is a count at which ``anchors-lora`` is within a point of its own
result at three times the steps (measured; see the README). Every method starts its new heads the same way.

Each (task, method, seed) is its own ``esta train`` subprocess, so its peak memory is its own (``ru_maxrss`` of a
process never goes down) and a crash costs one run: a finished run is reused when the bench is started again with
the same settings (its command line is kept beside its ``results.json``). Learning rates: the full bench first
sweeps a grid per method on the first task (seed 0) and keeps, for each method, the rate with the best mean
*validation* accuracy of its deployed stitches (held-out test examples, disjoint from the evaluation subset); the
quick bench uses each method's default rate. The other tasks are never looked at while choosing anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .errors import EstaError
from .evaluate import largest_drop
from .families import MINI_FAMILY
from .files import write_json, write_text
from .methods import get_method
from .report import bench_plot

log = logging.getLogger("esta.bench")

TASKS = ["animal-shapes", "mnist", "digits"]
METHODS = ["esta", "esta-uniform", "esta-shared-bias", "snnet", "anchors-lora", "linear-probe"]
#: learning-rate grids for the sweep (PST trains LoRA and biases from zero; full fine-tuning moves pretrained
#: weights). Empty: reuse esta's chosen rate (same PST, same parameters); absent: the method's default.
LR_GRID = {"esta": [1e-3, 2e-3, 4e-3], "esta-uniform": [], "esta-shared-bias": [],
           "snnet": [3e-5, 1e-4, 3e-4], "anchors-lora": [1e-3, 2e-3, 4e-3]}
#: a deployed stitch may cost this much more than an anchor and still count as "at the anchor's budget"
FLOPS_SLACK = 1.05


@dataclass
class BenchConfig:
    anchors: list[str] = field(default_factory=lambda: [MINI_FAMILY])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 300  # palette steps in all; anchors-lora: this many for each anchor
    batch_size: int = 64
    eval_examples: int = 500
    validation_examples: int = 250
    lr_sweep: bool = True
    #: methods whose runs also evaluate every stitch they trained on the test subset (for the regret). SN-Net and
    #: the ablations skip it: their deployed stitches and validation accuracy are all they report.
    regret_methods: list[str] = field(default_factory=lambda: ["esta", "anchors-lora", "linear-probe"])
    out_dir: str = "runs/bench"
    threads: int | None = None  # torch threads per run (default: torch's own choice)
    progress: bool = True

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        """A smoke run of the same pipeline (≤ 10 minutes on 2 cores): one seed, few steps, small evaluation sets,
        no learning-rate sweep, and the comparison a user needs first (ESTA, SN-Net, each anchor tuned alone, each
        anchor's probe). The two ablations need several seeds to separate from noise: the full bench runs them."""
        return cls(**{"seeds": [0], "steps": 40, "eval_examples": 200, "validation_examples": 100,
                      "lr_sweep": False, "regret_methods": ["esta"],
                      "methods": ["esta", "snnet", "anchors-lora", "linear-probe"], **kw})


def _run(cfg: BenchConfig, task: str, method: str, seed: int, lr: float, out: Path, sweep: bool = True) -> dict:
    """One ``esta train`` in a subprocess; its results.json (reused if this very command already finished)."""
    results, made_by = out / "results.json", out / "bench_args.json"
    args = ["train", "--anchors", *cfg.anchors, "--data", task, "--method", method, "--seed", str(seed),
            "--lr", repr(lr), "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
            "--eval-examples", str(cfg.eval_examples), "--validation-examples", str(cfg.validation_examples),
            "--checkpoint-every", "0", "--out", str(out), "--no-progress"] + ([] if sweep else ["--no-sweep"])
    if results.is_file() and made_by.is_file():
        if json.loads(made_by.read_text()) == args:  # a finished run of this very configuration: reuse it
            return json.loads(results.read_text())
        log.info("%s was made with other settings (e.g. a --quick bench): running it again", out)
    shutil.rmtree(out, ignore_errors=True)  # the bench owns its run folders: an unfinished or other run goes
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "esta.cli", *args]
    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    with open(out / "log.txt", "w") as logf:
        code = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = (out / "log.txt").read_text().strip().splitlines()[-5:]
        raise EstaError(f"bench run {task}/{method}/seed{seed} failed (exit {code}):\n  " + "\n  ".join(tail))
    write_json(made_by, args)
    return json.loads(results.read_text())


def slug(task: str) -> str:
    """A file-name-safe name for a task (built-in names stay as they are; paths and hub ids lose their slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("_") or "task"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _points(rows_per_seed: list[list[dict]], keys: tuple[str, ...]) -> list[dict]:
    """Per position (deployed budget, or anchor), mean and spread of the accuracy over seeds."""
    out = []
    for rows in zip(*rows_per_seed):
        accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
        mean, std = _mean_std(accs) if accs else (None, None)
        point = {k: rows[0][k] for k in keys if k in rows[0]}
        point.update({"flops": statistics.fmean(r["flops"] for r in rows), "accuracy": mean, "accuracy_std": std,
                      "accuracy_per_seed": accs})
        out.append(point)
    return out


def summarise(runs: list[dict]) -> dict:
    """One method on one task, over seeds: the fields of bench.json."""
    means = [r["summary"]["mean_deployed_accuracy"] for r in runs]
    regrets = [r["summary"]["mean_regret"] for r in runs if r["summary"]["mean_regret"] is not None]
    regrets_b = [r["summary"].get("mean_regret_in_budget") for r in runs
                 if r["summary"].get("mean_regret_in_budget") is not None]
    mean, std = _mean_std(means)
    deployed = _points([r["deployed"] for r in runs], ("name", "budget"))
    anchors = _points([r["anchors_in_palette"] for r in runs], ("name", "updates"))
    return {
        "deployed": deployed,
        "anchors": anchors,
        "group_accuracy": [d["accuracy"] for d in deployed],
        "group_accuracy_std": [d["accuracy_std"] for d in deployed],
        "group_flops": [d["flops"] for d in deployed],
        "mean_accuracy": mean,
        "mean_accuracy_std": std,
        "mean_accuracy_per_seed": means,
        "largest_drop": largest_drop([d["accuracy"] for d in deployed]),
        "train_seconds": statistics.fmean(r["train"]["seconds"] for r in runs),
        "train_seconds_per_seed": [r["train"]["seconds"] for r in runs],
        "steps": runs[0]["train"]["steps"],
        "trainable_params": runs[0]["train"]["trainable_params"],
        "peak_rss_mb": max(r["train"]["peak_rss_mb"] for r in runs),
        "train_rss_increase_mb": max(r["train"]["train_rss_increase_mb"] for r in runs),
        "deploy_seconds": statistics.fmean(r["timing"]["select_seconds"] for r in runs),
        "sweep_seconds": statistics.fmean(r["timing"]["sweep_seconds"] for r in runs),
        "mean_regret": statistics.fmean(regrets) if regrets else None,
        "mean_regret_in_budget": statistics.fmean(regrets_b) if regrets_b else None,
        "deploy_by": runs[0].get("deploy_by"),
        "lr": runs[0]["config"]["train"]["lr"],
        "seeds": [r["config"]["train"]["seed"] for r in runs],
        "anchor_accuracy": runs[0]["summary"]["anchor_accuracy"],
    }


def sweep_learning_rates(cfg: BenchConfig, bar: tqdm) -> tuple[dict[str, float], dict]:
    """Per method, the grid rate with the best mean validation accuracy on the first task, seed 0."""
    chosen: dict[str, float] = {}
    table: dict[str, dict[str, float]] = {}
    task = cfg.tasks[0]
    for method in cfg.methods:
        grid = LR_GRID.get(method) or []
        if not cfg.lr_sweep or not grid:
            continue
        table[method] = {}
        for lr in grid:
            bar.set_description(f"lr sweep {method} lr={lr:g}")
            r = _run(cfg, task, method, 0, lr, Path(cfg.out_dir) / "lr-sweep" / slug(task) / method / f"lr{lr:g}",
                     sweep=False)
            table[method][repr(lr)] = r["summary"]["mean_validation_accuracy"]
            bar.update(1)
        chosen[method] = float(max(table[method], key=table[method].get))
    for method in cfg.methods:  # the other PST variants share ESTA's rate: same parameters, same scale
        if method not in chosen:
            m = get_method(method)
            esta_like = not m.full_finetune and method in LR_GRID
            chosen[method] = chosen["esta"] if "esta" in chosen and esta_like else m.lr
    return chosen, table


def run_bench(cfg: BenchConfig) -> dict:
    for m in cfg.methods:
        get_method(m)
    if cfg.steps < 1:
        raise EstaError(f"bench steps must be >= 1, got {cfg.steps}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_sweep = sum(len(LR_GRID.get(m) or []) for m in cfg.methods) if cfg.lr_sweep else 0
    total = n_sweep + len(cfg.tasks) * len(cfg.methods) * len(cfg.seeds)
    t0 = time.perf_counter()
    with tqdm(total=total, desc="bench", disable=not cfg.progress) as bar:
        lrs, lr_table = sweep_learning_rates(cfg, bar)
        tasks: dict[str, dict] = {}
        for task in cfg.tasks:
            tasks[task] = {}
            for method in cfg.methods:
                runs = []
                for seed in cfg.seeds:
                    bar.set_description(f"{task} {method} seed {seed}")
                    # anchors-only methods always evaluate their (three) anchors: that is their whole result
                    sweep = method in cfg.regret_methods or get_method(method).anchors_only
                    runs.append(_run(cfg, task, method, seed, lrs[method], out / slug(task) / method / f"seed{seed}",
                                     sweep=sweep))
                    bar.update(1)
                tasks[task][method] = summarise(runs)
            _write(cfg, out, tasks, lrs, lr_table, time.perf_counter() - t0)  # partial results survive a crash
            bench_plot(tasks[task], out / f"pareto-{slug(task)}.png",
                       title=f"{task}: deployed network per budget ({len(cfg.seeds)} seed(s), {cfg.steps} steps)")
    return _write(cfg, out, tasks, lrs, lr_table, time.perf_counter() - t0)


def _write(cfg: BenchConfig, out: Path, tasks: dict, lrs: dict, lr_table: dict, seconds: float) -> dict:
    bench = {"config": asdict(cfg), "learning_rates": lrs, "lr_sweep": lr_table, "seconds": seconds,
             "tasks": tasks, "claims": claims(tasks)}
    write_json(out / "bench.json", bench)
    write_text(out / "bench.md", markdown(bench))
    return bench


def _diff(a: dict, b: dict) -> tuple[float, float]:
    """Mean difference of two methods' mean deployed accuracy (points), and its spread over paired seeds."""
    pa, pb = a["mean_accuracy_per_seed"], b["mean_accuracy_per_seed"]
    diffs = [100 * (x - y) for x, y in zip(pa, pb)]
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)


def best_within(deployed: list[dict], flops: float) -> float | None:
    """The best mean accuracy among deployed networks that cost at most ``flops`` (with the slack)."""
    fits = [d["accuracy"] for d in deployed if d["accuracy"] is not None and d["flops"] <= FLOPS_SLACK * flops]
    return max(fits) if fits else None


def claims(tasks: dict) -> dict:
    """The issue's goals, checked on the measured numbers."""
    out = {}
    for task, m in tasks.items():
        c: dict = {}
        if "esta" in m:
            e = m["esta"]
            c["esta_largest_drop_points"] = 100 * e["largest_drop"]
            c["esta_mean_regret_points"] = 100 * e["mean_regret"] if e["mean_regret"] is not None else None
            c["esta_mean_regret_in_budget_points"] = (100 * e["mean_regret_in_budget"]
                                                      if e["mean_regret_in_budget"] is not None else None)
            per_anchor = []
            for ref_name in ("anchors-lora", "linear-probe"):
                if ref_name not in m:
                    continue
                for a in m[ref_name]["anchors"]:
                    best = best_within(e["deployed"], a["flops"])
                    per_anchor.append({"reference": ref_name, "anchor": a["name"], "flops": a["flops"],
                                       "reference_accuracy": a["accuracy"], "esta_best_within": best,
                                       "esta_minus_reference_points": None if best is None or a["accuracy"] is None
                                       else 100 * (best - a["accuracy"])})
            c["esta_at_anchor_budgets"] = per_anchor
        if "esta" in m and "snnet" in m:
            e, s = m["esta"], m["snnet"]
            c["esta_minus_snnet_mean_points"], c["esta_minus_snnet_spread"] = _diff(e, s)
            c["groups_esta_at_least_snnet"] = sum(a >= b for a, b in zip(e["group_accuracy"], s["group_accuracy"]))
            c["groups"] = len(e["group_accuracy"])
            c["train_time_ratio"] = e["train_seconds"] / s["train_seconds"]
            c["trainable_params_ratio"] = e["trainable_params"] / s["trainable_params"]
            c["peak_rss_ratio"] = e["peak_rss_mb"] / s["peak_rss_mb"]
            c["train_rss_increase_ratio"] = (e["train_rss_increase_mb"] / s["train_rss_increase_mb"]
                                             if s["train_rss_increase_mb"] else None)
            c["deploy_time_ratio"] = e["deploy_seconds"] / s["deploy_seconds"] if s["deploy_seconds"] else None
        if "esta" in m and "esta-uniform" in m:
            c["importance_minus_uniform_points"], c["importance_minus_uniform_spread"] = _diff(m["esta"],
                                                                                               m["esta-uniform"])
        if "esta" in m and "esta-shared-bias" in m:
            c["per_stitch_minus_shared_bias_points"], c["per_stitch_minus_shared_bias_spread"] = _diff(
                m["esta"], m["esta-shared-bias"])
        out[task] = c
    return out


def _pct(v: float | None, spread: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" + (f" ± {100 * spread:.1f}" if spread else "")


def markdown(bench: dict) -> str:
    cfg = bench["config"]
    lines = [f"# esta bench ({len(cfg['seeds'])} seed(s) {cfg['seeds']}, {cfg['steps']} steps at batch "
             f"{cfg['batch_size']}, {cfg['eval_examples']} evaluation examples per task; ± is the standard deviation "
             "over seeds)", ""]
    for task, methods in bench["tasks"].items():
        lines += [f"## {task}", "",
                  "| method | mean acc % | acc % per budget (cheap → costly) | anchors in the run (acc %) | train s "
                  "| trainable params | peak RSS MB | regret (in budget) points | lr |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in methods.items():
            groups = " ".join(_pct(d["accuracy"]) for d in r["deployed"])
            anchors = ", ".join(f"{a['name']} {_pct(a['accuracy'], a['accuracy_std'])}" for a in r["anchors"]
                                if a["accuracy"] is not None) or "-"
            regret = (f"{100 * r['mean_regret']:.2f} ({100 * r['mean_regret_in_budget']:.2f})"
                      if r["mean_regret"] is not None and r["mean_regret_in_budget"] is not None else "-")
            lines.append(f"| {name} | {_pct(r['mean_accuracy'], r['mean_accuracy_std'])} | {groups} | {anchors} "
                         f"| {r['train_seconds']:.0f} | {r['trainable_params']:,} | {r['peak_rss_mb']:.0f} "
                         f"| {regret} | {r['lr']:g} |")
        c = bench["claims"].get(task, {})
        lines.append("")
        if "esta_minus_snnet_mean_points" in c:
            lines.append(f"- ESTA − SN-Net: {c['esta_minus_snnet_mean_points']:+.2f} ± "
                         f"{c['esta_minus_snnet_spread']:.2f} points mean; ESTA ≥ SN-Net in "
                         f"{c['groups_esta_at_least_snnet']}/{c['groups']} budgets; ESTA/SN-Net: training time "
                         f"{c['train_time_ratio']:.2f}×, trainable params {c['trainable_params_ratio']:.3f}×, "
                         f"peak RSS {c['peak_rss_ratio']:.2f}×")
        if "esta_largest_drop_points" in c:
            lines.append(f"- ESTA's deployed accuracy never falls more than {c['esta_largest_drop_points']:.2f} "
                         "points below a cheaper deployed network")
        for row in c.get("esta_at_anchor_budgets", []):
            if row["esta_minus_reference_points"] is not None:
                lines.append(f"- at {row['anchor']}'s cost ({row['flops'] / 1e9:.3f} GFLOPs): ESTA's best "
                             f"{_pct(row['esta_best_within'])} % vs {row['reference']} "
                             f"{_pct(row['reference_accuracy'])} % ({row['esta_minus_reference_points']:+.2f})")
        if "importance_minus_uniform_points" in c:
            lines.append(f"- importance − uniform sampling: {c['importance_minus_uniform_points']:+.2f} ± "
                         f"{c['importance_minus_uniform_spread']:.2f} points")
        if "per_stitch_minus_shared_bias_points" in c:
            lines.append(f"- stitch-specific − shared bias: {c['per_stitch_minus_shared_bias_points']:+.2f} ± "
                         f"{c['per_stitch_minus_shared_bias_spread']:.2f} points")
        lines.append("")
    return "\n".join(lines)
