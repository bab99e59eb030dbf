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
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from .budget import check_budgets, parse_budgets
from .config import RecipeConfig, read_config_file  # noqa: F401 - re-exported for existing imports
from .cost import count_costs
from .deploy import CONFIG_NAME, DeployedStitch
from .errors import EstaError
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
from .methods import get_method
from .palette import Palette
from .provenance import environment
from .selection import DEPLOY_RULES, Choice, default_budgets, select  # noqa: F401 - re-exported
from .train import train, untrained_result

log = logging.getLogger("esta")

#: settings a resumed run may change: they decide what is shown, kept or deployed, not what is trained (the
#: deployment rule and the budgets only choose among the trained stitches, so a finished run can be resumed to deploy
#: another way or at other budgets)
RESUMABLE_CHANGES = {"resume", "overwrite", "progress", "sweep", "validation_sweep", "eval_examples", "cache_dir",
                     "out_dir", "train.checkpoint_every", "train.num_workers", "train.log_every", "deploy_by",
                     "strict", "mc_root", "mc_tasks", "mc_examples", "budgets"}


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
    run = read_json(out / "run.json")  # missing or not JSON: one line naming the file
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise EstaError(f"cannot resume: {out / 'run.json'} is damaged (no config in it)")
    before = _flat(run["config"])
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
    palette = Palette.from_config(task.anchors, config)
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

    from .report import model_card

    run_info = results.get("run") or {}
    command = "esta " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("esta", "cli.py")) else None
    for folder, point in zip(dirs, run_info.get("deployed", [])):
        esta_config = read_json(Path(folder) / CONFIG_NAME, "deployment")
        write_text(Path(folder) / "README.md", model_card(esta_config, point, run_info, command))


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
