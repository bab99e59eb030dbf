"""esta: Efficient Stitchable Task Adaptation.

Stitch a family of pretrained models into a palette of in-between networks, adapt the whole palette to a task in
one run (shared LoRA + stitch-specific biases, importance-guided stitch sampling), and deploy the best stitch for
each budget as a standalone model.

    >>> import esta
    >>> results = esta.run(esta.AdaptConfig(anchors=["esta-mini"], data="animal-shapes", out_dir="runs/x"))
    >>> model = esta.DeployedStitch.from_pretrained("runs/x/deployed/budget03")

``esta.run`` takes any Task's config: ``AdaptConfig`` (image classification) or ``LMAdaptConfig`` (instruction
tuning of a causal-LM family).
"""

from .analysis import GradAngleConfig, grad_angles
from .bench import BenchConfig, run_bench
from .budget import Budget, CostAxis
from .cost import StitchCost, count_costs
from .deploy import DeployedStitch, choose
from .errors import EstaError
from .evaluate import accuracy, sweep
from .families import Anchor, VisionAnchor, load_anchor, load_family
from .importance import ImportanceSampler, SamplingConfig, budget_groups, snip_score
from .methods import METHODS, Method, get_method
from .palette import Palette, run_stitch
from .probe import fit_probe, probe_head
from .pst import PSTConfig, StitchLinear
from .recipe import RecipeConfig, run
from .results import Metric, Point, RunResults
from .runs import load_run, redeploy
from .space import Stitch, StitchSpace, build_space
from .tasks import TASKS, AdaptConfig, LMAdaptConfig, Task
from .tasks.image_classification import adapt
from .tasks.instruction_tuning import adapt_lm
from .train import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "run", "RecipeConfig", "TASKS", "Task", "AdaptConfig", "adapt", "LMAdaptConfig", "adapt_lm", "load_run",
    "redeploy", "Budget", "CostAxis", "Metric", "Point", "RunResults",
    "GradAngleConfig", "grad_angles", "BenchConfig", "run_bench", "METHODS", "Method", "get_method",
    "StitchCost", "count_costs",
    "DeployedStitch", "choose",
    "EstaError",
    "accuracy", "sweep",
    "Anchor", "VisionAnchor", "load_anchor", "load_family",
    "ImportanceSampler", "SamplingConfig", "budget_groups", "snip_score",
    "Palette", "run_stitch", "fit_probe", "probe_head",
    "PSTConfig", "StitchLinear",
    "Stitch", "StitchSpace", "build_space",
    "TrainConfig", "TrainResult", "train",
]
