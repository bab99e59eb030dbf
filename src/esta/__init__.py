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

import importlib

from ._register import install as _install_auto_classes

__version__ = "0.1.0"

# AutoModelForImageClassification / AutoModelForCausalLM / AutoConfig / pipeline read deployed stitches once esta is
# imported (registered when transformers' Auto classes load; nothing heavy is imported here)
_install_auto_classes()

#: what ``esta.X`` is, imported on first use: ``import esta`` itself loads nothing heavy (no torch, transformers or
#: matplotlib until a name is used), so the command line starts fast and importing esta has no side effects
_LAZY = {
    "GradAngleConfig": ".analysis",
    "grad_angles": ".analysis",
    "BenchConfig": ".bench",
    "run_bench": ".bench",
    "Budget": ".budget",
    "CostAxis": ".budget",
    "StitchCost": ".cost",
    "count_costs": ".cost",
    "DeployedStitch": ".deploy",
    "StitchForImageClassification": ".hf_native",
    "StitchForCausalLM": ".hf_native",
    "choose": ".selection",
    "EstaError": ".errors",
    "accuracy": ".evaluate",
    "sweep": ".evaluate",
    "Anchor": ".families",
    "VisionAnchor": ".families",
    "load_anchor": ".families",
    "load_family": ".families",
    "ImportanceSampler": ".importance",
    "SamplingConfig": ".importance",
    "budget_groups": ".importance",
    "snip_score": ".importance",
    "METHODS": ".methods",
    "Method": ".methods",
    "get_method": ".methods",
    "Palette": ".palette",
    "run_stitch": ".palette",
    "fit_probe": ".probe",
    "probe_head": ".probe",
    "PSTConfig": ".pst",
    "StitchLinear": ".pst",
    "RecipeConfig": ".recipe",
    "run": ".recipe",
    "Metric": ".results",
    "Point": ".results",
    "RunResults": ".results",
    "load_run": ".runs",
    "redeploy": ".runs",
    "Stitch": ".space",
    "StitchSpace": ".space",
    "build_space": ".space",
    "TASKS": ".tasks",
    "AdaptConfig": ".tasks",
    "LMAdaptConfig": ".tasks",
    "Task": ".tasks",
    "adapt": ".tasks.image_classification",
    "adapt_lm": ".tasks.instruction_tuning",
    "TrainConfig": ".train",
    "TrainResult": ".train",
    "train": ".train",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # resolved once
        return value
    try:  # a submodule, e.g. esta.data
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'esta' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
