"""``esta bench``: every method on every task with the same data, epochs and seeds, side by side in one run.

Each (task, method, seed) is its own ``esta train`` subprocess, so its peak memory is its own (``ru_maxrss`` of a
process never goes down) and a crash costs one run: a finished run is reused when the bench is started again with
the same settings (its command line is kept beside its ``results.json``). Learning rates: the full bench first sweeps a grid per method on the first task (seed 0) and
keeps, for each method, the rate with the best mean *validation* accuracy of its deployed stitches (held-out test
examples, disjoint from the evaluation subset); the quick bench uses each method's default rate.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .errors import EstaError
from .families import MINI_FAMILY
from .methods import METHODS, get_method
from .report import bench_plot

log = logging.getLogger("esta.bench")

TASKS = ["animal-shapes", "mnist", "digits"]
#: learning-rate grids for the sweep (PST trains LoRA and biases from zero; full fine-tuning moves pretrained weights)
LR_GRID = {"esta": [1e-3, 2e-3, 4e-3], "esta-uniform": [], "esta-shared-bias": [],
           "snnet": [3e-5, 1e-4, 3e-4], "anchors-lora": []}  # empty: reuse esta's chosen rate (same PST)


@dataclass
class BenchConfig:
    anchors: list[str] = field(default_factory=lambda: [MINI_FAMILY])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    epochs: float = 6.0
    eval_examples: int = 500
    validation_examples: int = 250
    lr_sweep: bool = True
    #: methods whose runs also evaluate every stitch on the test subset (for the regret). SN-Net, the ablations
    #: and the learning-rate sweep runs skip it: their deployed stitches and validation accuracy are all they
    #: report, and the sweep (71 stitches × the evaluation set) would otherwise be most of the bench's time.
    regret_methods: list[str] = field(default_factory=lambda: ["esta", "anchors-lora"])
    out_dir: str = "runs/bench"
    threads: int | None = None  # torch threads per run (default: torch's own choice)
    progress: bool = True

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        """≤ 10 minutes on 2 cores (8 min 48 s measured): one seed, one epoch, small evaluation sets, no sweeps."""
        return cls(**{"seeds": [0], "epochs": 1.0, "eval_examples": 200, "validation_examples": 100,
                      "lr_sweep": False, "regret_methods": [], **kw})


def _run(cfg: BenchConfig, task: str, method: str, seed: int, lr: float, out: Path, sweep: bool = True) -> dict:
    """One ``esta train`` in a subprocess; its results.json (reused if this very command already finished)."""
    results, made_by = out / "results.json", out / "bench_args.json"
    args = ["train", "--anchors", *cfg.anchors, "--data", task, "--method", method, "--seed", str(seed),
            "--lr", repr(lr), "--epochs", repr(cfg.epochs), "--eval-examples", str(cfg.eval_examples),
            "--validation-examples", str(cfg.validation_examples), "--checkpoint-every", "0", "--out", str(out),
            "--no-progress"] + ([] if sweep else ["--no-sweep"])
    if results.is_file() and made_by.is_file():
        if json.loads(made_by.read_text()) == args:  # a finished run of this very configuration: reuse it
            return json.loads(results.read_text())
        log.info("%s was made with other settings (e.g. a --quick bench): running it again", out)
    out.mkdir(parents=True, exist_ok=True)
    made_by.unlink(missing_ok=True)  # written only once the run has finished
    cmd = [sys.executable, "-m", "esta.cli", *args]
    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    with open(out / "log.txt", "w") as logf:
        code = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = (out / "log.txt").read_text().strip().splitlines()[-5:]
        raise EstaError(f"bench run {task}/{method}/seed{seed} failed (exit {code}):\n  " + "\n  ".join(tail))
    made_by.write_text(json.dumps(args))
    return json.loads(results.read_text())


def slug(task: str) -> str:
    """A file-name-safe name for a task (built-in names stay as they are; paths and hub ids lose their slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("_") or "task"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict]) -> dict:
    """One method on one task, over seeds: the fields of bench.json."""
    groups = [r["summary"]["group_accuracy"] for r in runs]
    per_group = [list(col) for col in zip(*groups)]
    means = [r["summary"]["mean_deployed_accuracy"] for r in runs]
    regrets = [r["summary"]["mean_regret"] for r in runs if r["summary"]["mean_regret"] is not None]
    mean, std = _mean_std(means)
    return {
        "group_accuracy": [statistics.fmean(c) for c in per_group],
        "group_accuracy_std": [_mean_std(c)[1] for c in per_group],
        "group_flops": [statistics.fmean(c) for c in zip(*[[d["flops"] for d in r["deployed"]] for r in runs])],
        "mean_accuracy": mean,
        "mean_accuracy_std": std,
        "mean_accuracy_per_seed": means,
        "train_seconds": statistics.fmean(r["train"]["seconds"] for r in runs),
        "trainable_params": runs[0]["train"]["trainable_params"],
        "peak_rss_mb": max(r["train"]["peak_rss_mb"] for r in runs),
        "train_rss_increase_mb": max(r["train"]["train_rss_increase_mb"] for r in runs),
        "deploy_seconds": statistics.fmean(r["timing"]["select_seconds"] for r in runs),
        "sweep_seconds": statistics.fmean(r["timing"]["sweep_seconds"] for r in runs),
        "mean_regret": statistics.fmean(regrets) if regrets else None,
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
            chosen[method] = chosen["esta"] if "esta" in chosen and not m.full_finetune else m.lr
    return chosen, table


def run_bench(cfg: BenchConfig) -> dict:
    for m in cfg.methods:
        get_method(m)
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
                    runs.append(_run(cfg, task, method, seed, lrs[method], out / slug(task) / method / f"seed{seed}",
                                     sweep=method in cfg.regret_methods))
                    bar.update(1)
                tasks[task][method] = summarise(runs)
            _write(cfg, out, tasks, lrs, lr_table, time.perf_counter() - t0)  # partial results survive a crash
            bench_plot(tasks[task], out / f"pareto-{slug(task)}.png", title=f"{task}: deployed stitch per budget")
    return _write(cfg, out, tasks, lrs, lr_table, time.perf_counter() - t0)


def _write(cfg: BenchConfig, out: Path, tasks: dict, lrs: dict, lr_table: dict, seconds: float) -> dict:
    bench = {"config": asdict(cfg), "learning_rates": lrs, "lr_sweep": lr_table, "seconds": seconds,
             "tasks": tasks, "claims": claims(tasks)}
    (out / "bench.json").write_text(json.dumps(bench, indent=1))
    (out / "bench.md").write_text(markdown(bench))
    return bench


def claims(tasks: dict) -> dict:
    """The issue's goals, checked on the measured numbers (ESTA against SN-Net and the ablations)."""
    out = {}
    for task, m in tasks.items():
        c: dict = {}
        if "esta" in m and "snnet" in m:
            e, s = m["esta"], m["snnet"]
            c["esta_minus_snnet_mean_points"] = 100 * (e["mean_accuracy"] - s["mean_accuracy"])
            c["groups_esta_at_least_snnet"] = sum(a >= b for a, b in zip(e["group_accuracy"], s["group_accuracy"]))
            c["groups"] = len(e["group_accuracy"])
            c["train_time_ratio"] = e["train_seconds"] / s["train_seconds"]
            c["trainable_params_ratio"] = e["trainable_params"] / s["trainable_params"]
            c["peak_rss_ratio"] = e["peak_rss_mb"] / s["peak_rss_mb"]
            c["train_rss_increase_ratio"] = (e["train_rss_increase_mb"] / s["train_rss_increase_mb"]
                                             if s["train_rss_increase_mb"] else None)
            c["deploy_time_ratio"] = e["deploy_seconds"] / s["deploy_seconds"] if s["deploy_seconds"] else None
            c["esta_mean_regret_points"] = 100 * e["mean_regret"] if e["mean_regret"] is not None else None
        if "esta" in m and "esta-uniform" in m:
            c["importance_minus_uniform_points"] = 100 * (m["esta"]["mean_accuracy"] - m["esta-uniform"]["mean_accuracy"])
        if "esta" in m and "esta-shared-bias" in m:
            c["per_stitch_minus_shared_bias_points"] = 100 * (m["esta"]["mean_accuracy"]
                                                              - m["esta-shared-bias"]["mean_accuracy"])
        out[task] = c
    return out


def markdown(bench: dict) -> str:
    lines = [f"# esta bench ({len(bench['config']['seeds'])} seed(s), {bench['config']['epochs']:g} epochs, "
             f"{bench['config']['eval_examples']} evaluation examples per task)", ""]
    for task, methods in bench["tasks"].items():
        lines += [f"## {task}", "",
                  "| method | mean acc % (± sd over seeds) | acc % per budget group | train s | trainable params "
                  "| peak RSS MB (training's share) | deploy s | mean regret (points) | lr |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in methods.items():
            groups = " ".join(f"{100 * a:.1f}" for a in r["group_accuracy"])
            regret = f"{100 * r['mean_regret']:.2f}" if r["mean_regret"] is not None else "-"
            lines.append(f"| {name} | {100 * r['mean_accuracy']:.2f} ± {100 * r['mean_accuracy_std']:.2f} | {groups} "
                         f"| {r['train_seconds']:.0f} | {r['trainable_params']:,} | {r['peak_rss_mb']:.0f} "
                         f"({r['train_rss_increase_mb']:.0f}) "
                         f"| {r['deploy_seconds']:.3g} | {regret} | {r['lr']:g} |")
        c = bench["claims"].get(task, {})
        if "esta_minus_snnet_mean_points" in c:
            lines += ["", f"ESTA − SN-Net: {c['esta_minus_snnet_mean_points']:+.2f} points mean; ESTA ≥ SN-Net in "
                      f"{c['groups_esta_at_least_snnet']}/{c['groups']} groups; ratios ESTA/SN-Net: train time "
                      f"{c['train_time_ratio']:.2f}, trainable params {c['trainable_params_ratio']:.3f}, peak RSS "
                      f"{c['peak_rss_ratio']:.2f} (training's share "
                      + (f"{c['train_rss_increase_ratio']:.2f}" if c["train_rss_increase_ratio"] else "-")
                      + "), deploy time "
                      + (f"{c['deploy_time_ratio']:.2g}" if c["deploy_time_ratio"] is not None else "-")]
        if "importance_minus_uniform_points" in c:
            lines.append(f"importance − uniform sampling: {c['importance_minus_uniform_points']:+.2f} points")
        if "per_stitch_minus_shared_bias_points" in c:
            lines.append(f"stitch-specific − shared bias: {c['per_stitch_minus_shared_bias_points']:+.2f} points")
        lines.append("")
    return "\n".join(lines)
