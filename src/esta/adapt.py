"""The whole job for a vision family: adapt every stitch to a task in one run, deploy one per budget, report.

``adapt(AdaptConfig(...))`` is what ``esta train`` and ``esta demo`` run: load the task and the family, build the
palette, fit the stitching layers by least squares, count every stitch's cost, apply PST, train, pick per budget
by importance, save the chosen stitches standalone, and (unless switched off) evaluate every stitch so the choice
can be judged.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from .cost import count_costs
from .data import (
    TensorImageDataset,
    default_cache_dir,
    load_image_task,
    stratified_split,
)
from .deploy import Choice, DeployedStitch, check_budgets, choose
from .errors import EstaError
from .evaluate import accuracy, largest_drop, spearman, sweep
from .families import MINI_FAMILY, anchor_names, load_family
from .files import (
    claim_for_all,
    is_main_process,
    main_log,
    replace_dir,
    wait_for_everyone,
    write_json,
)
from .importance import SamplingConfig, budget_groups
from .methods import get_method
from .palette import Palette
from .probe import probe_head
from .provenance import environment
from .pst import PSTConfig
from .report import pareto_plot, write_results
from .train import TrainConfig, TrainResult, train, untrained_result

log = logging.getLogger("esta")


@dataclass
class AdaptConfig:
    anchors: list[str] = field(default_factory=lambda: [MINI_FAMILY])
    data: str = "animal-shapes"
    out_dir: str = "runs/demo"
    method: str = "esta"  # see methods.METHODS: esta, esta-uniform, esta-shared-bias, snnet, anchors-lora
    kernel: int = 2
    stride: int = 1
    pairing: str = "nearest"
    two_way: bool = False
    pst: PSTConfig = field(default_factory=PSTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budgets: list[float] | None = None  # GFLOPs; None: one deployment per budget group
    calibration_examples: int = 64
    #: the [CLS] token's share of the least-squares fit of the stitching layers (0: all tokens equal, SN-Net's fit)
    stitch_cls_weight: float = 0.5
    eval_examples: int | None = 2000  # stratified subset of the test split for every accuracy; None = all
    #: held out from the test split before the evaluation subset is drawn, so the two never overlap; only methods
    #: that choose by validation (SN-Net's sweep, anchors-lora) look at it. Capped at a quarter of the test split.
    validation_examples: int = 500
    #: how every new task head starts: "probe" (ours: a linear probe of its anchor's frozen features on the
    #: training set) or "random" (trunc-normal, as ViT); the same for every method, so they stay comparable
    head_init: str = "probe"
    #: how ESTA and its ablations pick one stitch per budget (see ``select``); the baselines always use validation.
    #: "validation" (default): the best validation accuracy within the budget, a forward of each trained stitch
    #: over the validation images (66 s for the demo's 71 stitches and 500 images); it sees what a training signal
    #: cannot, e.g. a larger anchor that fits its training data better but transfers worse (B on animal-shapes).
    #: "loss" (ours, one-stage): the lowest moving-average training loss; "importance": the paper's one-stage rule
    deploy_by: str = "validation"
    validation_sweep: bool = False  # also record every stitch's validation accuracy (to study deployment rules)
    strict: bool = False  # a class missing from a split is an error instead of a warning
    probe_examples: int = 5000  # training examples the probes are fitted on (a stratified subset beyond that)
    sweep: bool = True  # evaluate every stitch (the honest check of the choice; SN-Net's way to choose)
    train_examples: int | str | None = "default"
    cache_dir: str | None = None
    resume: bool = False  # continue the run in out_dir from its checkpoint (same settings)
    overwrite: bool = False  # replace a run already in out_dir, whole
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdaptConfig":
        """The config a dict describes (e.g. ``run.json["config"]``); unknown keys are refused, missing ones keep
        their defaults."""
        def build(kind, values: dict, where: str, nested: dict | None = None, make=None):
            if not isinstance(values, dict):
                raise EstaError(f"config {where or 'file'}: expected a mapping, got {type(values).__name__}")
            names = {f.name for f in fields(kind)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise EstaError(f"config {where or 'file'}: unknown settings {unknown}")
            kw = dict(values)
            for name, sub in (nested or {}).items():
                if name in kw:
                    kw[name] = sub(kw[name])
            return make(kw) if make else kind(**kw)

        sampling = lambda v: build(SamplingConfig, v, "train.sampling")  # noqa: E731
        train_cfg = lambda v: build(TrainConfig, v, "train", {"sampling": sampling})  # noqa: E731
        pst = lambda v: build(PSTConfig, v, "pst", make=PSTConfig.from_dict)  # noqa: E731
        return build(cls, d, "", {"train": train_cfg, "pst": pst})

    @classmethod
    def from_file(cls, path: str | Path) -> "AdaptConfig":
        """A config from JSON or YAML: a run's ``run.json`` (its ``config``) replays that run."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise EstaError(f"cannot read config {path}: {e}") from e
        except Exception as e:  # yaml.YAMLError (yaml is imported only for YAML files)
            raise EstaError(f"cannot read config {path}: {' '.join(str(e).split())}") from e
        if isinstance(data, dict) and isinstance(data.get("config"), dict) and "space" in data:
            data = data["config"]  # a run.json
        return cls.from_dict(data)

    def deploy_rule(self) -> str:
        """The baselines deploy by validation; ESTA and its ablations by ``deploy_by`` (importance: the paper's)."""
        method = get_method(self.method)
        return self.deploy_by if method.deploy_by == "importance" else method.deploy_by

    def check(self) -> None:
        """Everything that can be refused without loading a model or a dataset, refused here, before both."""
        get_method(self.method)
        for name, v in (("kernel", self.kernel), ("stride", self.stride),
                        ("calibration examples", self.calibration_examples),
                        ("probe examples", self.probe_examples)):
            if v < 1:
                raise EstaError(f"{name} must be at least 1, got {v}")
        if self.eval_examples is not None and self.eval_examples < 1:
            raise EstaError(f"evaluation examples must be at least 1 (or all), got {self.eval_examples}")
        if not 0 <= self.stitch_cls_weight < 1:
            raise EstaError(f"stitch_cls_weight must be in [0, 1), got {self.stitch_cls_weight}")
        if self.validation_examples < 0:
            raise EstaError(f"validation examples must be >= 0, got {self.validation_examples}")
        if self.head_init not in ("probe", "random"):
            raise EstaError(f"head_init must be 'probe' or 'random', got {self.head_init!r}")
        if self.deploy_by not in DEPLOY_RULES:
            raise EstaError(f"deploy_by must be one of {list(DEPLOY_RULES)}, got {self.deploy_by!r}")
        if self.deploy_rule() == "validation" and self.validation_examples < 1:
            raise EstaError(f"{self.method} deploys by validation accuracy: give --validation-examples >= 1")
        if self.budgets is not None:
            bad = [b for b in self.budgets if not (math.isfinite(b) and b > 0)]
            if bad or not self.budgets:
                raise EstaError(f"budgets must be positive numbers of GFLOPs, got {self.budgets}")
        self.pst.check()
        self.train.check()


#: settings a resumed run may change: they decide what is shown, kept or deployed, not what is trained (the
#: deployment rule only chooses among the trained stitches, so a finished run can be resumed to deploy another way)
RESUMABLE_CHANGES = {"resume", "overwrite", "progress", "sweep", "validation_sweep", "eval_examples", "cache_dir",
                     "out_dir", "train.checkpoint_every", "train.num_workers", "train.log_every", "deploy_by",
                     "strict"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_resumable(out: Path, config: AdaptConfig) -> None:
    """Refuse to resume with settings that differ from the checkpointed run's (other than RESUMABLE_CHANGES):
    the result would be neither run. Names every difference."""
    try:
        before = _flat(json.loads((out / "run.json").read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EstaError(f"cannot resume: {out / 'run.json'} is missing or damaged ({e})") from e
    now = _flat(json.loads(json.dumps(config.to_dict())))  # through JSON, as run.json was written
    diff = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
            if k not in RESUMABLE_CHANGES and k in before and before.get(k) != now.get(k)]
    if diff:
        raise EstaError(f"cannot resume {out} with other settings ({'; '.join(diff)}); only "
                        f"{', '.join(sorted(RESUMABLE_CHANGES))} may change. Use --overwrite to start again")


def warn_missing_classes(task, strict: bool = False) -> None:
    """Tell, don't guess: a class absent from a split makes its accuracy an average over the other classes (an
    error with ``strict``)."""
    for split, data in (("train", task.train), ("test", task.test)):
        present = {int(y) for y in torch.as_tensor(data.labels).tolist()}
        missing = [c for k, c in enumerate(task.classes) if k not in present]
        if missing:
            msg = (f"task {task.name}: {len(missing)} of {len(task.classes)} classes have no {split} examples "
                   f"({', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''})")
            if strict:
                raise EstaError(msg + " (--strict)")
            log.warning(msg)


def materialize(dataset, indices) -> TensorImageDataset:
    """The examples at ``indices`` as in-memory tensors (decoded once, however the source stores them)."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.subset(indices)
    items = [dataset[int(i)] for i in indices]
    if not items:  # e.g. no validation images held out of a tiny test split
        x0, _ = dataset[0]
        return TensorImageDataset(torch.empty((0, *x0.shape), dtype=x0.dtype), torch.empty(0, dtype=torch.long))
    return TensorImageDataset(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))


def adapt(config: AdaptConfig) -> dict:
    """The whole job; its log also goes to ``OUT/esta.log``."""
    config.check()
    out = claim_for_all(config.out_dir, resume=config.resume, overwrite=config.overwrite)
    if config.resume and is_main_process():
        check_resumable(out, config)
    with main_log(out / "esta.log"):
        return _adapt(config, out)


def _adapt(config: AdaptConfig, out: Path) -> dict:
    method = get_method(config.method)
    deploy_by = config.deploy_rule()
    seed = config.train.seed
    torch.manual_seed(seed)

    # 1. the family and the task, converted to the family's image size and channels
    anchors = load_family(config.anchors, num_labels=1)  # checked before any data is fetched; heads set below
    task = load_image_task(config.data, image_size=anchors[0].image_size, num_channels=anchors[0].num_channels,
                           cache_dir=config.cache_dir, train_examples=config.train_examples, seed=seed)
    if len(task.train) == 0 or len(task.test) == 0:
        raise EstaError(f"task {config.data!r} has an empty train or test split")
    warn_missing_classes(task, config.strict)
    torch.manual_seed(seed)
    for a in anchors:
        a.new_task_head(len(task.classes))
    head_init = "probe" if not method.train else config.head_init  # a linear probe is the whole of that method
    val_set, eval_set = held_out_sets(task.test, config.validation_examples, config.eval_examples, seed)
    if len(val_set) == 0 and deploy_by == "validation":
        raise EstaError(f"the test split of {task.name} has {len(task.test)} examples: too few to hold out a "
                        f"validation set (a quarter of it) for deploying by validation accuracy")

    # 2. the palette: stitching layers fitted by least squares, costs counted on the plain layers, then PST
    palette = Palette(anchors, kernel=config.kernel, stride=config.stride, pairing=config.pairing,
                      two_way=config.two_way)
    calib_n = min(config.calibration_examples, len(task.train))
    calib = materialize(task.train, stratified_split(task.train.labels, calib_n, seed + 7)[0]
                        if calib_n < len(task.train) else range(calib_n))
    palette.init_stitching(calib.images, summary_weight=config.stitch_cls_weight)
    costs = count_costs(palette, calib.images[:1], progress=config.progress)
    flops = [float(c.flops) for c in costs]
    if config.budgets:
        check_budgets([b * 1e9 for b in config.budgets], flops, unit=1e9, name=" GFLOPs")
    # the heads start as linear probes only now, after every check that can refuse the run (they log a line each)
    probe_cache = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    probes = probe_heads(anchors, task, config.probe_examples, seed, probe_cache / "probes") \
        if head_init == "probe" else []
    if probes and config.sweep:  # each probe alone on the evaluation set: the cheapest thing a user would try
        for a, p in zip(anchors, probes):
            was_training = a.training
            p["accuracy"] = accuracy(a.eval(), eval_set)
            a.train(was_training)
    palette.apply_pst(method.pst(config.pst))
    # logged only now, after every check that can refuse the run, so a refusal is the only thing printed
    log.info("task %s: %d classes, %d training examples, %d test examples (evaluating on %d, %d held out for "
             "validation); method %s", task.name, len(task.classes), len(task.train), len(task.test),
             len(eval_set), len(val_set), method.name)
    log.info("palette: %d stitches (%d anchors), %d stitching layers; trainable %d of %d parameters",
             len(palette), len(anchors), len(palette.stitching), palette.trainable_parameters(),
             palette.total_parameters())
    main = is_main_process()  # several processes train together; only the main one writes, deploys, evaluates
    if main:
        write_json(out / "run.json", {
            "config": config.to_dict(), "classes": task.classes, "task": task.name,
            "flops": [c.flops for c in costs], "params": [c.params for c in costs],
            "space": palette.space.to_dict(), "environment": environment()})

    # 3. one training run for the whole palette (for anchors-lora: each anchor, as many steps each)
    trained = palette.space.anchor_ids() if method.anchors_only else None
    sampling = method.sampling(config.train.sampling)
    needs_scores = deploy_by == "importance" or not sampling.uniform  # else the SNIP score is never read
    train_cfg = replace(config.train, sampling=sampling, track_importance=needs_scores,
                        score_init_batch=config.train.score_init_batch and needs_scores)
    if trained is not None:
        train_cfg = replace(train_cfg, epochs=train_cfg.epochs * len(trained),
                            steps=train_cfg.steps * len(trained) if train_cfg.steps is not None else None)
    if method.train:
        result = train(palette, task.train, flops, train_cfg, out_dir=out, resume=config.resume,
                       progress=config.progress, stitches=trained)
    else:
        result = untrained_result(palette, flops, train_cfg.sampling.groups, trained, train_cfg.sampling.spacing)
    if not main:
        wait_for_everyone()  # released when the main process has deployed, evaluated and written
        return {}

    # 4. deployment: ESTA reads the importance scores; SN-Net sweeps the candidates on held-out data
    t0 = time.perf_counter()
    palette.eval()
    budgets = [b * 1e9 for b in config.budgets] if config.budgets else None
    choices, val_sweep = select(deploy_by, palette, result, flops, budgets, val_set, config.train.sampling,
                                config.progress)
    select_seconds = time.perf_counter() - t0
    deployed_dirs = export_choices(palette, choices, flops, [c.params for c in costs], result.importance,
                                   task.name, task.classes, out / "deployed")
    deploy_seconds = time.perf_counter() - t0
    log.info("trained in %.0f s, deployed %d stitches in %.2f s", result.seconds, len(choices), deploy_seconds)

    # 5. the honest check: every stitch's accuracy, and every deployed model reloaded from disk
    t0 = time.perf_counter()
    sweep_acc = sweep(palette, eval_set, stitches=trained, progress=config.progress) if config.sweep else {}
    sweep_seconds = time.perf_counter() - t0
    deployed_acc = [accuracy(DeployedStitch.from_pretrained(d), eval_set) for d in deployed_dirs]
    # held-out accuracy of the chosen stitches: what a learning-rate sweep may look at (never the evaluation set)
    val_acc = [accuracy(lambda x, s=c.stitch_id: palette(x, stitch=s), val_set) for c in choices] if len(val_set) \
        else [None] * len(choices)

    if config.validation_sweep and not val_sweep and len(val_set):  # for studying the deployment rules
        val_sweep = sweep(palette, val_set, stitches=sorted(s for g in result.groups for s in g),
                          progress=config.progress)
    results = _results(config, task, palette, costs, result, choices, sweep_acc, deployed_acc, deployed_dirs,
                       len(eval_set), val_sweep, deploy_by)
    for d, v in zip(results["deployed"], val_acc):
        d["validation_accuracy"] = v
    results["summary"]["mean_validation_accuracy"] = (sum(val_acc) / len(val_acc)) if val_acc and len(val_set) \
        else None
    results["validation_examples"] = len(val_set)
    results["head_init"] = {"mode": head_init, "probes": probes}
    results["timing"] = {"train_seconds": result.seconds, "select_seconds": select_seconds,
                         "deploy_seconds": deploy_seconds, "sweep_seconds": sweep_seconds}
    names = anchor_names([a.source for a in palette.anchors])
    results["references"] = [{"method": "linear-probe", "name": n, "flops": costs[s].flops, "accuracy": p["accuracy"],
                              "steps": 0} for n, s, p in zip(names, palette.space.anchor_ids(), probes)
                             if p.get("accuracy") is not None] if method.train else []
    write_report(results, out, plot=config.sweep)
    wait_for_everyone()
    return results


def write_report(results: dict, out: Path, plot: bool) -> None:
    """results.json / results.csv, and the Pareto plot when every stitch was evaluated."""
    write_results(results, out)
    if plot:
        pareto_plot(results, out / "pareto.png",
                    title=f"{results['method']} on {results['task']}: {len(results['stitches'])} stitches")


def compare_alone(results: dict, config: AdaptConfig, methods: list[str]) -> list[dict]:
    """Run reference ``methods`` (e.g. ``anchors-lora``: each anchor tuned alone for as many steps as the palette
    got) on the same data, seed and schedule, into ``OUT/references/<method>``; add their anchors' accuracies to
    ``results["references"]`` and redraw the run's plot, so the palette is always read beside what a user would
    get without it."""
    out = Path(config.out_dir)
    for name in methods:
        m = get_method(name)
        if not m.anchors_only:
            raise EstaError(f"--compare takes methods that tune anchors alone (anchors-lora, linear-probe), "
                            f"not {name!r}")
        ref = adapt(replace(config, method=name, out_dir=str(out / "references" / name), budgets=None,
                            validation_sweep=False, resume=False, overwrite=True))  # part of this run
        results["references"] = [r for r in results.get("references", []) if r["method"] != name] + [
            {"method": name, "name": a["name"], "flops": a["flops"], "accuracy": a["accuracy"],
             "steps": a["updates"]} for a in ref["anchors_in_palette"] if a["accuracy"] is not None]
    write_report(results, out, plot=config.sweep)
    return results["references"]


def probe_heads(anchors, task, max_examples: int, seed: int, cache_dir: Path | None = None) -> list[dict]:
    """Fit every anchor's new head as a linear probe of its frozen features (see ``probe``; reused from
    ``cache_dir`` when the same anchor was probed on the same examples before)."""
    n = min(max_examples, len(task.train))
    idx = stratified_split(task.train.labels, n, seed + 13)[0] if n < len(task.train) else range(n)
    data = materialize(task.train, idx)
    out = []
    for a in anchors:
        r = probe_head(a, data.images, data.labels, len(task.classes), seed=seed, cache_dir=cache_dir)
        out.append({"anchor": a.source, "l2": r.l2, "train_accuracy": r.train_accuracy,
                    "cv_accuracy": r.cv_accuracy})
    return out


def held_out_sets(test, validation_examples: int, eval_examples: int | None, seed: int):
    """A stratified validation subset of the test split, and the evaluation subset drawn from the rest."""
    labels = torch.as_tensor(test.labels)
    n_val = min(max(validation_examples, 0), len(labels) // 4)
    val_idx, rest = stratified_split(labels, n_val, seed + 11) if n_val else ([], list(range(len(labels))))
    n_eval = len(rest) if not eval_examples else min(eval_examples, len(rest))
    pick = stratified_split(labels[torch.as_tensor(rest)], n_eval, seed)[0] if n_eval < len(rest) else range(n_eval)
    return materialize(test, val_idx), materialize(test, [int(rest[i]) for i in pick])


DEPLOY_RULES = ("importance", "loss", "validation")


def default_budgets(palette: Palette, costs: list[float], sampling: SamplingConfig) -> list[float]:
    """One budget per budget group (its costliest stitch) and one at each anchor's own cost: a user who would have
    deployed an anchor gets a network of exactly that cost to compare with."""
    tops = {max(costs[s] for s in g) for g in budget_groups(costs, sampling.groups, sampling.spacing)}
    return sorted(tops | {costs[s] for s in palette.space.anchor_ids()})


def select(deploy_by: str, palette: Palette, result: TrainResult, flops: list[float], budgets: list[float] | None,
           val_set, sampling: SamplingConfig, progress: bool = True) -> tuple[list[Choice], dict[int, float]]:
    """One stitch per budget (default: one budget per group of the whole palette, so every method answers the same
    budgets), and the validation accuracies it looked at (empty unless it deploys by validation).

    ``importance`` (the paper's one-stage rule): the highest importance inside the budget's group; importance only
    compares stitches of similar cost. ``loss`` (ours, also one-stage): the lowest moving-average training loss
    among all trained stitches within the budget. ``validation`` (SN-Net's sweep): the best accuracy on held-out
    examples among all trained stitches within the budget.
    """
    if deploy_by not in DEPLOY_RULES:
        raise EstaError(f"unknown deployment rule {deploy_by!r}; choose from {', '.join(DEPLOY_RULES)}")
    if budgets is None:
        budgets = default_budgets(palette, flops, sampling)
    if deploy_by == "importance":
        return choose(result.groups, flops, result.importance, budgets), {}
    if deploy_by == "loss":
        score = [-v if v is not None else -math.inf for v in result.train_loss]
        return choose(result.groups, flops, score, budgets, within="budget"), {}
    if len(val_set) == 0:
        raise EstaError("deploying by validation accuracy needs held-out examples (validation_examples=0, or a "
                        "test split under 4 examples)")
    trained = sorted(s for g in result.groups for s in g)
    val_acc = sweep(palette, val_set, stitches=trained, progress=progress)
    return choose(result.groups, flops, val_acc, budgets, within="budget"), val_acc


def _results(config: AdaptConfig, task, palette: Palette, costs, result: TrainResult, choices: list[Choice],
             sweep_acc: dict[int, float], deployed_acc: list[float], deployed_dirs: list[Path],
             n_eval: int, val_sweep: dict[int, float], deploy_by: str) -> dict:
    group_of = {s: g for g, members in enumerate(result.groups) for s in members}
    chosen = {c.stitch_id for c in choices}
    stitches = []
    for s in palette.space.stitches:
        stitches.append({
            "id": s.id, "name": s.name, "is_anchor": s.is_anchor, "front": s.front, "end": s.end,
            "front_last": s.front_last, "end_first": s.end_first, "layer": s.layer,
            "flops": costs[s.id].flops, "params": costs[s.id].params,
            "accuracy": sweep_acc.get(s.id), "importance": result.importance[s.id],
            "updates": result.updates[s.id], "group": group_of.get(s.id), "deployed": s.id in chosen,
            "train_loss": result.train_loss[s.id] if result.train_loss else None,
            "validation_accuracy": val_sweep.get(s.id),
        })
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
    anchor_acc = {f"anchor{s.front}": sweep_acc.get(s.id) for s in palette.space.stitches if s.is_anchor}
    names = anchor_names([a.source for a in palette.anchors])
    anchors = [{"name": names[s.front], "source": palette.anchors[s.front].source, "stitch_id": s.id,
                "flops": costs[s.id].flops, "params": costs[s.id].params, "accuracy": sweep_acc.get(s.id),
                "updates": result.updates[s.id]}
               for s in palette.space.stitches if s.is_anchor]
    return {
        "method": config.method, "task": task.name, "classes": task.classes, "anchors": [a.source for a in palette.anchors],
        "eval_examples": n_eval, "train_examples": len(task.train),
        "space": {k: v for k, v in palette.space.to_dict().items() if k != "stitches"},
        "stitches": stitches,
        "deployed": deployed,
        "anchors_in_palette": anchors,
        "summary": {
            "spearman_budget_accuracy": spearman([d["budget"] for d in deployed], accs),
            "mean_deployed_accuracy": sum(accs) / len(accs) if accs else None,
            "group_accuracy": accs,
            "mean_regret": (sum(d["regret"] for d in deployed) / len(deployed)) if sweep_acc and deployed else None,
            "mean_regret_in_budget": (sum(d["regret_in_budget"] for d in deployed) / len(deployed))
            if sweep_acc and deployed else None,
            "largest_drop": largest_drop([d["accuracy"] for d in sorted(deployed, key=lambda d: d["budget"])]),
            "anchor_accuracy": anchor_acc,
        },
        "deploy_by": deploy_by,
        "train": {"seconds": result.seconds, "steps": result.steps, "trainable_params": result.trainable_params,
                  "total_params": result.total_params, "peak_rss_mb": result.peak_rss_mb,
                  "train_rss_increase_mb": result.train_rss_increase_mb,
                  "final_loss": result.final_loss},
        "config": config.to_dict(),
    }


def export_choices(palette: Palette, choices: list[Choice], flops: list[float], params: list[int],
                   importance: list[float], task: str, classes: list[str], out: Path) -> list[Path]:
    """Save each chosen stitch standalone as ``out/budgetKK`` (cheapest budget first), with ``out/manifest.json``
    listing exactly those folders. The whole deployment is written beside ``out`` and then replaces it, so a
    deployment folder never mixes two deployments (no stale ``budgetKK`` from an earlier one) and a crash leaves
    the previous one whole."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    entries = []
    for k, c in enumerate(choices):
        model = DeployedStitch.from_palette(palette, c.stitch_id, meta={
            "budget_flops": c.budget, "flops": flops[c.stitch_id], "params": params[c.stitch_id],
            "importance": importance[c.stitch_id], "task": task, "classes": classes})
        model.save_pretrained(tmp / f"budget{k:02d}")
        entries.append({"folder": f"budget{k:02d}", "budget_flops": c.budget, "stitch_id": c.stitch_id,
                        "name": palette.space[c.stitch_id].name, "flops": flops[c.stitch_id],
                        "params": params[c.stitch_id]})
    write_json(tmp / "manifest.json", {"task": task, "deployed": entries})
    replace_dir(tmp, out)
    return [out / e["folder"] for e in entries]
