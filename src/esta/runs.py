"""A finished run, after training: load its palette, deploy it again for other budgets, or save it whole.

Everything here reads a run folder (``run.json`` and ``checkpoint/``) through the run's own Task (image
classification or instruction tuning), so a language run redeploys exactly as an image run does.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from .budget import LATENCY, check_budgets, parse_any
from .checkpoint import load_adaptation, load_sampler_state
from .errors import EstaError
from .evaluate import largest_drop, spearman
from .files import read_json, write_json
from .importance import SamplingConfig
from .methods import get_method
from .palette import Palette
from .profile import palette_latencies
from .recipe import export_choices, select, write_model_cards
from .results import Point
from .train import TrainResult, candidate_groups


def _task_of(info: dict):
    """The run's config and Task (runs written before ``task_kind`` existed: an image run has ``classes``)."""
    from .tasks import TASKS

    kind = info.get("task_kind") or ("image-classification" if "classes" in info else "instruction-tuning")
    if kind not in TASKS:
        raise EstaError(f"the run's task {kind!r} is not one of {', '.join(TASKS)}")
    config_cls, task_cls = TASKS[kind]
    # runs written before the choice existed shared one stitching layer per window
    return task_cls(config_cls.from_dict({"stitch_layers": "per-window", "stitch_offsets": False,
                                          **info["config"]}))


def load_run(run_dir: str | Path, with_data: bool = False, deploy_by: str = "validation"):
    """The trained palette of a finished (or checkpointed) run, and its run.json (with ``task``: the run's Task;
    with ``with_data`` its held-out data is loaded too, the same draw as in training)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise EstaError(f"{run_dir} is not an esta run folder (no run.json)")
    info = read_json(run_dir / "run.json")
    task = _task_of(info)
    cfg = task.config
    if with_data:  # the family with new heads, and the data; the trained heads come from the checkpoint below
        task.load(deploy_by)
    else:
        task.anchors = task.load_anchors(num_labels=len(info["classes"]) if "classes" in info else None)
    palette = Palette.from_config(task.anchors, cfg)
    palette.apply_pst(get_method(cfg.method).pst(cfg.pst))
    meta = load_adaptation(run_dir / "checkpoint", palette)
    info["step"], info["total_steps"] = meta["step"], meta.get("total_steps", meta["step"])
    sampler = load_sampler_state(run_dir / "checkpoint")
    info["importance"] = [float(v) for v in sampler["importance"]]
    info["updates"] = [int(v) for v in sampler["updates"]]
    if "train_loss" in sampler:
        info["train_loss"] = [float(v) if n else None for v, n in zip(sampler["train_loss"], info["updates"])]
    if not with_data:
        task.restore(info)
    info["task"] = info.get("task", task.name)
    info["run_task"] = task
    return palette.eval(), info


def redeploy(run_dir: str | Path, budgets: list[float | str] | None, out_dir: str | Path | None = None,
             allow_unfinished: bool = False) -> list[dict]:
    """Deploy again from a finished run, e.g. for other budgets (in the Task's unit: GFLOPs, millions of parameters,
    or with a unit): no retraining, no evaluation sweep. The deployment folder is replaced whole (see
    ``recipe.export_choices``). A run whose checkpoint is short of its last step is refused unless
    ``allow_unfinished``."""
    info = read_json(Path(run_dir) / "run.json") if (Path(run_dir) / "run.json").is_file() else {}
    method = get_method(info.get("config", {}).get("method", "esta"))
    rule = info.get("config", {}).get("deploy_by", "importance") if method.deploy_by == "importance" else "validation"
    palette, info = load_run(run_dir, with_data=rule == "validation", deploy_by=rule)
    task = info["run_task"]
    if info["step"] < info["total_steps"] and not allow_unfinished:
        raise EstaError(f"{run_dir} is unfinished (checkpoint at step {info['step']} of {info['total_steps']}): "
                        f"finish it with --resume, or deploy it as it is with --allow-unfinished")
    if rule == "loss" and "train_loss" not in info:
        raise EstaError(f"{run_dir}'s checkpoint has no training-loss averages to deploy by")
    cost = [float(v) for v in info[task.axis.key]]
    flops = info.get("flops") or info.get("flops_32_tokens") or [0] * len(cost)
    costs = [SimpleNamespace(flops=f, params=p) for f, p in zip(flops, info["params"])]
    # runs written before log spacing existed grouped linearly: the same groups and default budgets as then
    sampling = SamplingConfig(**{"spacing": "linear", **info["config"]["train"]["sampling"]})
    kept = (info.get("screening") or {}).get("kept")
    trained = palette.space.anchor_ids() if method.anchors_only else (kept or list(range(len(cost))))
    groups = candidate_groups(cost, sampling.groups, trained, sampling.spacing)  # the training's groups
    given = [parse_any(b, task.axis) for b in (budgets.split(",") if isinstance(budgets, str) else budgets or [])
             if str(b).strip()]
    axis = given[0].axis if given else task.axis
    if any(b.axis != axis for b in given):
        raise EstaError("give every budget in one unit (e.g. all in ms, or all in GFLOPs)")
    if axis is LATENCY:  # measured now, on this machine, as the deployed networks will run
        measured = palette_latencies(palette, trained)
        cost = [measured.get(s, math.inf) for s in range(len(cost))]
    elif axis is not task.axis:  # e.g. parameters for an image run; a language run has no per-token FLOPs
        if axis.key not in info:
            raise EstaError(f"this run's budgets are {task.axis.unit} (or ms), not {axis.unit}")
        cost = [float(v) for v in info[axis.key]]
    raw = [b.value for b in given] or None
    if raw:
        check_budgets(raw, [cost[s] for s in trained], axis)
    result = TrainResult(steps=0, seconds=0.0, trainable_params=0, total_params=0, peak_rss_mb=0.0,
                         train_rss_increase_mb=0.0, final_loss=float("nan"), importance=info["importance"],
                         updates=info["updates"], train_loss=info.get("train_loss", []), groups=groups)
    choices, _ = select(rule, palette, result, cost, raw, task, sampling, progress=False)
    paths = export_choices(palette, choices, Path(out_dir) if out_dir else Path(run_dir) / "deployed",
                           task.deploy_meta(costs, result), task.save_beside, info["task"])
    rows = [{"budget": c.budget, "stitch_id": c.stitch_id, "name": palette.space[c.stitch_id].name,
             axis.key: cost[c.stitch_id], "path": str(p)} for c, p in zip(choices, paths)]
    if out_dir is None:
        on_axis = [float(v) for v in info[task.axis.key]]  # the run's own cost axis, whatever the budgets' unit
        points = [Point(r["name"], on_axis[r["stitch_id"]], costs[r["stitch_id"]].flops, costs[r["stitch_id"]].params,
                        None, r["budget"], info["updates"][r["stitch_id"]]) for r in rows]
        results = _record_redeployment(Path(run_dir), rows, points, task.metric.name)
        if results is not None:
            write_model_cards(paths, results)
    return rows


def _record_redeployment(run_dir: Path, rows: list[dict], points: list[Point], metric: str) -> dict | None:
    """The run's results.json describes what RUN/deployed now holds: each new pick with the accuracy the run's
    sweep measured for that stitch (a deployed stitch computes what it computed in the palette; a language run
    measured only what it deployed, so a new pick's metrics are unknown), and an image run's summary recomputed;
    the training-time deployment is kept under ``deployed_at_training``. Returns the results as written (None: the
    run has none)."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    results = read_json(path)
    measured = {s["id"]: s.get("accuracy") for s in results.get("stitches", [])}
    before = {d["stitch_id"]: d for d in results.get("deployed", [])}
    results.setdefault("deployed_at_training", results.get("deployed"))
    if "stitches" not in results:  # a language run: keep the measured metrics of picks it had deployed
        results["deployed"] = [{**{k: v for k, v in before.get(r["stitch_id"], {}).items() if k != "path"}, **r,
                                "redeployed": True} for r in rows]
    else:
        results["deployed"] = [{**r, "accuracy": measured.get(r["stitch_id"]), "redeployed": True} for r in rows]
    if isinstance(results.get("run"), dict):  # the typed part describes the new deployment too
        for p, d in zip(points, results["deployed"]):
            p.value = d.get(metric)
        results["run"]["deployed"] = [asdict(p) for p in points]
    if "stitches" not in results:
        write_json(path, results)
        return results
    accs = [d["accuracy"] for d in results["deployed"]]
    known = [a for a in accs if a is not None]
    summary = results.setdefault("summary", {})
    summary.update({
        "mean_deployed_accuracy": sum(known) / len(known) if known else None, "group_accuracy": accs,
        "spearman_budget_accuracy": spearman([r["budget"] for r in rows], accs) if None not in accs else None,
        "largest_drop": largest_drop(accs), "mean_regret": None, "mean_regret_in_budget": None})
    write_json(path, results)
    return results


def save_run_palette(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """``esta deploy --palette``: the whole trained palette of a run as one artifact (see ``serving``), with every
    stitch's cost and what the run measured of it: an image run's test accuracy from its sweep, a language run's
    validation perplexity (its tokenizer saved beside). A language stitch that screening dropped before training
    is kept in the file (the space stays whole) but marked ``servable: False``."""
    from .serving import save_palette

    run_dir = Path(run_dir)
    palette, info = load_run(run_dir)
    if info["step"] < info["total_steps"]:
        raise EstaError(f"{run_dir} is unfinished (checkpoint at step {info['step']} of {info['total_steps']})")
    results = read_json(run_dir / "results.json") if (run_dir / "results.json").is_file() else {}
    cfg, out = info["config"], Path(out_dir) if out_dir else run_dir / "palette"
    space_args = {k: cfg[k] for k in ("kernel", "stride", "pairing", "two_way")}
    space_args["stitch_layers"] = cfg.get("stitch_layers", "per-window")  # runs of esta <= 0.1 had no choice
    space_args["stitch_offsets"] = cfg.get("stitch_offsets", False)
    space_args["first_token_state"] = cfg.get("stitch_first_token", False)
    if "classes" in info:
        accuracy = {s["id"]: s.get("accuracy") for s in results.get("stitches", [])}
        rows = [{"flops": float(f), "params": int(p), "accuracy": accuracy.get(i), "updates": info["updates"][i]}
                for i, (f, p) in enumerate(zip(info["flops"], info["params"]))]
        return save_palette(palette, out, space_args=space_args, stitches=rows, classes=info["classes"],
                            task=info["task"])
    kept = (info.get("screening") or {}).get("kept")
    servable = set(range(len(palette))) if kept is None else set(kept) | set(palette.space.anchor_ids())
    perplexity = _language_validation(results, palette)
    rows = [{"params": int(p), "perplexity": perplexity.get(i), "updates": info["updates"][i],
             "servable": i in servable} for i, p in enumerate(info["params"])]
    return save_palette(palette, out, space_args=space_args, stitches=rows, task=info["task"],
                        tokenizer=info["run_task"].tokenizer)


def _language_validation(results: dict, palette: Palette) -> dict[int, float]:
    """Validation perplexity per stitch id, as a language run measured it (records never trained on): the
    stitches of groups that had a choice, and every deployed stitch."""
    out = {d["stitch_id"]: d["validation_perplexity"] for d in (results.get("deployment") or {}).get("stitches", [])
           if d.get("validation_perplexity") is not None}
    ids = {s.name: s.id for s in palette.space.stitches}
    for p in (results.get("run") or {}).get("deployed", []):
        if p.get("validation") is not None and p.get("name") in ids:
            out.setdefault(ids[p["name"]], p["validation"])
    return out


def deployed_lm(model_dir: str | None = None, run_dir: str | None = None, budget: str | None = None):
    """A deployed language stitch and its tokenizer: ``model_dir``, or the costliest deployed stitch of the run
    ``run_dir`` within ``budget`` (millions of parameters, or with a unit: ``1.2B``). Returns (model, tokenizer,
    folder)."""
    from transformers import AutoTokenizer

    from .budget import PARAMS, Budget
    from .deploy import DeployedStitch
    from .selection import deployed_within

    folder = model_dir
    if folder is None:
        if run_dir is None or budget is None:
            raise EstaError("give --model DEPLOYED_FOLDER, or --run RUN_FOLDER and --budget MILLIONS_OF_PARAMETERS")
        folder = str(deployed_within(run_dir, Budget.parse(budget, PARAMS).value, PARAMS))
    model = DeployedStitch.from_pretrained(folder)
    if model.front.modality != "text":
        raise EstaError(f"{folder} is not a language-model stitch")
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False), folder


def evaluate_deployed(model_dir: str, data: str, seed: int = 0, examples: int = 0, max_length: int = 256,
                      progress: bool = True) -> dict:
    """A deployed stitch on a task: an image stitch's accuracy on the test split of ``data`` (split by ``seed``),
    or a language stitch's perplexity on the Alpaca/ShareGPT records of ``data`` (the first ``examples``; 0: all)."""
    from .deploy import DeployedStitch

    model = DeployedStitch.from_pretrained(model_dir)
    front = model.front
    if front.modality == "text":
        from transformers import AutoTokenizer

        from .instruct import load_records, record_text
        from .lm_eval import perplexity, text_batches

        records = load_records(data)[: examples or None]
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        batches = text_batches(tok, [record_text(r) for r in records], max_length)
        ppl = perplexity(model, batches, progress, "perplexity")["perplexity"]
        return {"model": model_dir, "data": data, "examples": len(records), "perplexity": ppl}
    from .data import load_image_task
    from .evaluate import accuracy

    task = load_image_task(data, image_size=front.image_size, num_channels=front.num_channels, seed=seed)
    classes = model.meta.get("classes")
    if classes is not None and len(classes) != len(task.classes):
        raise EstaError(f"{model_dir} predicts {len(classes)} classes but {data} has {len(task.classes)}")
    return {"model": model_dir, "data": data, "examples": len(task.test),
            "accuracy": accuracy(model, task.test, progress=progress)}


def rebuild_report(run_dir: str | Path) -> Path:
    """``esta report RUN``: the run's ``report.html`` written again from its results (e.g. after ``esta profile``
    added latencies to its palette, or from a run made before the page existed)."""
    run_dir = Path(run_dir)
    task = _task_of(read_json(run_dir / "run.json"))
    results = read_json(run_dir / "results.json")
    if not isinstance(results, dict):
        raise EstaError(f"{run_dir / 'results.json'} is damaged (not a results mapping)")
    try:
        return task.write_html(results, run_dir)
    except (KeyError, TypeError, ValueError) as e:
        raise EstaError(f"{run_dir / 'results.json'} is damaged or from another esta ({type(e).__name__}: {e})") from e
