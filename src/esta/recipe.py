"""The one ESTA job, written once for every Task.

load family and data → palette → least-squares stitching layers → costs → (screening / probes) → PST → train →
select one stitch per budget → export → evaluate → results. What differs between image classification and
instruction tuning (data and splits, loss, cost axis, validation metric, evaluation, plots) is a
:class:`~esta.tasks.base.Task`; this module never looks inside one. ``run(config)`` is what ``esta train``,
``esta demo`` and ``esta lm-train`` call.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .budget import check_budgets, parse_budgets
from .calibration import CalibrationConfig
from .cost import count_costs
from .deploy import CONFIG_NAME, Choice, DeployedStitch, choose
from .errors import EstaError
from .families import MINI_FAMILY
from .files import (
    claim_for_all,
    is_main_process,
    main_log,
    read_json,
    replace_dir,
    wait_for_everyone,
    write_json,
    write_text,
)
from .importance import SamplingConfig, budget_groups
from .methods import get_method
from .palette import Palette
from .provenance import environment
from .pst import PSTConfig
from .train import TrainConfig, TrainResult, train, untrained_result

log = logging.getLogger("esta")

DEPLOY_RULES = ("importance", "loss", "validation")


@dataclass
class RecipeConfig:
    """The settings every Task shares; each Task's config adds its own (see ``esta.tasks``)."""

    anchors: list[str] = field(default_factory=lambda: [MINI_FAMILY])
    data: str = "animal-shapes"
    out_dir: str = "runs/demo"
    method: str = "esta"  # see methods.METHODS: esta, esta-uniform, esta-shared-bias, snnet, anchors-lora, ...
    kernel: int = 2
    stride: int = 1
    pairing: str = "nearest"
    two_way: bool = False
    #: "per-window": the cuts of a window share one stitching layer (SN-Net); "per-cut": one layer per cut (ours;
    #: measured in esta.space)
    stitch_layers: str = "per-cut"
    #: stitching layers with an offset per token position where the family has fixed positions (ViT; ours;
    #: measured in esta.stitching); ignored by families without fixed positions (LLMs)
    stitch_offsets: bool = True
    #: end-anchor calibration of the stitching layers after least squares (ours; steps=0: off)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    pst: PSTConfig = field(default_factory=PSTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: in the Task's cost unit (GFLOPs for images, millions of parameters for LMs) or with a unit ("300M");
    #: None: one deployment per budget group
    budgets: list[float | str] | None = None
    calibration_examples: int = 64  # examples the stitching layers' least-squares fit sees
    #: how ESTA and its ablations pick one stitch per budget (the baselines always use validation): "validation"
    #: (the Task's held-out metric), "loss" (ours, one-stage: the lowest moving-average training loss) or
    #: "importance" (the paper's one-stage rule)
    deploy_by: str = "validation"
    validation_examples: int = 500  # held out, never trained on: what "validation" looks at
    resume: bool = False  # continue the run in out_dir from its checkpoint (same settings)
    overwrite: bool = False  # replace a run already in out_dir, whole
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RecipeConfig":
        """The config a dict describes (e.g. ``run.json["config"]``); unknown keys are refused, missing ones keep
        their defaults."""
        def build(kind, values: dict, where: str, nested: dict | None = None, make=None):
            if not isinstance(values, dict):
                raise EstaError(f"config {where or 'file'}: expected a mapping, got {type(values).__name__}")
            unknown = sorted(set(values) - {f.name for f in fields(kind)})
            if unknown:
                raise EstaError(f"config {where or 'file'}: unknown settings {unknown}")
            kw = {k: (nested[k](v) if k in (nested or {}) else v) for k, v in values.items()}
            return make(kw) if make else kind(**kw)

        sampling = lambda v: build(SamplingConfig, v, "train.sampling")  # noqa: E731
        train_cfg = lambda v: build(TrainConfig, v, "train", {"sampling": sampling})  # noqa: E731
        pst = lambda v: build(PSTConfig, v, "pst", make=PSTConfig.from_dict)  # noqa: E731
        calibration = lambda v: build(CalibrationConfig, v, "calibration")  # noqa: E731
        return build(cls, d, "", {"train": train_cfg, "pst": pst, "calibration": calibration})

    @classmethod
    def from_file(cls, path: str | Path) -> "RecipeConfig":
        """A config from JSON or YAML: a run's ``run.json`` (its ``config``) replays that run."""
        return cls.from_dict(read_config_file(path)[0])

    def deploy_rule(self) -> str:
        """The baselines deploy by validation; ESTA and its ablations by ``deploy_by``."""
        method = get_method(self.method)
        return self.deploy_by if method.deploy_by == "importance" else method.deploy_by

    def check(self) -> None:
        """Everything that can be refused without loading a model or a dataset, refused here, before both."""
        get_method(self.method)
        for name, v in (("kernel", self.kernel), ("stride", self.stride),
                        ("calibration examples", self.calibration_examples)):
            if v < 1:
                raise EstaError(f"{name} must be at least 1, got {v}")
        if self.validation_examples < 0:
            raise EstaError(f"validation examples must be >= 0, got {self.validation_examples}")
        if self.deploy_by not in DEPLOY_RULES:
            raise EstaError(f"deploy_by must be one of {list(DEPLOY_RULES)}, got {self.deploy_by!r}")
        if self.deploy_rule() == "validation" and self.validation_examples < 1:
            raise EstaError(f"{self.method} deploys by validation: give --validation-examples >= 1")
        if self.budgets is not None:
            from .tasks import task_class

            parse_budgets(self.budgets, task_class(self).axis)  # refuses a malformed or non-positive budget
            if not self.budgets:
                raise EstaError("budgets: give at least one, or none for one per budget group")
        if self.stitch_layers not in ("per-window", "per-cut"):
            raise EstaError(f"stitch_layers must be 'per-window' or 'per-cut', got {self.stitch_layers!r}")
        self.calibration.check()
        self.pst.check()
        self.train.check()


def read_config_file(path: str | Path) -> tuple[dict, str | None]:
    """The settings in a JSON or YAML file, and the Task they belong to when the file says (a run's ``run.json``
    records its ``task_kind``)."""
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
        return data["config"], data.get("task_kind")  # a run.json
    return data, None


#: settings a resumed run may change: they decide what is shown, kept or deployed, not what is trained (the
#: deployment rule only chooses among the trained stitches, so a finished run can be resumed to deploy another way)
RESUMABLE_CHANGES = {"resume", "overwrite", "progress", "sweep", "validation_sweep", "eval_examples", "cache_dir",
                     "out_dir", "train.checkpoint_every", "train.num_workers", "train.log_every", "deploy_by",
                     "strict", "mc_root", "mc_tasks", "mc_examples"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_resumable(out: Path, config: RecipeConfig) -> None:
    """Refuse to resume with settings that differ from the checkpointed run's (other than RESUMABLE_CHANGES):
    the result would be neither run. Names every difference."""
    try:
        before = _flat(read_json(out / "run.json")["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EstaError(f"cannot resume: {out / 'run.json'} is missing or damaged ({e})") from e
    now = _flat(json.loads(json.dumps(config.to_dict())))  # through JSON, as run.json was written
    diff = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
            if k not in RESUMABLE_CHANGES and k in before and before.get(k) != now.get(k)]
    if diff:
        raise EstaError(f"cannot resume {out} with other settings ({'; '.join(diff)}); only "
                        f"{', '.join(sorted(RESUMABLE_CHANGES))} may change. Use --overwrite to start again")


def run(config: RecipeConfig) -> dict:
    """The whole job for the Task the config belongs to; its log also goes to ``OUT/esta.log``. Returns the
    results (``{}`` in the non-main processes of a multi-process run)."""
    from .tasks import task_class

    if config.train.lr is None:  # the method's own rate, so the Python API trains as `esta train` does
        config = replace(config, train=replace(config.train, lr=get_method(config.method).lr))
    config.check()
    # a config of no Task, or a method its Task cannot run, is refused before the output folder is touched
    task = task_class(config)(config)
    task.check_method(get_method(config.method))
    out = claim_for_all(config.out_dir, resume=config.resume, overwrite=config.overwrite)
    if config.resume and is_main_process():
        check_resumable(out, config)
    with main_log(out / "esta.log"):
        return _run(config, task, out)


def _run(config: RecipeConfig, task, out: Path) -> dict:
    method = get_method(config.method)
    deploy_by = config.deploy_rule()
    torch.manual_seed(config.train.seed)

    # 1. the family and the task's data (splits, held-out sets, new heads)
    task.load(deploy_by)

    # 2. the palette: stitching layers fitted by least squares, costs counted on the plain layers, then PST
    palette = Palette(task.anchors, kernel=config.kernel, stride=config.stride, pairing=config.pairing,
                      two_way=config.two_way, stitch_layers=config.stitch_layers,
                      stitch_offsets=config.stitch_offsets)
    task.fit_stitching(palette)
    costs = count_costs(palette, task.cost_input(), progress=config.progress)
    cost = task.axis.of(costs)
    budgets = parse_budgets(config.budgets, task.axis)
    if budgets:
        check_budgets(budgets, cost, task.axis)
    kept = task.before_pst(palette, costs)  # linear-probe heads, or screening out broken stitches
    if budgets and kept is not None:
        check_budgets(budgets, [cost[s] for s in kept], task.axis, "stitch kept by screening")
    palette.apply_pst(method.pst(config.pst))
    task.describe(palette, method)  # logged only now, after every check that can refuse the run
    main = is_main_process()  # several processes train together; only the main one writes, deploys, evaluates
    if main:
        write_json(out / "run.json", {"config": config.to_dict(), "task_kind": task.kind, **task.run_info(costs),
                                      "params": [c.params for c in costs], "space": palette.space.to_dict(),
                                      "environment": environment()})

    # 3. one training run for the whole palette (for anchors-lora: each anchor, as many steps each)
    trained = palette.space.anchor_ids() if method.anchors_only else kept
    sampling = method.sampling(config.train.sampling)
    needs_scores = deploy_by == "importance" or not sampling.uniform  # else the SNIP score is never read
    train_cfg = replace(config.train, sampling=sampling, track_importance=needs_scores,
                        score_init_batch=config.train.score_init_batch and needs_scores)
    if method.anchors_only:
        n = len(trained)
        train_cfg = replace(train_cfg, epochs=train_cfg.epochs * n,
                            steps=train_cfg.steps * n if train_cfg.steps is not None else None)
    if method.train:
        result = train(palette, task.train_set, cost, train_cfg, loss_fn=task.loss_fn, out_dir=out,
                       resume=config.resume, collate_fn=task.collate_fn, progress=config.progress, stitches=trained)
    else:
        result = untrained_result(palette, cost, train_cfg.sampling.groups, trained, train_cfg.sampling.spacing)
    if not main:
        wait_for_everyone()  # released when the main process has deployed, evaluated and written
        return {}

    # 4. deployment: one stitch per budget, merged into plain weights and saved
    t0 = time.perf_counter()
    palette.eval()
    choices, val_scores = select(deploy_by, palette, result, cost, budgets, task, config.train.sampling,
                                 config.progress)
    select_seconds = time.perf_counter() - t0
    dirs = export_choices(palette, choices, out / "deployed", task.deploy_meta(costs, result),
                          task.save_beside, task.name)
    deploy_seconds = time.perf_counter() - t0
    log.info("trained in %.0f s, deployed %d stitches in %.2f s", result.seconds, len(choices), deploy_seconds)

    # 5. the honest check and the results, written by the Task (its metrics, its plot)
    results = task.report(palette, costs, result, choices, dirs, val_scores, deploy_by,
                          {"train_seconds": result.seconds, "select_seconds": select_seconds,
                           "deploy_seconds": deploy_seconds})
    task.write(results, out)
    write_model_cards(dirs, results)
    wait_for_everyone()
    return results


def write_model_cards(dirs: list[Path], results: dict) -> None:
    """A ``README.md`` model card in each deployed folder, with the network's measured score (known only now)."""
    import shlex
    import sys

    from .hf_native import model_card

    run_info = results.get("run") or {}
    command = "esta " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("esta", "cli.py")) else None
    for folder, point in zip(dirs, run_info.get("deployed", [])):
        esta_config = read_json(Path(folder) / CONFIG_NAME, "deployment")
        write_text(Path(folder) / "README.md", model_card(esta_config, point, run_info, command))


def default_budgets(palette: Palette, costs: list[float], sampling: SamplingConfig) -> list[float]:
    """One budget per budget group (its costliest stitch) and one at each anchor's own cost: a user who would have
    deployed an anchor gets a network of exactly that cost to compare with."""
    tops = {max(costs[s] for s in g) for g in budget_groups(costs, sampling.groups, sampling.spacing)}
    return sorted(tops | {costs[s] for s in palette.space.anchor_ids()})


def select(deploy_by: str, palette: Palette, result: TrainResult, costs: list[float], budgets: list[float] | None,
           task, sampling: SamplingConfig, progress: bool = True) -> tuple[list[Choice], dict[int, float]]:
    """One stitch per budget, and the validation scores it looked at (empty unless it deploys by validation).

    Budgets: the given ones, else the Task's defaults (``Task.default_budgets``). ``importance`` (the paper's
    one-stage rule): the highest importance inside the budget's group; importance only compares stitches of
    similar cost. ``loss`` (ours, also one-stage): the lowest moving-average training loss among all trained
    stitches within the budget. ``validation``: the best score on the Task's held-out examples (accuracy, or minus
    the perplexity), among the stitches of the budget (``Task.validation_within``).
    """
    if deploy_by not in DEPLOY_RULES:
        raise EstaError(f"unknown deployment rule {deploy_by!r}; choose from {', '.join(DEPLOY_RULES)}")
    if budgets is None:
        budgets = task.default_budgets(palette, costs, sampling)
    if deploy_by == "importance":
        return choose(result.groups, costs, result.importance, budgets), {}
    if deploy_by == "loss":
        score = [-v if v is not None else -math.inf for v in result.train_loss]
        return choose(result.groups, costs, score, budgets, within="budget"), {}
    scores = task.validation_scores(palette, result.groups, progress)
    # a stitch the Task did not score (e.g. alone in its group: nothing to choose among) ranks last
    ranked = [scores.get(s, -math.inf) for s in range(len(palette))]
    return choose(result.groups, costs, ranked, budgets, within=task.validation_within), scores


def export_choices(palette: Palette, choices: list[Choice], out: Path, meta: Callable[[Choice], dict[str, Any]],
                   save_beside: Callable[[Path], None] | None = None, task_name: str | None = None) -> list[Path]:
    """Save each chosen stitch standalone as ``out/budgetKK`` (cheapest budget first), with ``out/manifest.json``
    listing exactly those folders. The whole deployment is written beside ``out`` and then replaces it, so a
    deployment folder never mixes two deployments (no stale ``budgetKK`` from an earlier one) and a crash leaves
    the previous one whole. ``meta(choice)``: what the Task records in each folder (budget, cost, classes...);
    ``save_beside(folder)``: files the Task adds (a tokenizer)."""
    import shutil

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    entries = []
    for k, c in enumerate(choices):
        info = meta(c)
        folder = DeployedStitch.from_palette(palette, c.stitch_id, meta=info).save_pretrained(tmp / f"budget{k:02d}")
        if save_beside is not None:
            save_beside(folder)
        entries.append({"folder": f"budget{k:02d}", "stitch_id": c.stitch_id, "name": palette.space[c.stitch_id].name,
                        **{key: info[key] for key in ("budget_flops", "budget_params", "flops", "params")
                           if key in info}})
    write_json(tmp / "manifest.json", {"task": task_name, "deployed": entries})
    replace_dir(tmp, out)
    return [out / e["folder"] for e in entries]


def compare_alone(results: dict, config: RecipeConfig, methods: list[str]) -> list[dict]:
    """Run reference ``methods`` (e.g. ``anchors-lora``: each anchor tuned alone for as many steps as the palette
    got) on the same data, seed and schedule, into ``OUT/references/<method>``; add their anchors' scores to
    ``results["references"]`` and write the run's results and plot again, so the palette is always read beside what
    a user would get without it."""
    from .results import RunResults
    from .tasks import task_class

    task = task_class(config)(config)
    out = Path(config.out_dir)
    for name in methods:
        if not get_method(name).anchors_only:
            raise EstaError(f"--compare takes methods that tune anchors alone (anchors-lora, linear-probe), "
                            f"not {name!r}")
        ref = RunResults.from_json(run(replace(config, method=name, out_dir=str(out / "references" / name),
                                               budgets=None, resume=False, overwrite=True,
                                               **task.reference_overrides)))
        results["references"] = [r for r in results.get("references", []) if r["method"] != name] + [
            {"method": name, "name": a.name, task.axis.key: a.cost, task.metric.name: a.value, "steps": a.updates}
            for a in ref.anchors if a.value is not None]
    task.write(results, out)
    return results["references"]
