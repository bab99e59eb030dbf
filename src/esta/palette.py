"""The stitched network: one module that runs any stitch of the space over shared anchors and stitching layers."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import EstaError
from .families.base import Anchor
from .pst import ActiveStitch, PSTConfig, StitchLinear, wrap_linears
from .space import Stitch, StitchSpace, build_space
from .stitch_fit import NormalEquations
from .stitching import init_least_squares, make_stitching_layers, with_first_state


def run_stitch(parts: Sequence[Anchor], layers: Sequence[nn.Module], stitch: Stitch, inputs: Any) -> torch.Tensor:
    """Embed with the first part, run each segment's blocks, map between segments, finish with the last one's head.

    ``parts``: the anchor (or deployed part) of each of ``stitch.segments``; ``layers``: the stitching layers between
    them. The one forward of a stitch, shared by the palette and by a deployed stitch, so the two agree by
    construction.
    """
    h = parts[0].embed(inputs)
    ctx = parts[0].context(inputs, h)
    for k, ((_, first, last), part) in enumerate(zip(stitch.segments, parts, strict=True)):
        if k:
            h = layers[k - 1](h)
            ctx = part.context(inputs, h, first)  # each anchor keeps its own masks / rotary tables / cache
            h = with_first_state(layers[k - 1], h, ctx)
        for i in range(first, part.depth if last is None else last + 1):
            h = part.block(i, h, ctx)
    return parts[-1].head(h, ctx)


class Palette(nn.Module):
    """Anchors + stitching layers + the stitch space; ``palette(inputs, stitch=k)`` runs stitch ``k``.

    ``stitch_layers``: one stitching layer per window (SN-Net) or per cut (ours); ``stitch_offsets``: stitching layers
    with an offset per token position, for families with fixed positions (ours; see ``esta.stitching``)."""

    def __init__(self, anchors: list[Anchor], space: StitchSpace | None = None, *, kernel: int = 2,
                 stride: int = 1, pairing: str = "nearest", two_way: bool = False,
                 stitch_layers: str = "per-window", stitch_offsets: bool = False,
                 first_token_state: bool = False) -> None:
        super().__init__()
        if len(anchors) < 2:
            raise EstaError(f"a palette needs two or more anchors, got {len(anchors)}")
        self.anchors = nn.ModuleList(anchors)
        depths = [a.depth for a in anchors]
        self.space = space or build_space(depths, kernel=kernel, stride=stride, pairing=pairing, two_way=two_way,
                                          stitch_layers=stitch_layers)
        if list(self.space.depths) != depths:
            raise EstaError(f"stitch space depths {list(self.space.depths)} do not match the anchors' {depths}")
        dtype = next(anchors[0].blocks.parameters()).dtype
        # an offset per token position (ours) only where every input has the same positions (ViT, not LLMs)
        tokens = anchors[0].fixed_tokens if stitch_offsets else 0
        # a first-token state (ours) only where the first token is an attention sink: causal LMs
        first = first_token_state and anchors[0].modality == "text"
        self.stitching = make_stitching_layers(self.space, [a.width for a in anchors], dtype, tokens, first)
        self.stitching.requires_grad_(False)
        self.active = ActiveStitch()
        self.pst: PSTConfig | None = None

    @classmethod
    def from_config(cls, anchors: list[Anchor], config: Any) -> "Palette":  # a RecipeConfig (no import: layers)
        """The palette a run's config describes (its stitch space and stitching layers), with no weights fitted:
        one place that reads those settings, for training, reloading a run and the benchmarks alike."""
        return cls(anchors, kernel=config.kernel, stride=config.stride, pairing=config.pairing,
                   two_way=config.two_way, stitch_layers=config.stitch_layers, stitch_offsets=config.stitch_offsets,
                   first_token_state=config.stitch_first_token)

    def __len__(self) -> int:
        return len(self.space)

    def forward(self, inputs: Any, stitch: int) -> torch.Tensor:
        s = self.space[stitch]
        parts = [self.anchors[a] for a, _, _ in s.segments]
        with self.active.running(stitch):  # this thread's stitch, for this forward only (pst.ActiveStitch)
            return run_stitch(parts, [self.stitching[k] for k in s.layer_keys], s, inputs)

    @torch.no_grad()
    def init_stitching(self, inputs: Any, ridge: float = 0.0, progress: bool = False,
                       summary_weight: float = 0.0, outliers: float = 0.0) -> None:
        """Least-squares init of every stitching layer on one calibration batch (``ridge``: see least_squares;
        ``summary_weight``: see ``Anchor.token_weights``; ``outliers``: see ``stitching.drop_outliers``)."""
        hidden, masks = zip(*(a.hidden_states(inputs) for a in self.anchors))
        weights = [a.token_weights(h[0], summary_weight) for a, h in zip(self.anchors, hidden)]
        init_least_squares(self.stitching, self.space, list(hidden), list(masks), ridge, progress, weights,
                           outliers)

    @torch.no_grad()
    def init_stitching_batches(self, batches: Sequence[Any], ridge: float = 0.0, progress: bool = False,
                               outliers: float = 0.0) -> None:
        """``init_stitching`` summed over several calibration batches (``stitch_fit``): as many calibration tokens
        as wanted, one batch of hidden states in memory at a time. Language families (no offsets, no weights)."""
        fit = NormalEquations(self.stitching, self.space, outliers)
        for inputs in tqdm(batches, desc="least-squares init", disable=not progress, leave=False):
            hidden, masks = zip(*(a.hidden_states(inputs) for a in self.anchors))
            fit.add(list(hidden), list(masks))
        fit.solve(ridge)

    def end_anchor_ids(self) -> list[int | None]:
        """For every stitch, the stitch id of the anchor whose head it ends in (None for the anchors themselves)."""
        anchor_of = {self.space[a].front: a for a in self.space.anchor_ids()}
        return [None if s.is_anchor else anchor_of[s.end] for s in self.space.stitches]

    # -- which parameters a stitch runs through -----------------------------------------------------------------
    def uses_block(self, s: Stitch, anchor: int, block: int) -> bool:
        return any(a == anchor and first <= block and (last is None or block <= last) for a, first, last in s.segments)

    def path_modules(self, stitch: int) -> Iterator[nn.Module]:
        s = self.space[stitch]
        segments = s.segments
        yield from self.anchors[segments[0][0]].embed_modules().values()
        for k, (a, first, last) in enumerate(segments):
            if k:
                yield self.stitching[s.layer_keys[k - 1]]
            anchor = self.anchors[a]
            for i in range(first, anchor.depth if last is None else last + 1):
                yield anchor.block_module(i)
        yield from self.anchors[segments[-1][0]].head_modules().values()

    def path_parameters(self, stitch: int) -> list[nn.Parameter]:
        """Trainable parameters on the stitch's path; of the stitch-specific biases, only its own."""
        seen: set[int] = set()
        out: list[nn.Parameter] = []
        for module in self.path_modules(stitch):
            others = set()
            for sub in module.modules():
                if isinstance(sub, StitchLinear):
                    own = sub.own_bias(stitch)
                    others |= {id(p) for p in sub.stitch_bias.values() if p is not own}
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen and id(p) not in others:
                    seen.add(id(p))
                    out.append(p)
        return out

    # -- PST ----------------------------------------------------------------------------------------------------
    def apply_pst(self, config: PSTConfig) -> None:
        """Make the palette trainable as ``config`` says; call once, after :meth:`init_stitching`."""
        if self.pst is not None:
            raise EstaError("PST was already applied to this palette")
        self.pst = config
        self.requires_grad_(False)
        for anchor in self.anchors:
            if anchor.task_head() is not None:  # a new task head always trains (an LLM's LM head does not)
                anchor.task_head().requires_grad_(True)
        if config.full_finetune:
            self.requires_grad_(True)
            return
        for a, anchor in enumerate(self.anchors):
            targets = config.lora_targets or anchor.default_lora_targets
            for i in range(anchor.depth):
                users = [s.id for s in self.space.stitches if self.uses_block(s, a, i)]
                if not wrap_linears(anchor.block_module(i), targets, config.lora_rank, config.lora_alpha,
                                    self.active, users, config.bias, config.no_bias_targets):
                    raise EstaError(f"anchor {a} block {i} has no linear layer named any of {list(targets)}")
        for key in list(self.stitching.keys()):
            users = [s.id for s in self.space.users_of_layer(key)]
            self.stitching[key] = StitchLinear(self.stitching[key], config.stitch_lora_rank,
                                               config.stitch_lora_alpha, self.active, users, config.bias)

    def adaptation_state(self) -> dict[str, torch.Tensor]:
        """Everything training produced or fitted: trainable tensors and the (frozen) least-squares stitching
        layers. With the pretrained anchors, this is all a checkpoint needs to rebuild the palette."""
        return {n: p.detach().contiguous().clone() for n, p in self.named_parameters()
                if p.requires_grad or n.startswith("stitching.")}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
