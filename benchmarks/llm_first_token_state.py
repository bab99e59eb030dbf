"""Does the first token's state decide how good a language stitch starts? Screening perplexity of every cut at init.

Causal attention: the first token sees only itself, so an anchor's hidden state there depends on that one token.
From its 2nd-5th block on, Qwen2.5's first token carries "massive activations" (the attention sink) that the blocks
after it lean on, and a linear stitching layer fitted without that token (as least squares is) cannot produce them.
This script fits the stitching layers as ``esta lm-train --stitch-first-token`` does (one per cut,
``--ls-outliers``), then scores every stitch on the screening records (chat-formatted training records, whole text)
twice: without the first-token state, and with it (the stitching layer's output at position 0 replaced by the end
anchor's own state at the cut, averaged over the calibration records' first tokens: all the chat template's
``<|im_start|>``, so one exact vector per layer). Printed: the median, how many cuts start at or below the worse anchor
(what screening keeps), Spearman(parameters, perplexity) over the cuts, and the cuts of 1.0-1.3 B parameters.

Run: ``python benchmarks/llm_first_token_state.py [--anchors SMALL LARGE] [--data RECORDS]`` (about 12 min for the
Qwen2.5-Coder pair on 2 cores; defaults: esta's built-in pair and ShareGPT records, fetched or cached).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from esta.cost import count_costs
from esta.palette import Palette
from esta.tasks.instruction_tuning import InstructionTuning, LMAdaptConfig


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> list[float]:
        r = [0.0] * len(x)
        for k, i in enumerate(sorted(range(len(x)), key=lambda i: x[i])):
            r[i] = float(k)
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--anchors", nargs=2, help="small and large causal LM (default: esta's built-in Qwen pair)")
    ap.add_argument("--data", default="sharegpt", help="instruction records (default: built-in ShareGPT)")
    ap.add_argument("--ls-outliers", type=float, default=4.0)
    ap.add_argument("--json", help="also write every stitch's two perplexities here")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = LMAdaptConfig(anchors=list(args.anchors or []), data=args.data, ls_outliers=args.ls_outliers,
                           mc_examples=0, progress=False).with_builtin_sources()
    task = InstructionTuning(config)
    task.load("validation")
    palette = Palette(task.anchors, stitch_layers="per-cut", first_token_state=True).eval()
    task.fit_stitching(palette)
    params = [c.params for c in count_costs(palette, task.cost_input(), progress=False)]
    states = {key: layer.first_state for key, layer in palette.stitching.items()}  # set by the fit (--stitch-first-token)
    perplexities = {}
    for on in (False, True):
        for key, layer in palette.stitching.items():
            layer.first_state = states[key] if on else None
        t0 = time.perf_counter()
        task.before_pst(palette, params)
        perplexities[on] = [math.exp(v) for v in task.screening.losses]
        print(f"screened {'with' if on else 'without'} the first-token state in {time.perf_counter() - t0:.0f} s")
    anchors = palette.space.anchor_ids()
    worst = max(perplexities[False][a] for a in anchors)
    print("anchors' screening perplexity:", ", ".join(f"{perplexities[False][a]:.2f}" for a in anchors))
    cuts = [s for s in palette.space.stitches if not s.is_anchor]
    for on, label in ((False, "least squares"), (True, "+ first-token state")):
        v = [perplexities[on][s.id] for s in cuts]
        middle = [f"{perplexities[on][s.id]:.1f}" for s in cuts if 1.0e9 <= params[s.id] <= 1.3e9]
        print(f"{label:<20} median {sorted(v)[len(v) // 2]:6.1f}; at or below the worse anchor {sum(x <= worst for x in v)}"
              f" of {len(v)}; Spearman(params, perplexity) {spearman([params[s.id] for s in cuts], v):+.2f}; "
              f"1.0-1.3 B: {' '.join(middle)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"names": [s.name for s in palette.space.stitches], "params": params,
                                               "least_squares": perplexities[False],
                                               "first_token_state": perplexities[True]}, indent=1))


if __name__ == "__main__":
    main()
