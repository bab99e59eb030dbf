"""How good is each way of picking one stitch per budget? Side by side on the same trained palettes.

Reads finished runs made with ``esta train ... --validation-sweep`` (every stitch's test accuracy from the sweep,
its validation accuracy, importance and training-loss average are in ``results.json``) and replays every rule on
them: no training, no evaluation. For each rule: mean accuracy of the picks (test subset), mean regret against the
best stitch within each budget, and the largest fall of accuracy below a cheaper budget's pick.

Rules: ``importance`` (the paper's: highest importance inside the budget's group), ``importance-per-param`` (the
same score divided by the path's trainable parameter count), ``loss`` (lowest training-loss average within the
budget), ``validation`` (SN-Net's sweep on held-out examples), and ``oracle`` (the test accuracy itself: regret 0 by
definition, the ceiling).

Run: ``python benchmarks/deploy_rules.py runs/a runs/b ...``. ``--truth validation`` judges every rule by the
validation accuracies instead of the test sweep (for choosing a default without looking at test data; the
``validation`` rule is then the oracle).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from esta.evaluate import largest_drop
from esta.importance import budget_groups
from esta.selection import choose


def replay(results: dict, truth: str = "test") -> dict[str, dict[str, float]]:
    stitches = results["stitches"]
    costs = [float(s["flops"]) for s in stitches]
    trained = [s["id"] for s in stitches if s["group"] is not None]
    sampling = results["config"]["train"]["sampling"]
    groups = [m for g in budget_groups(costs, sampling["groups"], sampling.get("spacing", "linear"))
              if (m := [s for s in g if s in set(trained)])]
    budgets = sorted({d["budget"] for d in results["deployed"]})
    key = "accuracy" if truth == "test" else "validation_accuracy"
    test = {s["id"]: s[key] for s in stitches if s.get(key) is not None}
    n_params = {s["id"]: s.get("params") or 1 for s in stitches}
    rules = {
        "importance": ([s["importance"] for s in stitches], "group"),
        "importance-per-param": ([s["importance"] / n_params[s["id"]] for s in stitches], "group"),
        "loss": ([-(s["train_loss"] if s.get("train_loss") is not None else float("inf")) for s in stitches],
                 "budget"),
        "validation": ([s.get("validation_accuracy") if s.get("validation_accuracy") is not None else -1.0
                        for s in stitches], "budget"),
        "oracle": ([test.get(s["id"], -1.0) for s in stitches], "budget"),
    }
    out = {}
    for name, (score, within) in rules.items():
        picks = choose(groups, costs, score, budgets, within=within)
        accs = [test[c.stitch_id] for c in picks]
        regret = [max(a for s, a in test.items() if costs[s] <= c.budget) - test[c.stitch_id] for c in picks]
        out[name] = {"mean_accuracy": statistics.fmean(accs), "mean_regret": statistics.fmean(regret),
                     "largest_drop": largest_drop(accs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders made with --validation-sweep")
    ap.add_argument("--truth", choices=["test", "validation"], default="test",
                    help="what judges the picks: the test sweep, or the validation accuracies")
    args = ap.parse_args()
    table: dict[str, list[dict]] = {}
    for run in args.runs:
        results = json.loads((Path(run) / "results.json").read_text())
        if not any(s.get("validation_accuracy") is not None for s in results["stitches"]):
            raise SystemExit(f"{run}: no validation accuracies; run it with --validation-sweep")
        for rule, row in replay(results, args.truth).items():
            table.setdefault(rule, []).append(row)
        print(f"{run}: {results['task']}, {results['train']['steps']} steps, seed {results['config']['train']['seed']}")
    print(f"\n{'rule':22s} {'mean acc %':>11s} {'regret (points)':>16s} {'largest drop':>13s}   over {len(args.runs)} run(s)")
    for rule, rows in table.items():
        mean = lambda k: statistics.fmean(r[k] for r in rows)  # noqa: E731
        print(f"{rule:22s} {100 * mean('mean_accuracy'):11.2f} {100 * mean('mean_regret'):16.2f} "
              f"{100 * mean('largest_drop'):13.2f}")


if __name__ == "__main__":
    main()
