"""esta: Efficient Stitchable Task Adaptation.

Stitch a family of pretrained models into a palette of in-between networks, adapt the whole palette to a task in
one run (shared LoRA + stitch-specific biases, importance-guided stitch sampling), and deploy the best stitch for
each budget as a standalone model.

    >>> import esta
    >>> results = esta.adapt(esta.AdaptConfig(anchors=["esta-mini"], data="animal-shapes", out_dir="runs/x"))
    >>> model = esta.DeployedStitch.from_pretrained("runs/x/deployed/budget03")
"""

from .adapt import AdaptConfig, adapt
from .analysis import GradAngleConfig, grad_angles
from .bench import BenchConfig, run_bench
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
from .runs import load_run, redeploy
from .space import Stitch, StitchSpace, build_space
from .train import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "AdaptConfig", "adapt", "load_run", "redeploy",
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
