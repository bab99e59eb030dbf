"""How far can one in-between language stitch go at this price? More updates, and an end-anchor-calibrated layer.

A finished ``esta lm-train`` run (its ``run.json`` and checkpoint) is rebuilt: the same family, data split and
least-squares stitching layers, then the checkpoint's adaptation. For one stitch (``--stitch``, by name) it prints,
side by side, its validation perplexity (the run's own validation records) and the two anchors':

1. at init, after least squares (no adapter);
2. at init, after end-anchor calibration of its stitching layer alone (``--calibrate-steps`` Adam steps on
   ``--calibrate-examples`` records of the training split, as ``--calibrate-steps`` does in a run);
3. as the palette trained it (the checkpoint), then after ``--steps`` more updates of this stitch alone (its
   path's shared LoRA, its stitching layer's LoRA and its own biases; the run's learning rate and distillation);
4. the calibrated layer put into the trained palette (its LoRA and this stitch's biases reset), then the same
   ``--steps`` updates.

What it answers: whether a middle stitch that ends worse than the small anchor (on the Qwen pair, 1.0-1.25 B cuts at
9.1-10.2 against 6.7) is starved of updates, or of a better start, or neither. Updates of one stitch also move the
shared LoRA of the anchors' blocks it runs; the anchors' perplexity after step 3 says by how much.

Run: ``python benchmarks/llm_one_stitch.py --run runs/llm-outl --stitch '0[:15]->1[17:]'`` (about 30 min on 2
cores for the Qwen pair: rebuilding 3 min, calibration 6 min, 2 x 60 updates 13 min, 11 validations 3 min).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from esta.calibration import CalibrationConfig, calibrate_stitching
from esta.checkpoint import load_adaptation
from esta.errors import EstaError
from esta.instruct import collate, lm_loss
from esta.lm_eval import perplexity
from esta.methods import get_method
from esta.palette import Palette
from esta.tasks.instruction_tuning import InstructionTuning, LMAdaptConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished esta lm-train output folder (run.json, checkpoint/)")
    ap.add_argument("--stitch", required=True, help="the stitch's name, e.g. '0[:15]->1[17:]'")
    ap.add_argument("--steps", type=int, default=60, help="updates of the stitch alone, from the trained palette")
    ap.add_argument("--every", type=int, default=20, help="validation every this many updates")
    ap.add_argument("--calibrate-steps", type=int, default=100)
    ap.add_argument("--calibrate-lr", type=float, default=1e-4)
    ap.add_argument("--calibrate-examples", type=int, default=128)
    ap.add_argument("--calibrate-batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1, help="seeds the records of the extra updates")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (alone on the machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run)
    if not (run_dir / "run.json").is_file() or not (run_dir / "checkpoint" / "state.json").is_file():
        raise SystemExit(f"esta: error: {run_dir} is not a finished esta lm-train run (run.json, checkpoint/)")
    config = LMAdaptConfig.from_dict(json.loads((run_dir / "run.json").read_text())["config"])
    # least squares only here: this script calibrates the one layer itself
    config = replace(config, progress=False, resume=False, calibration=replace(config.calibration, steps=0))
    t0 = time.perf_counter()
    task = InstructionTuning(config)
    task.load(config.deploy_rule())
    palette = Palette.from_config(task.anchors, config)
    task.fit_stitching(palette)
    by_name = {s.name: s for s in palette.space.stitches}
    if args.stitch not in by_name or by_name[args.stitch].is_anchor:
        raise SystemExit(f"esta: error: no in-between stitch named {args.stitch!r} in this run's space")
    stitch = by_name[args.stitch]
    anchors = palette.space.anchor_ids()
    batches = task._validation_batches()
    rows: list[dict] = []

    def validate(what: str, with_anchors: bool = True) -> None:
        palette.eval()
        with torch.no_grad():
            ppl = [perplexity(lambda x, s=s: palette(x, stitch=s), batches)["perplexity"]
                   for s in ([stitch.id, *anchors] if with_anchors else [stitch.id])]
        rows.append({"what": what, "stitch": ppl[0], "anchors": ppl[1:] or None})
        print(f"{what:<66} {ppl[0]:8.3f}   " + "  ".join(f"{p:6.3f}" for p in ppl[1:]), flush=True)

    print(f"{stitch.name} ({config.anchors[0]} -> {config.anchors[-1]}); rebuilt in {time.perf_counter() - t0:.0f} s")
    print(f"{'validation perplexity (' + str(len(task.val)) + ' records)':<66} {'stitch':>8}   anchors")
    validate("1. at init, least squares")
    least_squares = {k: v.detach().clone() for k, v in palette.stitching[stitch.layer].state_dict().items()}
    records = task.train_set.examples[config.calibration_examples:][:args.calibrate_examples]
    cal = collate([{k: v[:config.calibration_tokens] for k, v in e.items()} for e in records], task.pad)
    t1 = time.perf_counter()
    report = calibrate_stitching(
        palette, {"input_ids": cal["input_ids"], "attention_mask": cal["attention_mask"]},
        CalibrationConfig(steps=args.calibrate_steps, lr=args.calibrate_lr, batch_size=args.calibrate_batch_size,
                          examples=args.calibrate_examples), seed=0, keys=[stitch.layer])[stitch.layer]
    calibrated = {k: v.detach().clone() for k, v in palette.stitching[stitch.layer].state_dict().items()}
    validate(f"2. at init, calibrated ({args.calibrate_steps} steps, {time.perf_counter() - t1:.0f} s; error "
             f"{report['before']:.3f}->{report['after']:.3f})", False)
    palette.stitching[stitch.layer].load_state_dict(least_squares)
    palette.apply_pst(get_method(config.method).pst(config.pst))
    teacher = palette.end_anchor_ids()[stitch.id]

    def more_updates(label: str) -> None:
        optimizer = torch.optim.AdamW(palette.path_parameters(stitch.id), lr=config.train.rate,
                                      weight_decay=config.train.weight_decay)
        rng, examples, t = random.Random(args.seed), task.train_set.examples, time.perf_counter()
        for step in range(1, args.steps + 1):
            palette.train()
            batch = collate([examples[rng.randrange(len(examples))] for _ in range(config.train.batch_size)], task.pad)
            loss = lm_loss(palette, batch, stitch.id, teacher, config.train.distill, config.train.distill_temperature)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % args.every == 0 or step == args.steps:
                validate(f"   {label} + {step} updates ({(time.perf_counter() - t) / step:.1f} s each)",
                         step == args.steps)

    load_adaptation(run_dir / "checkpoint", palette)
    validate("3. as the palette trained it")
    more_updates("3.")
    load_adaptation(run_dir / "checkpoint", palette)
    layer = palette.stitching[stitch.layer]
    with torch.no_grad():
        layer.base.weight.copy_(calibrated["weight"])
        layer.base.bias.copy_(calibrated["bias"])
        layer.lora_B.zero_()
        own = layer.own_bias(stitch.id)
        if own is not None:
            own.zero_()
    validate("4. calibrated layer in the trained palette", False)
    more_updates("4.")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run_dir), "stitch": stitch.name, "rows": rows,
                                               "args": vars(args)}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except EstaError as e:
        raise SystemExit(f"esta: error: {e}")
