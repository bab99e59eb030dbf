"""The results every run reports, whatever its Task: one typed schema, written into ``results.json`` under ``run``.

Each Task writes its own detail beside it (an image run: every stitch's accuracy, regrets, probes; a language run:
perplexity and multiple choice per network, screening); ``esta bench``, ``esta deploy`` and the reports read only
:class:`RunResults`, so they work on any Task. A metric knows its direction: accuracy rises, perplexity falls.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields

from .errors import EstaError


@dataclass(frozen=True)
class Metric:
    name: str  # the key of the value in a Task's own rows: "accuracy", "perplexity"
    higher_is_better: bool
    scale: float  # display: accuracy in percent (x100), perplexity as it is
    unit: str  # "%" or ""
    diff_unit: str  # what a difference is called: "points", "ppl"

    def gain(self, new: float, old: float) -> float:
        """How much better ``new`` is than ``old``, in display units (positive: better)."""
        return self.scale * ((new - old) if self.higher_is_better else (old - new))

    def best(self, values: list[float]) -> float:
        return max(values) if self.higher_is_better else min(values)

    def show(self, value: float | None) -> str:
        return "-" if value is None else f"{self.scale * value:.1f}" if self.scale != 1 else f"{value:.2f}"


ACCURACY = Metric("accuracy", True, 100.0, "%", "points")
PERPLEXITY = Metric("perplexity", False, 1.0, "", "ppl")
METRICS = {m.name: m for m in (ACCURACY, PERPLEXITY)}


def largest_fall(values: list[float | None], m: Metric) -> float:
    """Over ``values`` ordered by cost, the largest amount (display units) by which one is worse than a cheaper
    one (unmeasured values skipped): 0 when the curve never gets worse with budget."""
    # imported here: evaluate imports torch, and results is read by light tools too
    from .evaluate import largest_drop

    signed = [None if v is None else v if m.higher_is_better else -v for v in values]
    return m.scale * largest_drop(signed)


@dataclass
class Point:
    """One network of a run: a deployed stitch, or an anchor in the palette."""

    name: str
    cost: float  # on the run's cost axis (raw FLOPs or parameters)
    flops: float | None
    params: float
    value: float | None  # the run's metric on its evaluation data (None: not measured)
    budget: float | None = None  # deployed networks: the budget it answers
    updates: int | None = None  # training steps it got
    validation: float | None = None  # the metric on the held-out validation data, where measured


@dataclass
class RunResults:
    method: str
    task: str
    task_kind: str
    metric: str  # a key of METRICS
    cost_axis: str  # "flops" or "params"
    deploy_by: str
    deployed: list[Point]
    anchors: list[Point]
    seed: int
    lr: float
    steps: int
    train_seconds: float
    trainable_params: int
    total_params: int
    peak_rss_mb: float
    train_rss_increase_mb: float = 0.0
    select_seconds: float = 0.0
    sweep_seconds: float = 0.0
    mean_regret: float | None = None  # against the best evaluated stitch the rule chose among
    mean_regret_in_budget: float | None = None  # against the best evaluated stitch within each budget
    #: per anchor pair: its stitches against the share of the end anchor (see ``esta.pairs``); empty without a sweep
    pairs: list = field(default_factory=list)
    #: budgets strictly between the cheapest and the costliest anchor (not an anchor's own cost), and how many of
    #: them deployed an in-between stitch better than the cheaper anchor of its pair
    in_between: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def measure(self) -> Metric:
        return METRICS[self.metric]

    @property
    def mean_deployed(self) -> float | None:
        values = [p.value for p in self.deployed if p.value is not None]
        return statistics.fmean(values) if values else None

    @property
    def mean_validation(self) -> float | None:
        values = [p.validation for p in self.deployed]
        return statistics.fmean(values) if values and None not in values else None

    def largest_drop(self) -> float:
        """The largest amount (display units) by which a deployed network is worse than a cheaper one."""
        ordered = sorted(self.deployed, key=lambda p: p.budget if p.budget is not None else p.cost)
        return largest_fall([p.value for p in ordered], self.measure)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, results: dict) -> "RunResults":
        """The typed part of a ``results.json``."""
        if not isinstance(results.get("run"), dict):
            raise EstaError("these results carry no 'run' section (written by an esta older than the typed schema): "
                            "run them again")
        d = dict(results["run"])
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["deployed"] = [Point(**p) for p in d["deployed"]]
        d["anchors"] = [Point(**p) for p in d["anchors"]]
        return cls(**d)


def in_between_served(deployed: list[dict], anchors: list[dict], pairs: list[dict], metric: Metric,
                      cost: str = "flops") -> dict:
    """How many budgets between the anchors' costs an in-between stitch serves, and beats the cheaper anchor of its
    pair there (``deployed``: rows with ``budget``, ``name``, ``stitch_id`` and the metric; ``anchors``: rows with
    ``stitch_id`` and the cost; ``pairs``: :func:`esta.pairs.pair_curves`, which holds each pair's anchors and
    points). Where no sweep ran, a stitch counts as better than its cheaper anchor if its deployed value is."""
    anchor_ids = {a["stitch_id"] for a in anchors}
    costs = sorted(a[cost] for a in anchors)
    between = [d for d in deployed if costs and costs[0] < d["budget"] < costs[-1]
               and not any(abs(d["budget"] - c) <= 1e-9 * max(1.0, c) for c in costs)]
    cheaper = {q["id"]: p.get("cheaper_" + metric.name) for p in pairs for q in p["points"]}
    served = [d for d in between if d["stitch_id"] not in anchor_ids and d.get(metric.name) is not None
              and cheaper.get(d["stitch_id"]) is not None and metric.gain(d[metric.name], cheaper[d["stitch_id"]]) > 0]
    return {"budgets": len(between), "in_between": sum(d["stitch_id"] not in anchor_ids for d in between),
            "beating_cheaper_anchor": len(served), "share": len(served) / len(between) if between else None}


def run_results(task, result, deploy_by: str, timing: dict, deployed: list[Point], anchors: list[Point],
                **kw) -> RunResults:
    """The typed results of a run of ``task`` (a ``tasks.base.Task``) whose training gave ``result``."""
    cfg = task.config
    return RunResults(
        method=cfg.method, task=task.name, task_kind=task.kind, metric=task.metric.name, cost_axis=task.axis.key,
        deploy_by=deploy_by, deployed=deployed, anchors=anchors, seed=cfg.train.seed, lr=cfg.train.lr,
        steps=result.steps, train_seconds=result.seconds, trainable_params=result.trainable_params,
        total_params=result.total_params, peak_rss_mb=result.peak_rss_mb,
        train_rss_increase_mb=result.train_rss_increase_mb, select_seconds=timing.get("select_seconds", 0.0),
        sweep_seconds=timing.get("sweep_seconds", 0.0), **kw)
