"""Is a deployed LLM stitch as efficient as the anchors it came from? Generation speed x parameters, side by side.

For each deployed stitch of an ``esta lm-train`` run and each anchor run as a plain transformers model
(``AutoModelForCausalLM``, ``model.generate``), greedy generation of the same number of new tokens from the same
prompt, KV cache on, in the anchors' dtype. Speed is new tokens per second (prompt included in the time, as a
user waits for it); efficiency is speed x parameters (a model twice the size may be half as fast). Rounds
alternate over all models and medians are compared, so machine noise hits every side alike.

Parameters are each model's own unique parameters: a plain Qwen2.5-0.5B ties its LM head to its embedding (one
matrix counted once); a stitch's embedding and head come from two anchors and are two matrices.

Run: ``python benchmarks/lm_generation_speed.py --run runs/llm`` (``--new-tokens``, ``--rounds``, ``--prompt``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from esta import DeployedStitch
from esta.families import quiet_transformers
from esta.generate import chat_prompt_ids, generate_ids


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/llm", help="an esta lm-train run folder (results.json, deployed/)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", default="Write a Python function that returns the n-th Fibonacci number.")
    ap.add_argument("--out", default=None, help="JSON file for the numbers (default RUN/generation_speed.json)")
    args = ap.parse_args()
    quiet_transformers()
    results = json.loads((Path(args.run) / "results.json").read_text())
    sources = [a["source"] for a in results["anchors"]]
    tok = AutoTokenizer.from_pretrained(sources[0])
    ids = chat_prompt_ids(tok, [{"role": "user", "content": args.prompt}])
    n = args.new_tokens

    models: dict[str, tuple[callable, int]] = {}
    for src in sources:
        m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, trust_remote_code=False).eval()
        mask = torch.ones_like(ids)

        def plain(m=m, mask=mask) -> None:  # min_new_tokens: never stop early at EOS, so all make n tokens
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        models[f"anchor {Path(src).name} (plain transformers)"] = (plain, unique_params(m))
    for d in results["deployed"]:
        m = DeployedStitch.from_pretrained(d["path"])

        def stitched(m=m) -> None:
            for _ in generate_ids(m, ids, n):
                pass
        models[f"stitch {d['name']} (esta, deployed)"] = (stitched, unique_params(m))

    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for fn, _ in models.values():  # warm-up
            fn()
        for r in range(args.rounds):
            for k, (fn, _) in models.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = {}
    for k, (_, params) in models.items():
        tps = n / statistics.median(times[k])
        rows[k] = {"params": params, "tokens_per_s": tps, "efficiency": tps * params / 1e9}
    anchors = [k for k in rows if k.startswith("anchor")]
    print(f"\n{n} new tokens, prompt {ids.shape[1]} tokens, {args.rounds} rounds, medians; "
          f"efficiency = tokens/s x parameters (G)")
    print(f"{'model':58}{'params M':>9}{'tok/s':>8}{'eff':>7}  " + "  ".join(f"vs {a.split()[1][:22]}" for a in anchors))
    for k, r in rows.items():
        ratios = [r["efficiency"] / rows[a]["efficiency"] for a in anchors]
        r["ratio_to_anchors"] = dict(zip(anchors, ratios))
        print(f"{k[:58]:58}{r['params'] / 1e6:9.1f}{r['tokens_per_s']:8.2f}{r['efficiency']:7.2f}  "
              + "  ".join(f"{x:>{len(a.split()[1][:22]) + 3}.3f}" for x, a in zip(ratios, anchors)))
    worst = min(x for k, r in rows.items() if k.startswith("stitch") for x in r["ratio_to_anchors"].values())
    print(f"\nworst stitch/anchor efficiency ratio: {worst:.3f} (goal >= 0.9)")
    out = Path(args.out or Path(args.run) / "generation_speed.json")
    out.write_text(json.dumps({"new_tokens": n, "prompt_tokens": int(ids.shape[1]), "rounds": args.rounds,
                               "models": rows, "worst_ratio": worst}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
