"""``esta bench``: every method on every task with the same data, steps and seeds, side by side in one run.

The protocol (the user's price, ``price="anchors"``): ``anchors-lora`` trains each anchor alone for ``steps`` steps,
and every palette method trains for as many examples as those fine-tunings together (``steps`` times the number of
anchors): what a user would otherwise spend on one fine-tuning per device. ``price="one"`` gives a palette the
steps of a single fine-tuning (the paper's framing). ``linear-probe`` fits the anchors' heads and trains nothing.
``steps`` is a count at which ``anchors-lora`` is within a point of its own result at three times the steps
(measured; see the README). Every method starts its new heads the same way.

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

from .budget import AXES
from .errors import EstaError
from .families import MINI_FAMILY
from .files import write_json, write_text
from .methods import get_method
from .report import bench_plot
from .results import ACCURACY, METRICS, Metric, Point, RunResults, largest_fall

log = logging.getLogger("esta.bench")

#: fashion-mnist is the family's own source task (in domain, SN-Net's setting, where size pays a little) and
#: fashion-blurred a corrupted version of it, the candidate on which the anchors tuned alone gained most with size
#: (docs/results.md); on the shipped three they do not
TASKS = ["fashion-mnist", "fashion-blurred", "animal-shapes", "mnist", "digits"]
METHODS = ["esta", "esta-uniform", "esta-shared-bias", "snnet", "anchors-lora", "linear-probe"]
ABLATIONS = ("esta-uniform", "esta-shared-bias")
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
    steps: int = 150  # anchors-lora: this many for each anchor; a palette: see ``price``
    #: "anchors": a palette trains for ``steps`` x the number of anchors (the examples of every anchor tuned alone);
    #: "one": for ``steps`` (the examples of one fine-tuning)
    price: str = "anchors"
    batch_size: int = 64
    eval_examples: int = 500
    validation_examples: int = 150
    lr_sweep: bool = True
    #: rates given per method (e.g. those an earlier sweep chose): these methods are not swept
    lrs: dict[str, float] = field(default_factory=dict)
    #: the tasks on which the two ablations run (None: the first task only). They ask whether a part of ESTA helps
    #: at all, which one task with every seed answers; on every task they would add half again to the bench's time.
    ablation_tasks: list[str] | None = None
    #: methods whose runs also evaluate every stitch they trained on the test subset (for the regret). SN-Net and
    #: the ablations skip it: their deployed stitches and validation accuracy are all they report.
    regret_methods: list[str] = field(default_factory=lambda: ["esta", "snnet", "anchors-lora", "linear-probe"])
    out_dir: str = "runs/bench"
    threads: int | None = None  # torch threads per run (default: torch's own choice)
    default_lrs: bool = True  # unswept methods run at their image default rate (False: the Task config's own)
    progress: bool = True

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        """A smoke run of the same pipeline (≤ 10 minutes on 2 cores): one seed, few steps, small evaluation sets,
        no learning-rate sweep, and the comparison a user needs first (ESTA, SN-Net, each anchor tuned alone, each
        anchor's probe). The two ablations need several seeds to separate from noise: the full bench runs them."""
        return cls(**{"seeds": [0], "steps": 40, "eval_examples": 200, "validation_examples": 100,
                      "tasks": ["fashion-mnist", "animal-shapes", "digits"],
                      "lr_sweep": False, "regret_methods": ["esta"],
                      "methods": ["esta", "snnet", "anchors-lora", "linear-probe"], **kw})


def _config_class(cfg: BenchConfig) -> type:
    from .families import source_kind
    from .tasks import task_for_family

    return task_for_family(source_kind(cfg.anchors[0]))[0]


def _run(cfg: BenchConfig, task: str, method: str, seed: int, lr: float | None, out: Path,
         sweep: bool = True) -> RunResults:
    """One ``esta train`` in a subprocess; its typed results (reused if this very command already finished)."""
    results, made_by = out / "results.json", out / "bench_args.json"
    steps = cfg.steps if get_method(method).anchors_only else palette_steps(cfg)
    image = hasattr(_config_class(cfg), "eval_examples")  # a language Task holds out records, and always sweeps
    args = ["train", "--anchors", *cfg.anchors, "--data", task, "--method", method, "--seed", str(seed),
            *(["--lr", repr(lr)] if lr is not None else []), "--steps", str(steps),
            "--batch-size", str(cfg.batch_size), "--eval-examples" if image else "--heldout", str(cfg.eval_examples),
            "--validation-examples", str(cfg.validation_examples), "--checkpoint-every", "0", "--out", str(out),
            "--no-progress"] + ([] if sweep or not image else ["--no-sweep"])
    if results.is_file() and made_by.is_file():
        if json.loads(made_by.read_text()) == args and "run" in json.loads(results.read_text()):
            return RunResults.from_json(json.loads(results.read_text()))  # a finished run of this very command
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
    return RunResults.from_json(json.loads(results.read_text()))


def palette_steps(cfg: BenchConfig) -> int:
    """A palette method's steps at the bench's price (see ``BenchConfig.price``)."""
    from .families import mini_family_paths

    if cfg.price not in ("anchors", "one"):
        raise EstaError(f"bench price must be 'anchors' or 'one', got {cfg.price!r}")
    n = len([s for a in cfg.anchors for s in (mini_family_paths() if a == MINI_FAMILY else [a])])
    return cfg.steps * (n if cfg.price == "anchors" else 1)


def slug(task: str) -> str:
    """A file-name-safe name for a task (built-in names stay as they are; paths and hub ids lose their slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("_") or "task"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _points(per_seed: list[list[Point]], metric: Metric) -> list[dict]:
    """Per position (deployed budget, or anchor), mean and spread of the metric over seeds."""
    out = []
    for points in zip(*per_seed):
        values = [p.value for p in points if p.value is not None]
        mean, std = _mean_std(values) if values else (None, None)
        first = points[0]
        row = {"name": first.name, **({"budget": first.budget} if first.budget is not None else {}),
               "updates": first.updates, "cost": statistics.fmean(p.cost for p in points),
               "flops": statistics.fmean(p.flops for p in points) if first.flops is not None else None,
               "params": first.params}
        row.update({metric.name: mean, f"{metric.name}_std": std, f"{metric.name}_per_seed": values})
        out.append(row)
    return out


def summarise(runs: list[RunResults]) -> dict:
    """One method on one task, over seeds: the fields of bench.json (named after the Task's metric, e.g.
    ``mean_accuracy``, ``group_accuracy``; ``mean_perplexity`` for a language family)."""
    m, first = runs[0].measure, runs[0]
    means = [r.mean_deployed for r in runs]
    regrets = [r.mean_regret for r in runs if r.mean_regret is not None]
    regrets_b = [r.mean_regret_in_budget for r in runs if r.mean_regret_in_budget is not None]
    mean, std = _mean_std(means)
    deployed = _points([r.deployed for r in runs], m)
    values = [d[m.name] for d in deployed]
    return {
        "metric": m.name, "cost_axis": first.cost_axis,
        "deployed": deployed,
        "anchors": _points([r.anchors for r in runs], m),
        f"group_{m.name}": values,
        f"group_{m.name}_std": [d[f"{m.name}_std"] for d in deployed],
        "group_cost": [d["cost"] for d in deployed],
        f"mean_{m.name}": mean,
        f"mean_{m.name}_std": std,
        f"mean_{m.name}_per_seed": means,
        "largest_drop": largest_fall(values, m) / m.scale,  # in the metric's own units (accuracy: a fraction)
        "train_seconds": statistics.fmean(r.train_seconds for r in runs),
        "train_seconds_per_seed": [r.train_seconds for r in runs],
        "steps": first.steps,
        "trainable_params": first.trainable_params,
        "peak_rss_mb": max(r.peak_rss_mb for r in runs),
        "train_rss_increase_mb": max(r.train_rss_increase_mb for r in runs),
        "deploy_seconds": statistics.fmean(r.select_seconds for r in runs),
        "sweep_seconds": statistics.fmean(r.sweep_seconds for r in runs),
        "mean_regret": statistics.fmean(regrets) if regrets else None,
        "mean_regret_in_budget": statistics.fmean(regrets_b) if regrets_b else None,
        "deploy_by": first.deploy_by,
        "lr": first.lr,
        "seeds": [r.seed for r in runs],
        "pairs": _pairs(runs, m),
        "in_between_share": _mean_or_none([r.in_between.get("share") for r in runs]),
        "in_between_per_seed": [r.in_between for r in runs],
    }


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _pairs(runs: list[RunResults], m: Metric) -> list[dict]:
    """Per anchor pair, over seeds: Spearman(cost, quality) of its stitches, the most-end stitch's gap to the end
    anchor, and how many stitches beat the cheaper anchor (each seed's value and their mean)."""
    by_pair: dict[str, list[dict]] = {}
    for r in runs:
        for p in r.pairs:
            by_pair.setdefault(f"{p['front_name']}->{p['end_name']}", []).append(p)
    out = []
    for name, ps in by_pair.items():
        gaps = [p["most_end"]["gap_to_end"] for p in ps]
        out.append({"pair": name, "count": ps[0]["count"],
                    "spearman": _mean_or_none([p["spearman"] for p in ps]),
                    "spearman_per_seed": [p["spearman"] for p in ps],
                    "most_end_gap": None if None in gaps else m.scale * statistics.fmean(gaps),
                    "most_end_gap_per_seed": [None if g is None else m.scale * g for g in gaps],
                    "most_end": [p["most_end"]["name"] for p in ps],
                    "above_cheaper": _mean_or_none([p["above_cheaper"] for p in ps]),
                    "above_cheaper_per_seed": [p["above_cheaper"] for p in ps]})
    return out


def sweep_learning_rates(cfg: BenchConfig, bar: tqdm) -> tuple[dict[str, float | None], dict, dict[str, RunResults]]:
    """Per method, the grid rate with the best mean validation score (accuracy, or perplexity for a language
    family) of its deployed networks on the first task, first seed; and that run, which the bench reuses as the
    method's run on the first task and seed (the same command but for the regret's test sweep)."""
    chosen: dict[str, float] = {}
    table: dict[str, dict[str, float]] = {}
    runs: dict[str, dict[str, RunResults]] = {}
    task = cfg.tasks[0]
    for method in cfg.methods:
        grid = LR_GRID.get(method) or []
        if method in cfg.lrs:
            chosen[method] = cfg.lrs[method]
            continue
        if not cfg.lr_sweep or not grid:
            continue
        table[method], runs[method] = {}, {}
        for lr in grid:
            bar.set_description(f"lr sweep {method} lr={lr:g}")
            r = _run(cfg, task, method, cfg.seeds[0], lr,
                     Path(cfg.out_dir) / "lr-sweep" / slug(task) / method / f"lr{lr:g}",
                     sweep=get_method(method).anchors_only)
            table[method][repr(lr)] = r.mean_validation
            runs[method][repr(lr)] = r
            bar.update(1)
        scored = {k: v for k, v in table[method].items() if v is not None}
        if not scored:
            raise EstaError(f"the learning-rate sweep of {method} measured no validation score")
        best = r.measure.best(list(scored.values()))
        chosen[method] = float(next(k for k, v in scored.items() if v == best))
    for method in cfg.methods:  # the other PST variants share ESTA's rate: same parameters, same scale
        if method not in chosen:
            m = get_method(method)
            esta_like = not m.full_finetune and method in LR_GRID
            chosen[method] = chosen["esta"] if "esta" in chosen and esta_like else m.lr if cfg.default_lrs else None
    return chosen, table, {m: runs[m][repr(chosen[m])] for m in runs}


def for_family(cfg: BenchConfig) -> BenchConfig:
    """The bench as the family's Task can run it: methods that do not apply to it are skipped (a linear probe has
    no new head to fit on a language family), and the learning-rate grids, which are image ones, are not swept for
    a language family (each method runs at the Task's default rate)."""
    from dataclasses import replace

    from .families import source_kind
    from .tasks import task_for_family

    _, task_cls = task_for_family(source_kind(cfg.anchors[0]))
    skipped = [m for m in cfg.methods if task_cls.methods is not None and m not in task_cls.methods]
    if skipped:
        log.info("%s do not apply to %s: skipped", ", ".join(skipped), task_cls.kind)
    image = task_cls.kind == "image-classification"
    return replace(cfg, methods=[m for m in cfg.methods if m not in skipped], lr_sweep=cfg.lr_sweep and image,
                   default_lrs=image)


def run_bench(cfg: BenchConfig) -> dict:
    for m in cfg.methods:
        get_method(m)
    if cfg.steps < 1:
        raise EstaError(f"bench steps must be >= 1, got {cfg.steps}")
    cfg = for_family(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_sweep = sum(len(LR_GRID.get(m) or []) for m in cfg.methods if m not in cfg.lrs) if cfg.lr_sweep else 0
    ablation_tasks = cfg.ablation_tasks if cfg.ablation_tasks is not None else cfg.tasks[:1]
    plan = {task: [m for m in cfg.methods if m not in ABLATIONS or task in ablation_tasks] for task in cfg.tasks}
    total = n_sweep + sum(len(ms) for ms in plan.values()) * len(cfg.seeds)
    t0 = time.perf_counter()
    with tqdm(total=total, desc="bench", disable=not cfg.progress) as bar:
        lrs, lr_table, swept = sweep_learning_rates(cfg, bar)
        tasks: dict[str, dict] = {}
        for task in cfg.tasks:
            tasks[task] = {}
            for method in plan[task]:
                runs = []
                for seed in cfg.seeds:
                    bar.set_description(f"{task} {method} seed {seed}")
                    if task == cfg.tasks[0] and seed == cfg.seeds[0] and method in swept:
                        runs.append(swept[method])  # the sweep's run at the chosen rate (no regret sweep)
                    else:
                        # anchors-only methods always evaluate their (three) anchors: that is their whole result
                        sweep = method in cfg.regret_methods or get_method(method).anchors_only
                        runs.append(_run(cfg, task, method, seed, lrs[method],
                                         out / slug(task) / method / f"seed{seed}", sweep=sweep))
                    bar.update(1)
                tasks[task][method] = summarise(runs)
            _write(cfg, out, tasks, lrs, lr_table, time.perf_counter() - t0)  # partial results survive a crash
            bench_plot(tasks[task], out / f"pareto-{slug(task)}.png",
                       title=f"{task}: deployed network per budget ({len(cfg.seeds)} seed(s), palette "
                             f"{palette_steps(cfg)} steps, each anchor alone {cfg.steps})")
    return _write(cfg, out, tasks, lrs, lr_table, time.perf_counter() - t0)


def _write(cfg: BenchConfig, out: Path, tasks: dict, lrs: dict, lr_table: dict, seconds: float) -> dict:
    bench = {"config": asdict(cfg), "palette_steps": palette_steps(cfg), "learning_rates": lrs, "lr_sweep": lr_table, "seconds": seconds,
             "tasks": tasks, "claims": claims(tasks)}
    write_json(out / "bench.json", bench)
    write_text(out / "bench.md", markdown(bench))
    return bench


def _diff(a: dict, b: dict, m: Metric) -> tuple[float, float]:
    """How much better method a's mean deployed score is than b's (display units: points of accuracy, or
    perplexity), and its spread over paired seeds."""
    pa, pb = a[f"mean_{m.name}_per_seed"], b[f"mean_{m.name}_per_seed"]
    diffs = [m.gain(x, y) for x, y in zip(pa, pb)]
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)


def best_within(deployed: list[dict], cost: float, m: Metric = ACCURACY) -> float | None:
    """The best mean score among deployed networks that cost at most ``cost`` (with the slack)."""
    fits = [d[m.name] for d in deployed if d[m.name] is not None and d["cost"] <= FLOPS_SLACK * cost]
    return m.best(fits) if fits else None


def claims(tasks: dict) -> dict:
    """The issue's goals, checked on the measured numbers (differences in display units: points, or perplexity;
    positive: ESTA better)."""
    out = {}
    for task, methods in tasks.items():
        c: dict = {}
        m = METRICS[next(iter(methods.values()))["metric"]]
        if "esta" in methods:
            e = methods["esta"]
            c["esta_largest_drop_points"] = m.scale * e["largest_drop"]
            c["esta_mean_regret_points"] = m.scale * e["mean_regret"] if e["mean_regret"] is not None else None
            c["esta_mean_regret_in_budget_points"] = (m.scale * e["mean_regret_in_budget"]
                                                      if e["mean_regret_in_budget"] is not None else None)
            per_anchor = []
            for ref_name in ("anchors-lora", "linear-probe"):
                for a in methods.get(ref_name, {}).get("anchors", []):
                    best = best_within(e["deployed"], a["cost"], m)
                    per_anchor.append({"reference": ref_name, "anchor": a["name"], "cost": a["cost"],
                                       "flops": a["flops"], "reference_value": a[m.name], "esta_best_within": best,
                                       "esta_minus_reference_points": None if best is None or a[m.name] is None
                                       else m.gain(best, a[m.name])})
            c["esta_at_anchor_budgets"] = per_anchor
            alone = {a["name"]: a for a in methods.get("anchors-lora", {}).get("anchors", [])}
            c["palette_anchor_minus_alone"] = [
                {"anchor": a["name"], "palette": a[m.name], "alone": alone[a["name"]][m.name],
                 "palette_per_seed": a[f"{m.name}_per_seed"], "alone_per_seed": alone[a["name"]][f"{m.name}_per_seed"],
                 "points": m.gain(a[m.name], alone[a["name"]][m.name]),
                 "points_per_seed": [m.gain(x, y) for x, y in zip(a[f"{m.name}_per_seed"],
                                                                   alone[a["name"]][f"{m.name}_per_seed"])]}
                for a in e["anchors"] if a["name"] in alone and a[m.name] is not None
                and alone[a["name"]][m.name] is not None]
            c["esta_pairs"] = e.get("pairs", [])
            c["esta_in_between_share"] = e.get("in_between_share")
        if "esta" in methods and "snnet" in methods:
            e, s = methods["esta"], methods["snnet"]
            c["esta_minus_snnet_mean_points"], c["esta_minus_snnet_spread"] = _diff(e, s, m)
            c["groups_esta_at_least_snnet"] = sum(m.gain(a, b) >= 0 for a, b in zip(e[f"group_{m.name}"],
                                                                                    s[f"group_{m.name}"]))
            c["groups"] = len(e[f"group_{m.name}"])
            c["train_time_ratio"] = e["train_seconds"] / s["train_seconds"]
            c["trainable_params_ratio"] = e["trainable_params"] / s["trainable_params"]
            c["peak_rss_ratio"] = e["peak_rss_mb"] / s["peak_rss_mb"]
            c["train_rss_increase_ratio"] = (e["train_rss_increase_mb"] / s["train_rss_increase_mb"]
                                             if s["train_rss_increase_mb"] else None)
            c["deploy_time_ratio"] = e["deploy_seconds"] / s["deploy_seconds"] if s["deploy_seconds"] else None
        if "esta" in methods and "esta-uniform" in methods:
            c["importance_minus_uniform_points"], c["importance_minus_uniform_spread"] = _diff(
                methods["esta"], methods["esta-uniform"], m)
        if "esta" in methods and "esta-shared-bias" in methods:
            c["per_stitch_minus_shared_bias_points"], c["per_stitch_minus_shared_bias_spread"] = _diff(
                methods["esta"], methods["esta-shared-bias"], m)
        out[task] = c
    return out


def _show(m: Metric, v: float | None, spread: float | None = None) -> str:
    return m.show(v) + (f" ± {m.show(spread)}" if v is not None and spread else "")


def markdown(bench: dict) -> str:
    cfg = bench["config"]
    palette = bench.get("palette_steps", cfg["steps"])
    lines = [f"# esta bench ({len(cfg['seeds'])} seed(s) {cfg['seeds']}, each anchor alone {cfg['steps']} steps, a "
             f"palette {palette} steps, at batch "
             f"{cfg['batch_size']}, {cfg['eval_examples']} evaluation examples per task; ± is the standard deviation "
             "over seeds)", ""]
    for task, methods in bench["tasks"].items():
        first = next(iter(methods.values()))
        m, axis = METRICS[first["metric"]], AXES[first["cost_axis"]]
        short = "acc %" if m is ACCURACY else m.name
        lines += [f"## {task}", "",
                  f"| method | mean {short} | {short} per budget (cheap → costly) | anchors in the run ({short}) "
                  "| train s | trainable params | peak RSS MB | regret (in budget) points | lr |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in methods.items():
            groups = " ".join(_show(m, d[m.name]) for d in r["deployed"])
            anchors = ", ".join(f"{a['name']} {_show(m, a[m.name], a[f'{m.name}_std'])}" for a in r["anchors"]
                                if a[m.name] is not None) or "-"
            regret = (f"{m.scale * r['mean_regret']:.2f} ({m.scale * r['mean_regret_in_budget']:.2f})"
                      if r["mean_regret"] is not None and r["mean_regret_in_budget"] is not None else "-")
            lines.append(f"| {name} | {_show(m, r[f'mean_{m.name}'], r[f'mean_{m.name}_std'])} | {groups} "
                         f"| {anchors} | {r['train_seconds']:.0f} | {r['trainable_params']:,} "
                         f"| {r['peak_rss_mb']:.0f} | {regret} | {r['lr']:g} |")
        c = bench["claims"].get(task, {})
        unit = m.diff_unit
        lines.append("")
        if "esta_minus_snnet_mean_points" in c:
            lines.append(f"- ESTA better than SN-Net by {c['esta_minus_snnet_mean_points']:+.2f} ± "
                         f"{c['esta_minus_snnet_spread']:.2f} {unit} (mean deployed {m.name}); ESTA at least as good "
                         f"in {c['groups_esta_at_least_snnet']}/{c['groups']} budgets; ESTA/SN-Net: training time "
                         f"{c['train_time_ratio']:.2f}×, trainable params {c['trainable_params_ratio']:.3f}×, "
                         f"peak RSS {c['peak_rss_ratio']:.2f}×")
        if "esta_largest_drop_points" in c:
            lines.append(f"- ESTA's deployed {m.name} is never more than {c['esta_largest_drop_points']:.2f} {unit} "
                         "worse than a cheaper deployed network's")
        for row in c.get("esta_at_anchor_budgets", []):
            if row["esta_minus_reference_points"] is not None:
                lines.append(f"- at {row['anchor']}'s cost ({axis.show(row['cost'])}): ESTA's best "
                             f"{_show(m, row['esta_best_within'])} vs {row['reference']} "
                             f"{_show(m, row['reference_value'])} ({row['esta_minus_reference_points']:+.2f} {unit})")
        for row in c.get("palette_anchor_minus_alone", []):
            lines.append(f"- anchor {row['anchor']} in ESTA's palette {_show(m, row['palette'])} vs tuned alone "
                         f"{_show(m, row['alone'])}: {row['points']:+.2f} {unit} (per seed "
                         + ", ".join(f"{v:+.2f}" for v in row["points_per_seed"]) + ")")
        for name, r in methods.items():
            for p in r.get("pairs", []):
                gap = p["most_end_gap"]
                lines.append(f"- {name} pair {p['pair']}: Spearman(cost, {m.name}) {p['spearman']:.2f} (per seed "
                             + ", ".join(f"{v:.2f}" for v in p["spearman_per_seed"]) + f"); most-end stitch "
                             f"{'-' if gap is None else f'{gap:.2f}'} {unit} behind the end anchor; "
                             f"{p['above_cheaper']:.1f} of {p['count']} stitches beat the cheaper anchor")
        if c.get("esta_in_between_share") is not None:
            lines.append(f"- budgets between the anchors' costs served by an in-between stitch that beats the cheaper "
                         f"anchor: {100 * c['esta_in_between_share']:.0f} % (ESTA)")
        if "importance_minus_uniform_points" in c:
            lines.append(f"- importance − uniform sampling: {c['importance_minus_uniform_points']:+.2f} ± "
                         f"{c['importance_minus_uniform_spread']:.2f} {unit}")
        if "per_stitch_minus_shared_bias_points" in c:
            lines.append(f"- stitch-specific − shared bias: {c['per_stitch_minus_shared_bias_points']:+.2f} ± "
                         f"{c['per_stitch_minus_shared_bias_spread']:.2f} {unit}")
        lines.append("")
    return "\n".join(lines)
