"""The ways esta can adapt a palette: ESTA, its ablations, and the baselines it is measured against.

Every method is a recipe over the same trainer (``train.train``): what PST adapts, how stitches are sampled, which
stitches train, and how one stitch is picked per budget. Keeping them in one table means a baseline gets exactly
the same data pipeline, schedule, seeds and evaluation as ESTA; only the listed differences change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .errors import EstaError
from .importance import SamplingConfig
from .pst import BiasMode, PSTConfig

DeployBy = Literal["importance", "validation"]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    full_finetune: bool = False  # anchors and stitching layers trainable (SN-Net), instead of PST
    bias: BiasMode = "per-stitch"  # PST's bias terms
    uniform_sampling: bool = False  # ignore importance when sampling inside a budget group
    by_group: bool = True  # False: one uniform draw over all stitches (SN-Net's sampler)
    anchor_share: bool = True  # keep the anchors' share of steps (ours); SN-Net's sampler has none
    train: bool = True  # False: only the new heads are fitted (linear probe), no palette step
    anchors_only: bool = False  # train only the anchors, each on its own (its own LoRA and task head)
    #: "importance": one-stage deployment (ESTA). "validation": evaluate every candidate on held-out data and keep
    #: the best per budget (SN-Net's sweep; for anchors-only, the anchors that fit the budget)
    deploy_by: DeployBy = "importance"
    lr: float = 2e-3  # default learning rate (the bench sweeps it per method)

    def pst(self, base: PSTConfig) -> PSTConfig:
        return replace(base, full_finetune=self.full_finetune, bias=self.bias)

    def sampling(self, base: SamplingConfig) -> SamplingConfig:
        return replace(base, uniform=base.uniform or self.uniform_sampling, by_group=base.by_group and self.by_group,
                       anchor_share=base.anchor_share if self.anchor_share else 0.0)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("esta", "ESTA: PST (shared LoRA + stitch-specific biases), importance sampling, deploy by importance"),
    Method("esta-uniform", "ESTA with uniform stitch sampling (ablation)", uniform_sampling=True),
    Method("esta-shared-bias", "ESTA without stitch-specific biases: one bias shared by all stitches (ablation)",
           bias="shared"),
    Method("snnet", "SN-Net direct adaptation: anchors and stitching layers fully fine-tuned, one stitch drawn "
           "uniformly among all at every step (as SN-Net's training loop), deploy by a sweep on held-out data",
           full_finetune=True, uniform_sampling=True, by_group=False, anchor_share=False, deploy_by="validation",
           lr=1e-4),
    Method("snnet-groups", "SN-Net direct adaptation with SN-Netv2's sampler: a budget group uniformly, then a "
           "stitch uniformly inside it", full_finetune=True, uniform_sampling=True, anchor_share=False,
           deploy_by="validation", lr=1e-4),
    Method("anchors-lora", "each anchor fine-tuned alone with LoRA; a budget gets the best anchor that fits",
           anchors_only=True, uniform_sampling=True, deploy_by="validation"),
    Method("linear-probe", "each anchor's new head fitted on its frozen features, nothing else trained; a budget "
           "gets the best anchor that fits", anchors_only=True, train=False, deploy_by="validation"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise EstaError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
