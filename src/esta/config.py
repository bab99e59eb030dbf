"""The settings of a run (``RecipeConfig``, which each Task's config extends) and reading them from a file.

Below the recipe and the Tasks: both read it, it reads neither.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from .budget import CostAxis, parse_budgets
from .calibration import CalibrationConfig
from .errors import EstaError
from .families import MINI_FAMILY
from .importance import SamplingConfig
from .methods import get_method
from .pst import PSTConfig
from .selection import DEPLOY_RULES
from .train import TrainConfig

__all__ = ["RecipeConfig", "read_config_file", "DEPLOY_RULES"]


@dataclass
class RecipeConfig:
    """The settings every Task shares; each Task's config adds its own (see ``esta.tasks``)."""

    #: what the Task's budgets are measured in (set by each Task's config)
    axis: ClassVar[CostAxis | None] = None

    #: hub ids or local folders of the family, small to large (esta-mini: the shipped mini DeiT family)
    anchors: list[str] = field(default_factory=lambda: [MINI_FAMILY])
    #: the task: a built-in name, an image folder, a Hugging Face dataset, or Alpaca/ShareGPT records
    data: str = "animal-shapes"
    out_dir: str = "runs/demo"  # output folder
    #: esta, esta-uniform, esta-shared-bias, snnet (SN-Net direct adaptation), snnet-groups, anchors-lora (each
    #: anchor alone with LoRA) or linear-probe (each anchor's head on frozen features); see esta.methods
    method: str = "esta"
    kernel: int = 2  # stitching window size
    stride: int = 1  # stitching window stride
    pairing: str = "nearest"  # neighbours only ("nearest") or every pair ("all"; one depth: also routes via three)
    two_way: bool = False  # also stitch large -> small; two anchors, one as deep or a multiple: SN-Netv2's routes
    #: "per-window": the cuts of a window share one stitching layer (SN-Net); "per-cut": one layer per cut (ours;
    #: measured in esta.space)
    stitch_layers: str = "per-cut"
    #: stitching layers with an offset per token position where the family has fixed positions (ViT; ours;
    #: measured in esta.stitching); ignored by families without fixed positions (LLMs)
    stitch_offsets: bool = True
    #: stitching layers that give the first token the end anchor's own state at the cut (its attention sink; causal
    #: LMs; ours; measured in docs/llm.md); ignored by vision families
    stitch_first_token: bool = False
    #: end-anchor calibration of the stitching layers after least squares (ours; steps=0: off)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    pst: PSTConfig = field(default_factory=PSTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: budgets to deploy, in the Task's cost unit (GFLOPs for images, millions of parameters for LMs) or with a
    #: unit ("0.2GFLOPs", "300M"); none: one per budget group
    budgets: list[float | str] | None = None
    calibration_examples: int = 64  # training examples the stitching layers' least-squares fit sees
    #: how ESTA and its ablations pick one stitch per budget (the baselines always use validation): "validation"
    #: (the Task's held-out metric), "loss" (ours, one-stage: the lowest moving-average training loss) or
    #: "importance" (the paper's one-stage rule)
    deploy_by: str = "validation"
    validation_examples: int = 500  # held out, never trained on: what "validation" looks at
    resume: bool = False  # continue the run in the output folder from its checkpoint (same settings)
    overwrite: bool = False  # replace a run already in the output folder, whole
    progress: bool = True  # progress bars

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RecipeConfig":
        """The config a dict describes (e.g. ``run.json["config"]``); unknown keys are refused, missing ones keep
        their defaults."""
        def build(kind, values: dict, where: str, nested: dict | None = None, make=None):
            if not isinstance(values, dict):
                raise EstaError(f"config {where or 'file'}: expected a mapping, got {type(values).__name__}")
            unknown = sorted(set(values) - {f.name for f in fields(kind)})
            if unknown:
                raise EstaError(f"config {where or 'file'}: unknown settings {unknown}")
            kw = {k: (nested[k](v) if k in (nested or {}) else v) for k, v in values.items()}
            return make(kw) if make else kind(**kw)

        sampling = lambda v: build(SamplingConfig, v, "train.sampling")  # noqa: E731
        train_cfg = lambda v: build(TrainConfig, v, "train", {"sampling": sampling})  # noqa: E731
        pst = lambda v: build(PSTConfig, v, "pst", make=PSTConfig.from_dict)  # noqa: E731
        calibration = lambda v: build(CalibrationConfig, v, "calibration")  # noqa: E731
        return build(cls, d, "", {"train": train_cfg, "pst": pst, "calibration": calibration})

    @classmethod
    def from_file(cls, path: str | Path) -> "RecipeConfig":
        """A config from JSON or YAML: a run's ``run.json`` (its ``config``) replays that run."""
        return cls.from_dict(read_config_file(path)[0])

    def deploy_rule(self) -> str:
        """The baselines deploy by validation; ESTA and its ablations by ``deploy_by``."""
        method = get_method(self.method)
        return self.deploy_by if method.deploy_by == "importance" else method.deploy_by

    def check(self) -> None:
        """Everything that can be refused without loading a model or a dataset, refused here, before both."""
        get_method(self.method)
        for name, v in (("kernel", self.kernel), ("stride", self.stride),
                        ("calibration examples", self.calibration_examples)):
            if v < 1:
                raise EstaError(f"{name} must be at least 1, got {v}")
        if self.validation_examples < 0:
            raise EstaError(f"validation examples must be >= 0, got {self.validation_examples}")
        if self.deploy_by not in DEPLOY_RULES:
            raise EstaError(f"deploy_by must be one of {list(DEPLOY_RULES)}, got {self.deploy_by!r}")
        if self.deploy_rule() == "validation" and self.validation_examples < 1:
            raise EstaError(f"{self.method} deploys by validation: give --validation-examples >= 1")
        if self.budgets is not None:
            if self.axis is not None:
                parse_budgets(self.budgets, self.axis)  # refuses a malformed or non-positive budget
            if not self.budgets:
                raise EstaError("budgets: give at least one, or none for one per budget group")
        if self.stitch_layers not in ("per-window", "per-cut"):
            raise EstaError(f"stitch_layers must be 'per-window' or 'per-cut', got {self.stitch_layers!r}")
        self.calibration.check()
        self.pst.check()
        self.train.check()


def read_config_file(path: str | Path) -> tuple[dict, str | None]:
    """The settings in a JSON or YAML file, and the Task they belong to when the file says (a run's ``run.json``
    records its ``task_kind``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EstaError(f"cannot read config {path}: {e}") from e
    except Exception as e:  # yaml.YAMLError (yaml is imported only for YAML files)
        raise EstaError(f"cannot read config {path}: {' '.join(str(e).split())}") from e
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "space" in data:
        return data["config"], data.get("task_kind")  # a run.json
    return data, None
