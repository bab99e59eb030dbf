"""Gradient-angle analysis (the paper's Fig. 2): do stitches agree on how to move the weights they share?

For a set of stitches, take each one's gradient of the task loss on one fixed batch with respect to the anchors'
weights (SN-Net's view: everything trainable), and for every pair the angle between the two gradients restricted
to the parameters both stitches run through. On the source task the anchors were trained for, stitches mostly
agree; on a new task they pull shared weights apart (angles near or past 90°), which is the motivation for PST's
low-rank shared update and stitch-specific biases.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import load_image_task, stratified_split
from .errors import EstaError
from .families import MINI_FAMILY, load_family
from .palette import Palette
from .pst import PSTConfig


@dataclass
class GradAngleConfig:
    anchors: list[str] = field(default_factory=lambda: [MINI_FAMILY])
    source: str = "fashion-mnist"  # the anchors' own task: their pretrained classifiers are kept
    target: str = "animal-shapes"  # a new task: new task heads
    stitches: int = 24  # evenly spaced over the palette's stitch ids (every anchor pair, anchors included)
    batch: int = 128
    seed: int = 0
    out_dir: str = "runs/grad-angles"
    cache_dir: str | None = None
    progress: bool = True


def stitch_gradients(palette: Palette, images: torch.Tensor, labels: torch.Tensor,
                     stitches: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Per stitch: parameter name -> gradient of the cross-entropy on (images, labels), for every weight it runs."""
    names = {id(p): n for n, p in palette.named_parameters()}
    out = {}
    for s in stitches:
        palette.zero_grad(set_to_none=True)
        F.cross_entropy(palette(images, stitch=s), labels).backward()
        out[s] = {names[id(p)]: p.grad.detach().clone() for p in palette.path_parameters(s) if p.grad is not None}
    palette.zero_grad(set_to_none=True)
    return out


def pairwise_angles(grads: dict[int, dict[str, torch.Tensor]], min_shared: int = 1) -> list[float]:
    """Angle in degrees between every two stitches' gradients on the parameters they share."""
    ids = sorted(grads)
    angles = []
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            shared = grads[a].keys() & grads[b].keys()
            if len(shared) < min_shared:
                continue
            dot = sum(float((grads[a][k].double() * grads[b][k].double()).sum()) for k in shared)
            na = math.sqrt(sum(float(grads[a][k].double().square().sum()) for k in shared))
            nb = math.sqrt(sum(float(grads[b][k].double().square().sum()) for k in shared))
            if na > 0 and nb > 0:
                angles.append(math.degrees(math.acos(max(-1.0, min(1.0, dot / (na * nb))))))
    return angles


def _summary(angles: list[float]) -> dict:
    t = torch.tensor(angles, dtype=torch.float64)
    return {"pairs": len(angles), "mean_deg": float(t.mean()), "median_deg": float(t.median()),
            "fraction_over_90": float((t > 90).double().mean()), "fraction_over_60": float((t > 60).double().mean())}


def grad_angles(cfg: GradAngleConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": asdict(cfg), "tasks": {}}
    all_angles = {}
    for role, task_name in (("source", cfg.source), ("target", cfg.target)):
        torch.manual_seed(cfg.seed)
        anchors = load_family(cfg.anchors, num_labels=None)  # pretrained classifiers: the source task's heads
        task = load_image_task(task_name, image_size=anchors[0].image_size, num_channels=anchors[0].num_channels,
                               cache_dir=cfg.cache_dir, seed=cfg.seed)
        if role == "target":
            for a in anchors:
                a.new_task_head(len(task.classes))
        elif anchors[0].num_labels != len(task.classes):
            raise EstaError(f"the anchors' classifiers have {anchors[0].num_labels} classes but the source task "
                             f"{task_name!r} has {len(task.classes)}")
        idx = stratified_split(task.train.labels, min(cfg.batch, len(task.train)), cfg.seed)[0]
        items = [task.train[int(i)] for i in idx]
        images, labels = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
        palette = Palette(anchors)
        palette.init_stitching(images[:64])
        palette.apply_pst(PSTConfig(full_finetune=True))
        palette.eval()  # no dropout: the gradients of one batch, deterministic
        order = list(range(len(palette)))
        k = min(cfg.stitches, len(order))
        chosen = sorted({order[round(i * (len(order) - 1) / max(1, k - 1))] for i in range(k)})
        grads = stitch_gradients(palette, images, labels,
                                 list(tqdm(chosen, desc=f"gradients on {task_name}", disable=not cfg.progress)))
        angles = pairwise_angles(grads)
        all_angles[role] = angles
        results["tasks"][role] = {"task": task_name, "stitches": chosen, **_summary(angles), "angles": angles}
    (out / "grad_angles.json").write_text(json.dumps(results, indent=1))
    _histogram(all_angles, results, out / "grad_angles.png")
    return results


def _histogram(angles: dict[str, list[float]], results: dict, path: Path) -> None:
    from matplotlib.figure import (
        Figure,  # object API: no backend switch (see report.py)
    )

    fig = Figure(figsize=(6.5, 4), dpi=120)
    ax = fig.subplots()
    bins = list(range(0, 181, 5))
    for role, colour in (("source", "tab:blue"), ("target", "crimson")):
        r = results["tasks"][role]
        ax.hist(angles[role], bins=bins, alpha=0.55, color=colour, density=True,
                label=f"{role}: {r['task']} (mean {r['mean_deg']:.0f}°, {100 * r['fraction_over_90']:.0f}% > 90°)")
    ax.axvline(90, color="black", lw=0.8, ls="--")
    ax.set_xlabel("angle between two stitches' gradients on shared weights (degrees)")
    ax.set_ylabel("density")
    ax.set_title("gradient conflicts between stitches")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
