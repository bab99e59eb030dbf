"""A finished run, after training: load its palette, deploy it again for other budgets, or save it whole.

Everything here reads a run folder (``run.json`` and ``checkpoint/``); nothing trains or evaluates.
"""

from __future__ import annotations

import json
from pathlib import Path

from .adapt import export_choices, select
from .checkpoint import load_adaptation, load_sampler_state
from .deploy import check_budgets
from .errors import EstaError
from .evaluate import largest_drop, spearman
from .families import load_family
from .files import write_json
from .importance import SamplingConfig
from .methods import get_method
from .palette import Palette
from .pst import PSTConfig
from .train import TrainResult, candidate_groups


def load_run(run_dir: str | Path) -> tuple[Palette, dict]:
    """The trained palette of a finished (or checkpointed) run, and its run.json."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise EstaError(f"{run_dir} is not an esta run folder (no run.json)")
    info = json.loads((run_dir / "run.json").read_text())
    cfg = info["config"]
    if "classes" not in info:
        raise EstaError(f"{run_dir} is a language-model run (esta lm-train): it deploys its own budgets at the end "
                        f"of training; esta deploy redeploys image runs only")
    anchors = load_family(cfg["anchors"], num_labels=len(info["classes"]))
    palette = Palette(anchors, kernel=cfg["kernel"], stride=cfg["stride"], pairing=cfg["pairing"],
                      two_way=cfg["two_way"])
    pst = cfg["pst"]
    method = get_method(cfg.get("method", "esta"))
    palette.apply_pst(method.pst(PSTConfig.from_dict(pst)))
    meta = load_adaptation(run_dir / "checkpoint", palette)
    info["step"], info["total_steps"] = meta["step"], meta.get("total_steps", meta["step"])
    sampler = load_sampler_state(run_dir / "checkpoint")
    info["importance"] = [float(v) for v in sampler["importance"]]
    info["updates"] = [int(v) for v in sampler["updates"]]
    if "train_loss" in sampler:
        info["train_loss"] = [float(v) if n else None for v, n in zip(sampler["train_loss"], info["updates"])]
    return palette.eval(), info


def redeploy(run_dir: str | Path, budgets: list[float] | None, out_dir: str | Path | None = None,
             allow_unfinished: bool = False) -> list[dict]:
    """Deploy again from a finished run, e.g. for other budgets (GFLOPs): no retraining, no evaluation sweep.
    The deployment folder is replaced whole (see ``export_choices``). A run whose checkpoint is short of its last
    step is refused unless ``allow_unfinished``."""
    palette, info = load_run(run_dir)
    if info["step"] < info["total_steps"] and not allow_unfinished:
        raise EstaError(f"{run_dir} is unfinished (checkpoint at step {info['step']} of {info['total_steps']}): "
                        f"finish it with esta train --resume, or deploy it as it is with --allow-unfinished")
    method = get_method(info["config"].get("method", "esta"))
    deploy_by = info["config"].get("deploy_by", "importance") if method.deploy_by == "importance" else "validation"
    if deploy_by == "loss" and "train_loss" not in info:
        raise EstaError(f"{run_dir}'s checkpoint has no training-loss averages to deploy by")
    flops = [float(f) for f in info["flops"]]
    # runs written before log spacing existed grouped linearly: the same groups and default budgets as then
    sampling = SamplingConfig(**{"spacing": "linear", **info["config"]["train"]["sampling"]})
    if budgets:
        check_budgets([b * 1e9 for b in budgets], flops, unit=1e9, name=" GFLOPs")
    trained = palette.space.anchor_ids() if method.anchors_only else None
    result = TrainResult(steps=0, seconds=0.0, trainable_params=0, total_params=0, peak_rss_mb=0.0,
                         train_rss_increase_mb=0.0, final_loss=float("nan"), importance=info["importance"],
                         updates=info["updates"], train_loss=info.get("train_loss", []),
                         groups=candidate_groups(flops, sampling.groups, trained or list(range(len(flops))),
                                                 sampling.spacing))
    val_set = _validation_set(palette, info["config"]) if deploy_by == "validation" else []
    choices, _ = select(deploy_by, palette, result, flops, [b * 1e9 for b in budgets] if budgets else None, val_set,
                        sampling, progress=False)
    paths = export_choices(palette, choices, flops, info["params"], info["importance"], info["task"],
                           info["classes"], Path(out_dir) if out_dir else Path(run_dir) / "deployed")
    rows = [{"budget": c.budget, "stitch_id": c.stitch_id, "name": palette.space[c.stitch_id].name,
             "flops": flops[c.stitch_id], "path": str(p)} for c, p in zip(choices, paths)]
    if out_dir is None:
        _record_redeployment(Path(run_dir), rows)
    return rows


def _validation_set(palette: Palette, cfg: dict):
    """The run's own validation images (the same held-out draw as in training), for deploying by validation."""
    from .adapt import held_out_sets
    from .data import load_image_task

    front, seed = palette.anchors[0], cfg["train"]["seed"]
    task = load_image_task(cfg["data"], image_size=front.image_size, num_channels=front.num_channels,
                           cache_dir=cfg.get("cache_dir"), train_examples=cfg.get("train_examples", "default"),
                           seed=seed)
    val_set, _ = held_out_sets(task.test, cfg.get("validation_examples", 500), cfg.get("eval_examples"), seed)
    if len(val_set) == 0:
        raise EstaError(f"the run's data {cfg['data']!r} has no validation images to deploy by")
    return val_set


def _record_redeployment(run_dir: Path, rows: list[dict]) -> None:
    """The run's results.json describes what RUN/deployed now holds: each new pick with the accuracy the run's
    sweep measured for that stitch (a deployed stitch computes what it computed in the palette), and the summary
    recomputed; the training-time deployment is kept under ``deployed_at_training``."""
    path = run_dir / "results.json"
    if not path.is_file():
        return
    results = json.loads(path.read_text())
    measured = {s["id"]: s.get("accuracy") for s in results.get("stitches", [])}
    results.setdefault("deployed_at_training", results.get("deployed"))
    results["deployed"] = [{**r, "accuracy": measured.get(r["stitch_id"]), "redeployed": True} for r in rows]
    accs = [d["accuracy"] for d in results["deployed"]]
    known = [a for a in accs if a is not None]
    summary = results.setdefault("summary", {})
    summary.update({
        "mean_deployed_accuracy": sum(known) / len(known) if known else None, "group_accuracy": accs,
        "spearman_budget_accuracy": spearman([r["budget"] for r in rows], accs) if None not in accs else None,
        "largest_drop": largest_drop(accs), "mean_regret": None, "mean_regret_in_budget": None})
    write_json(path, results)


def save_run_palette(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """``esta deploy --palette``: the whole trained palette of a run as one artifact (see ``serving``), with every
    stitch's cost and, where the run's sweep measured it, its accuracy."""
    from .serving import save_palette

    run_dir = Path(run_dir)
    palette, info = load_run(run_dir)
    if info["step"] < info["total_steps"]:
        raise EstaError(f"{run_dir} is unfinished (checkpoint at step {info['step']} of {info['total_steps']})")
    accuracy = {}
    if (run_dir / "results.json").is_file():
        results = json.loads((run_dir / "results.json").read_text())
        accuracy = {s["id"]: s.get("accuracy") for s in results.get("stitches", [])}
    cfg = info["config"]
    rows = [{"flops": float(f), "params": int(p), "accuracy": accuracy.get(i), "updates": info["updates"][i]}
            for i, (f, p) in enumerate(zip(info["flops"], info["params"]))]
    space_args = {k: cfg[k] for k in ("kernel", "stride", "pairing", "two_way")}
    return save_palette(palette, Path(out_dir) if out_dir else run_dir / "palette", space_args=space_args,
                        stitches=rows, classes=info["classes"], task=info["task"])
