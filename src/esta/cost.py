"""What every stitch costs: FLOPs counted by ``torch.utils.flop_counter`` and parameters of its deployed form.

Counted on the palette before PST is applied, i.e. on exactly the plain layers a deployed stitch runs (merged LoRA
adds no work). FLOPs are per example, 2 per multiply-add, as the counter reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .palette import Palette


@dataclass(frozen=True)
class StitchCost:
    flops: int  # per example
    params: int


def stitch_params(palette: Palette, stitch: int) -> int:
    seen: set[int] = set()
    total = 0
    for module in palette.path_modules(stitch):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


@torch.no_grad()
def count_costs(palette: Palette, example: Any, progress: bool = True) -> list[StitchCost]:
    """FLOPs (for one example: batch size 1) and parameters of every stitch."""
    if palette.pst is not None:
        raise RuntimeError("count costs before PST: LoRA side branches are not part of a deployed stitch")
    was_training = palette.training
    palette.eval()
    out = []
    for sid in tqdm(range(len(palette)), desc="counting FLOPs", disable=not progress, leave=False):
        with FlopCounterMode(display=False) as counter:
            palette(example, stitch=sid)
        out.append(StitchCost(int(counter.get_total_flops()), stitch_params(palette, sid)))
    palette.train(was_training)
    return out
