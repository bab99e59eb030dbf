"""PST, parameter-efficient stitch fine-tuning: shared LoRA plus stitch-specific biases, merged away at deployment.

Every adapted linear layer (the attention projections of every anchor block, and every stitching layer) becomes a
:class:`StitchLinear`: the frozen pretrained (or least-squares) weight, one low-rank update shared by every stitch
that runs the layer, and one bias vector per stitch, of which only the active stitch's is used. Each stitch's bias is
its own ``nn.Parameter``, so a step of stitch *s* leaves every other stitch's bias untouched: parameters that took no
part in the forward get no gradient, and torch optimizers skip parameters whose ``.grad`` is ``None``.

We write this layer rather than use PEFT's ``LoraLayer`` because PEFT has no notion of an active stitch selecting a
bias; the split follows PEFT's (config / layer / injection) and adaptation state lives beside the frozen weight.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EstaError

BiasMode = Literal["per-stitch", "shared", "none"]


@dataclass
class PSTConfig:
    """What PST adapts. Defaults are docs/method.md's (rank 8 / alpha 16 on q/k/v; rank 16 on stitching layers)."""

    lora_rank: int = 8  # LoRA rank on the blocks
    lora_alpha: float = 16.0  # LoRA alpha on the blocks
    #: names of the linear layers inside each block to adapt; empty = the family's default (q/k/v projections)
    lora_targets: tuple[str, ...] = ()
    stitch_lora_rank: int = 16  # LoRA rank on the stitching layers
    stitch_lora_alpha: float = 16.0  # LoRA alpha on the stitching layers
    #: "per-stitch" (ESTA), "shared" (one bias for all stitches: the ablation), "none"
    bias: BiasMode = "per-stitch"
    # a bias on the keys adds ``q.b`` to every score of query ``q``, which the softmax cancels, so its gradient is
    # exactly zero and Adam would only random-walk float noise into it
    #: targets that get no stitch-specific bias
    no_bias_targets: tuple[str, ...] = ("k_proj", "key")
    #: SN-Net direct adaptation: no LoRA, no biases; anchors and stitching layers are fully trainable
    full_finetune: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PSTConfig":
        """The config :meth:`to_dict` wrote, back from JSON (where its tuples became lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def check(self) -> None:
        if self.full_finetune:
            return
        if self.lora_rank < 1 or self.stitch_lora_rank < 1:
            raise EstaError(f"LoRA ranks must be at least 1, got {self.lora_rank} (blocks) and "
                            f"{self.stitch_lora_rank} (stitching layers)")
        for name, v in (("lora_alpha", self.lora_alpha), ("stitch_lora_alpha", self.stitch_lora_alpha)):
            if not (math.isfinite(v) and v > 0):
                raise EstaError(f"{name} must be a positive number, got {v:g}")
        if self.bias not in ("per-stitch", "shared", "none"):
            raise EstaError(f"bias must be 'per-stitch', 'shared' or 'none', got {self.bias!r}")


class ActiveStitch:
    """The stitch a palette is running, which every :class:`StitchLinear` reads to pick its bias.

    It lives in a context variable, so each thread (and each asyncio task) has its own: two threads can run two
    stitches of one palette at once, and a forward in a thread that selected no stitch fails loudly instead of
    silently running the last stitch another forward selected. ``Palette.forward(x, stitch=k)`` selects ``k`` for
    the duration of the forward (:meth:`running`) and restores what was selected before.
    """

    def __init__(self, id: int | None = None) -> None:
        self._var: contextvars.ContextVar[int | None] = contextvars.ContextVar("esta_active_stitch", default=None)
        if id is not None:
            self._var.set(id)

    @property
    def id(self) -> int:
        stitch = self._var.get()
        if stitch is None:
            raise EstaError("no stitch is selected in this thread: run the palette as palette(x, stitch=k)")
        return stitch

    @id.setter
    def id(self, stitch: int) -> None:
        self._var.set(stitch)

    @contextlib.contextmanager
    def running(self, stitch: int) -> Iterator[None]:
        token = self._var.set(stitch)
        try:
            yield
        finally:
            self._var.reset(token)

    def __deepcopy__(self, memo: dict) -> "ActiveStitch":  # a context variable cannot be copied: a fresh one
        return ActiveStitch()


class StitchLinear(nn.Module):
    """``y = W x + b + (alpha/r) B A x + bias[active stitch]`` with ``W, b`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, active: ActiveStitch,
                 stitch_ids: Iterable[int], bias: BiasMode = "per-stitch") -> None:
        super().__init__()
        if rank < 1:
            raise EstaError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        # Adapters train in float32 even over bf16/fp16 weights: AdamW steps of ~lr are below bf16's resolution
        # for weights of LoRA A's size, so a bf16 A would barely move. Only the rank-r branch pays for the cast.
        device = base.weight.device
        dtype = torch.float32 if base.weight.dtype in (torch.bfloat16, torch.float16) else base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRA/PEFT: B = 0 so the start is the base model
        self.scaling = alpha / rank
        self.bias_mode = bias
        keys = {"per-stitch": [str(s) for s in stitch_ids], "shared": ["shared"], "none": []}[bias]
        self.stitch_bias = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(base.out_features, dtype=dtype, device=device)) for k in keys}
        )
        self.active = active  # a plain attribute, shared with the palette: not a submodule, not saved
        self.lora_folded = False  # True once fold_lora_() has put the low-rank update into the frozen weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def own_bias(self, stitch: int) -> nn.Parameter | None:
        """The bias of ``stitch`` (None where this layer has no biases). A stitch that does not run this layer has
        none: running it here is a bug in the caller (e.g. no stitch selected), so it raises instead of silently
        running without the bias."""
        if self.bias_mode == "none":
            return None
        key = "shared" if self.bias_mode == "shared" else str(stitch)
        if key not in self.stitch_bias:
            raise EstaError(f"stitch {stitch} does not run this layer (no stitch selected, or a stitch from another "
                            f"palette): select one with palette(x, stitch=...)")
        return self.stitch_bias[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own = self.own_bias(self.active.id)
        if self.lora_folded:  # a served palette: the shared update is in the weight, only the stitch's bias differs
            bias = self.base.bias
            if own is not None:  # folded into the layer's bias: a vector add, not a pass over every token
                own = own.to(self.base.weight.dtype)
                bias = own if bias is None else bias + own
            return self._offset(F.linear(x, self.base.weight, bias))
        if x.dtype != self.lora_A.dtype:  # bf16/fp16 frozen weights, float32 adapters (LLMs)
            y = self.base(x)
            delta = (x.to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
            if own is not None:
                delta = delta + own
            return y + delta.to(y.dtype)
        # One dtype: fold the stitch's bias into the frozen layer's bias (a vector add instead of a pass over every
        # token) and accumulate the low-rank branch into the output in place (addmm_), with the scaling folded into
        # the small B. Measured on 2 CPU cores, the separate passes (scale, add bias, add branch) cost as much as
        # the rank-8 matmuls themselves.
        bias = self.base.bias
        if own is not None:
            bias = own if bias is None else bias + own
        y = F.linear(x, self.base.weight, bias)
        flat = y.view(-1, y.shape[-1])
        flat.addmm_(F.linear(x, self.lora_A).view(-1, self.lora_A.shape[0]), (self.lora_B * self.scaling).t())
        return self._offset(y)

    def _offset(self, y: torch.Tensor) -> torch.Tensor:
        """A stitching layer's frozen per-position offset (``StitchingLayer``), where it has one."""
        add = getattr(self.base, "add_offset", None)
        return add(y) if add is not None else y

    @torch.no_grad()
    def fold_lora_(self) -> None:
        """Put the shared low-rank update into the frozen weight, for every stitch at once (it is the same for all
        of them; only the biases are per stitch), and stop computing the branch. For serving, not training."""
        if not self.lora_folded:
            w = self.base.weight.to(self.lora_A.dtype) + (self.lora_B @ self.lora_A) * self.scaling
            self.base.weight.copy_(w.to(self.base.weight.dtype))
            self.lora_B.zero_()
            self.lora_folded = True

    @torch.no_grad()
    def merged(self, stitch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain weight and bias of this layer for one stitch: what a deployed stitch holds."""
        dtype = self.base.weight.dtype
        w = self.base.weight.to(self.lora_A.dtype) + (self.lora_B @ self.lora_A) * self.scaling
        b = self.base.bias.to(w.dtype) if self.base.bias is not None else torch.zeros_like(w[:, 0])
        own = self.own_bias(stitch)
        return w.to(dtype), (b if own is None else b + own).to(dtype)


def wrap_linears(module: nn.Module, targets: Iterable[str], rank: int, alpha: float, active: ActiveStitch,
                 stitch_ids: Iterable[int], bias: BiasMode, no_bias: Iterable[str] = ()) -> list[StitchLinear]:
    """Replace every ``nn.Linear`` under ``module`` whose attribute name is in ``targets`` by a StitchLinear."""
    targets, stitch_ids, no_bias = set(targets), list(stitch_ids), set(no_bias)
    wrapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                layer = StitchLinear(child, rank, alpha, active, stitch_ids, "none" if name in no_bias else bias)
                setattr(parent, name, layer)
                wrapped.append(layer)
    return wrapped


def plain_state_dict(module: nn.Module, stitch: int) -> dict[str, torch.Tensor]:
    """``module``'s state as the plain (unadapted) module class expects it, with LoRA and ``stitch``'s biases merged.

    Each ``StitchLinear`` at ``prefix`` becomes ``prefix.weight`` / ``prefix.bias``; everything else is copied.
    """
    out: dict[str, torch.Tensor] = {}
    wrapped = {name: m for name, m in module.named_modules() if isinstance(m, StitchLinear)}
    for name, m in wrapped.items():
        w, b = m.merged(stitch)
        out[f"{name}.weight" if name else "weight"] = w.detach().clone()
        out[f"{name}.bias" if name else "bias"] = b.detach().clone()
        for extra in ("offset", "first_state"):  # a stitching layer's per-position offset / first-token state
            if getattr(m.base, extra, None) is not None:
                out[f"{name}.{extra}" if name else extra] = getattr(m.base, extra).detach().clone()
    inside = tuple(f"{n}." for n in wrapped if n) if "" not in wrapped else ("",)
    for key, value in module.state_dict().items():
        if not key.startswith(inside):
            out[key] = value.detach().clone()
    return out
