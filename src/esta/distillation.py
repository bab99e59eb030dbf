"""In-place distillation (ours, beyond the paper): a stitch learns from its own end anchor on the same batch.

After least squares a stitch is worse than the anchors it is made of, and the more of the end anchor it runs the
worse it gets; with the anchors frozen, nothing in PST adapts the end anchor's blocks to a stitched input. Slimmable
networks, BigNAS and OFA train their sub-networks against the largest network's detached outputs (in-place
distillation); here every stitch has a natural teacher that the palette already holds: the anchor whose head it ends
in, run with the current shared LoRA and head. Its soft targets say more per example than a label, which matters
when 71 networks share one training run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` averaged over the rows (examples, or tokens):
    Hinton's soft-target loss, whose gradient scale does not change with T. Zero when the two agree."""
    t = temperature
    log_p = F.log_softmax(teacher.detach().float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t
