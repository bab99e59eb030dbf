"""What a Task gives the recipe (``esta.recipe``): everything about the data and the metric, nothing about ESTA.

A new Task is one file in this folder: a config dataclass (``RecipeConfig`` plus its own settings) and a subclass
of :class:`Task` filling in the hooks below, registered in ``esta/tasks/__init__.py``. The recipe calls them in
this order: ``check_method`` → ``load`` → ``fit_stitching`` → ``cost_input`` → ``before_pst`` → ``describe`` →
``run_info`` → (training on ``train_set`` with ``loss_fn`` / ``collate_fn``) → ``default_budgets`` /
``validation_scores`` → ``deploy_meta`` / ``save_beside`` → ``report`` → ``write``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..budget import CostAxis
from ..errors import EstaError
from ..methods import Method
from ..palette import Palette
from ..results import Metric
from ..selection import Choice, default_budgets
from ..train import LossFn, TrainResult


class Task:
    name: str = ""  # the task's name in results (e.g. the dataset's)
    kind: str = ""  # the registry's name: "image-classification", "instruction-tuning"
    #: the anchors it takes, by what their forward reads (``Anchor.modality``: "image", "text"), so any family of
    #: that modality trains with this Task
    modality: str = ""
    axis: CostAxis  # what budgets are measured in
    metric: Metric  # what its evaluation reports (accuracy, perplexity)
    methods: tuple[str, ...] | None = None  # the methods it supports (None: all of ``methods.METHODS``)
    #: config fields a reference run (``--compare``) sets: it is part of the palette's run and needs only its
    #: anchors' scores, not this Task's optional extras
    reference_overrides: dict = {}

    train_set: Any = None
    loss_fn: LossFn
    collate_fn: Callable | None = None
    anchors: list = []

    def __init__(self, config) -> None:
        self.config = config

    def restore(self, info: dict) -> None:
        """What a finished run's ``run.json`` says about the task, for deploying it again without its data."""
        self.name = info.get("task", self.name)

    def check_method(self, method: Method) -> None:
        if self.methods is not None and method.name not in self.methods:
            raise EstaError(f"method {method.name!r} does not apply to {self.kind}; choose from "
                            f"{', '.join(self.methods)}")

    # -- before training --------------------------------------------------------------------------------------
    def load_anchors(self, num_labels: int | None = None) -> list:
        """The family, checked to be of this Task's kind (``num_labels``: the size of a new head, where it has one;
        a finished run's heads come from its checkpoint)."""
        raise NotImplementedError

    def load(self, deploy_by: str) -> None:
        """Load the family into ``self.anchors`` and the data (``self.train_set``, held-out sets, new heads)."""
        raise NotImplementedError

    def fit_stitching(self, palette: Palette) -> None:
        """Least-squares init of the stitching layers on the Task's calibration examples."""
        raise NotImplementedError

    def cost_input(self) -> Any:
        """One input for ``count_costs``."""
        raise NotImplementedError

    def before_pst(self, palette: Palette, costs: list) -> list[int] | None:
        """Work on the plain palette before PST (e.g. probe heads, screening); the stitches to train (None: all)."""
        return None

    def describe(self, palette: Palette, method: Method) -> None:
        """Log what is about to be trained."""

    def run_info(self, costs: list) -> dict:
        """Extra keys of ``run.json`` (what redeploying the run needs)."""
        return {}

    # -- deployment -------------------------------------------------------------------------------------------
    def default_budgets(self, palette: Palette, costs: list[float], sampling) -> list[float]:
        """Budgets when the user gave none: one per budget group of the whole space and one at each anchor's cost
        (``esta.selection.default_budgets``). Why the whole space and not only the trained stitches: after screening
        the Qwen pair's kept cuts all cost 1.59-1.71 B and fell into two groups, so a run asked for two budgets
        and never showed what it deploys between the anchors."""
        return default_budgets(palette, costs, sampling)

    def validation_scores(self, palette: Palette, groups: list[list[int]], progress: bool) -> dict[int, float]:
        """A score per stitch on held-out data, higher is better (what deploying by validation ranks)."""
        raise NotImplementedError

    def deploy_meta(self, costs: list, result: TrainResult) -> Callable[[Choice], dict]:
        """What each deployed folder records about itself."""
        raise NotImplementedError

    def save_beside(self, folder: Path) -> None:
        """Files a deployed folder needs beside the weights (e.g. a tokenizer)."""

    # -- results ----------------------------------------------------------------------------------------------
    def report(self, palette: Palette, costs: list, result: TrainResult, choices: list[Choice], dirs: list[Path],
               val_scores: dict[int, float], deploy_by: str, timing: dict) -> dict:
        """Evaluate and assemble ``results.json``."""
        raise NotImplementedError

    def write(self, results: dict, out: Path) -> None:
        raise NotImplementedError

    @staticmethod
    def write_html(results: dict, out: Path) -> Path:
        """``OUT/report.html`` from the run's results (``esta report`` rebuilds it)."""
        raise NotImplementedError

    @staticmethod
    def summary(results: dict, out: str) -> str:
        """What ``esta train`` prints once the run is done (its results as this Task wrote them)."""
        raise NotImplementedError
