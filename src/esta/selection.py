"""Which stitch serves a budget: one module for deployment after training, the palette server and the CLI.

A budget is a cost limit (GFLOPs per image, parameters, or milliseconds where profiled). After training,
:func:`select` picks one stitch per budget by the run's deployment rule (importance, training loss or a
validation score, through :func:`choose`); a saved palette's table answers a request's budget with
:func:`best_within`; a run's deployed folders answer one with :func:`deployed_within`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .budget import CostAxis, check_budgets
from .errors import EstaError
from .files import read_json
from .importance import SamplingConfig, budget_groups
from .results import METRICS

if TYPE_CHECKING:
    from .palette import Palette
    from .train import TrainResult

DEPLOY_RULES = ("importance", "loss", "validation")

#: costs as they come (choose() is given raw counts of whatever axis the caller budgets on)
RAW = CostAxis("cost", 1.0, "")


@dataclass
class Choice:
    budget: float  # the cost limit this choice satisfies
    stitch_id: int
    candidates: list[int]  # the stitches it was chosen among (its budget group)


def choose(groups: list[list[int]], costs: list[float], score: dict[int, float] | list[float],
           budgets: list[float] | None = None, within: str = "group") -> list[Choice]:
    """For each budget, the candidate with the highest ``score`` (importance for ESTA, accuracy for a sweep).

    No budgets: one choice per budget group, whose budget is its costliest member. ``within="group"`` (the paper's
    unit, for scores that only compare stitches of similar cost, like importance): the candidates are the budget's
    group, i.e. for a budget ``b`` the stitches of the costliest group that has members within ``b``, restricted to
    cost ``<= b``. ``within="budget"`` (for scores that compare any two stitches, like accuracy or loss): every
    stitch of cost ``<= b``, so a budget never gets a worse pick than a smaller budget.
    """
    if within not in ("group", "budget"):
        raise EstaError(f"within must be 'group' or 'budget', got {within!r}")

    def best(members: list[int]) -> int:
        return max(members, key=lambda s: (float(score[s]), -costs[s]))  # ties: the cheaper

    everything = sorted((s for g in groups for s in g), key=lambda s: (costs[s], s))
    if budgets is None:
        budgets = [max(costs[s] for s in g) for g in groups]
    else:
        check_budgets(budgets, [costs[s] for s in everything], RAW)
    out = []
    for b in budgets:
        if within == "group":
            members = next(m for g in reversed(groups) if (m := [s for s in g if costs[s] <= b]))
        else:
            members = [s for s in everything if costs[s] <= b]
        out.append(Choice(float(b), best(members), members))
    return out



def default_budgets(palette: Palette, costs: list[float], sampling: SamplingConfig) -> list[float]:
    """One budget per budget group (its costliest stitch) and one at each anchor's own cost: a user who would have
    deployed an anchor gets a network of exactly that cost to compare with."""
    tops = {max(costs[s] for s in g) for g in budget_groups(costs, sampling.groups, sampling.spacing)}
    return sorted(tops | {costs[s] for s in palette.space.anchor_ids()})


def select(deploy_by: str, palette: Palette, result: TrainResult, costs: list[float], budgets: list[float] | None,
           task, sampling: SamplingConfig, progress: bool = True) -> tuple[list[Choice], dict[int, float]]:
    """One stitch per budget, and the validation scores it looked at (empty unless it deploys by validation).

    Budgets: the given ones, else the Task's defaults (``Task.default_budgets``). ``importance`` (the paper's
    one-stage rule): the highest importance inside the budget's group; importance only compares stitches of
    similar cost. ``loss`` (ours, also one-stage): the lowest moving-average training loss among all trained
    stitches within the budget. ``validation``: the best score on the Task's held-out examples (accuracy, or minus
    the perplexity), among every stitch that fits the budget (a validation score compares any two networks).
    """
    if deploy_by not in DEPLOY_RULES:
        raise EstaError(f"unknown deployment rule {deploy_by!r}; choose from {', '.join(DEPLOY_RULES)}")
    if budgets is None:
        budgets = task.default_budgets(palette, costs, sampling)
    if deploy_by == "importance":
        return choose(result.groups, costs, result.importance, budgets), {}
    if deploy_by == "loss":
        score = [-v if v is not None else -math.inf for v in result.train_loss]
        return choose(result.groups, costs, score, budgets, within="budget"), {}
    scores = task.validation_scores(palette, result.groups, progress)
    # a stitch the Task did not score ranks last
    ranked = [scores.get(s, -math.inf) for s in range(len(palette))]
    return choose(result.groups, costs, ranked, budgets, within="budget"), scores



def best_within(table: dict, budget: float, key: str = "flops") -> dict:
    """Among the servable rows within ``budget`` of ``key``, the one with the best measured score (the table's
    ``score``: highest accuracy, or lowest perplexity), the costliest where none was measured; an EstaError naming
    the cheapest cost when none fits. Rows marked ``servable: False`` (a language stitch screened out before
    training) are never chosen."""
    score = table.get("score", "accuracy")
    higher = METRICS[score].higher_is_better if score in METRICS else True
    rows = [r for r in table["stitches"] if r.get("servable", True) and r.get(key) is not None]
    if not rows:
        raise EstaError(f"this palette's table has no {key} costs")
    fits = [r for r in rows if r[key] <= budget]
    if not fits:
        raise EstaError(f"no stitch fits a budget of {budget:g} {key}: the cheapest costs "
                        f"{min(r[key] for r in rows):g}")

    def rank(r: dict) -> tuple:
        v = r.get(score)
        return (v is not None, (v if higher else -v) if v is not None else 0.0, r[key])

    return max(fits, key=rank)


def deployed_within(run_dir: str | Path, budget: float, axis: CostAxis) -> Path:
    """The deployed folder of a finished run (``RUN/deployed/budgetKK``) that costs most within ``budget`` on
    ``axis`` (as its ``esta_stitch.json`` records it); an EstaError naming the cheapest when none fits."""
    key = axis.key
    options = []
    for d in sorted(Path(run_dir, "deployed").glob("budget*")):
        meta = read_json(d / "esta_stitch.json", "deployment").get("meta", {})
        if key in meta:
            options.append((meta[key], d))
    fitting = [o for o in options if o[0] <= budget]
    if not fitting:
        cheapest = min((o[0] for o in options), default=None)
        raise EstaError(f"no deployed stitch of {run_dir} fits {axis.show(budget)}"
                        + (f" (the smallest has {axis.show(cheapest)})" if cheapest is not None else ""))
    return max(fitting, key=lambda o: o[0])[1]
