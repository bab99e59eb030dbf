"""What every anchor exposes to esta: ``embed -> blocks -> head``, the same way for vision and language.

An :class:`Anchor` wraps the modules of one pretrained transformers model (references, never copies) and knows how
to run them piece by piece, so that a stitch can run the first blocks of one anchor and the last blocks of another.
An anchor can also be a *part* of a model: a deployed stitch keeps only the front anchor's embedding and first blocks
and the end anchor's last blocks and head; ``first_block`` says where the kept blocks start.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import EstaError


class Anchor(nn.Module):
    """One pretrained model of a family, seen as embed / blocks / head.

    Subclasses implement :meth:`embed`, :meth:`context`, :meth:`block`, :meth:`head` and :meth:`spec`.
    ``depth`` is the depth of the whole pretrained model even when this object holds only some of its blocks.
    """

    family: str = ""
    #: Linear layers that PST adapts with the shared LoRA when the user names none.
    default_lora_targets: tuple[str, ...] = ()
    #: what a forward takes: "image" (pixel values) or "text" (token ids). Serving, profiling, evaluation and export
    #: pick their way of feeding a network by this, never by the family's name, so a new family of an existing
    #: modality is one file and one registry entry
    modality: str = ""
    #: what a palette of this family is ranked by (a key of ``esta.results.METRICS``)
    score: str = "accuracy"

    def __init__(self, config: Any, blocks: nn.ModuleList, first_block: int = 0, source: str = "") -> None:
        super().__init__()
        self.config = config
        self.blocks = blocks
        self.first_block = first_block
        self.source = source

    # -- the pieces a stitch runs -------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)

    @property
    def fixed_tokens(self) -> int:
        """How many tokens every input has, each at its own fixed position (a ViT's [CLS] and patches), or 0 where
        inputs vary in length (LLMs): stitching layers can learn an offset per position only in the first case."""
        return 0

    def block_module(self, i: int) -> nn.Module:
        return self.blocks[i - self.first_block]

    def embed(self, inputs: Any) -> torch.Tensor:
        raise NotImplementedError

    def context(self, inputs: Any, hidden: torch.Tensor, first: int = 0) -> Any:
        """Whatever this anchor's blocks need beside the hidden states (masks, rotary tables, a KV cache), for a run
        that starts at block ``first`` (the end part of a stitch starts mid-way)."""
        return None

    def block(self, i: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def head(self, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def head_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the output layer reads from the last block's output (``[batch, width]`` for a summary token,
        ``[batch, tokens, width]`` per token): end-anchor calibration and feature distillation match these."""
        raise NotImplementedError

    def forward(self, inputs: Any) -> torch.Tensor:
        """The anchor alone, as pretrained (with its current head)."""
        h = self.embed(inputs)
        ctx = self.context(inputs, h)
        for i in range(self.depth):
            h = self.block(i, h, ctx)
        return self.head(h, ctx)

    @torch.no_grad()
    def hidden_states(self, inputs: Any) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The embedding output and every block's output (``depth + 1`` tensors), and a token mask or ``None``.

        The least-squares init of the stitching layers fits on these; the mask drops padding tokens.
        """
        h = self.embed(inputs)
        ctx = self.context(inputs, h)
        out = [h]
        for i in range(self.depth):
            h = self.block(i, h, ctx)
            out.append(h)
        return out, self.token_mask(inputs)

    def token_mask(self, inputs: Any) -> torch.Tensor | None:
        return None

    def token_weights(self, hidden: torch.Tensor, summary_weight: float) -> torch.Tensor | None:
        """Per-token weights ``[batch, tokens]`` for the least-squares fit of the stitching layers, or None (all
        equal). A family whose head reads one summary token (ViT's [CLS]) overrides this: see VisionAnchor."""
        return None

    def embed_modules(self) -> dict[str, nn.Module]:
        """The modules :meth:`embed` runs, by attribute name (empty in a part that has no embedding)."""
        raise NotImplementedError

    def head_modules(self) -> dict[str, nn.Module]:
        """The modules :meth:`head` runs, by attribute name (empty in a part that has no head)."""
        raise NotImplementedError

    def task_head(self) -> nn.Module | None:
        """The new, trainable output layer for the target task, or ``None`` when the head stays frozen."""
        return None

    # -- saving a part of this anchor inside a deployed stitch -------------------------------------------------
    def spec(self) -> dict:
        """JSON-able description from which :meth:`build_part` rebuilds a part of this anchor."""
        raise NotImplementedError

    @classmethod
    def build_part(cls, spec: dict, first_block: int, last_block: int, embed: bool, head: bool) -> "Anchor":
        """Empty modules for blocks ``first_block..last_block`` (and the embedding / head if asked), to load into."""
        raise NotImplementedError

    def init_buffers(self) -> None:
        """Rebuild the buffers a saved file does not hold (transformers' ``_init_weights`` calls this on load)."""

    # -- what a deployed stitch of this family carries for transformers and ONNX --------------------------------
    @classmethod
    def stitch_config(cls, parts: dict, esta_config: dict, classes: list[str] | None) -> Any:
        """The transformers config (``config.json``) of a deployed stitch whose front anchor is of this family;
        ``parts``: the fields every stitch config has (see ``esta.hf_config.StitchConfig``)."""
        raise NotImplementedError

    def write_processor_files(self, folder: Any, normalize: bool) -> list[str]:
        """Files a transformers user needs beside a deployed model (an image processor); the names written.
        ``normalize=False`` for a model that normalises inside (esta's own stitches)."""
        return []

    @classmethod
    def card_usage(cls, front_spec: dict, plain: bool) -> tuple[str, str, list[str]]:
        """For a deployed model's card: its ``pipeline_tag``, the transformers names to import, lines that use it."""
        raise NotImplementedError

    def onnx_io(self) -> "OnnxIO":
        """The inputs of an ONNX export of a deployed stitch that starts with this anchor."""
        raise NotImplementedError


@dataclass
class OnnxIO:
    """How an exported graph is fed: its input names, a traced example and another input to check the graph on,
    the dynamic dimensions, and how the graph's inputs become what a stitch's forward takes."""

    names: list[str]
    example: tuple[torch.Tensor, ...]
    check: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, Any]]
    shape: tuple  # what the docs show as the input's shape
    to_inputs: Callable[..., Any]
    #: which rows / positions of ``check``'s output mean something (padding does not), or None for all
    real: Any = None


def import_transformers_class(path: str) -> type:
    """Import a class named in a saved stitch, only from transformers: a saved file must never run other code."""
    module, _, name = path.rpartition(".")
    if not module.startswith("transformers.models."):
        raise EstaError(f"refusing to load class {path!r}: deployed stitches may only name transformers model classes")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise EstaError(f"class {path!r} named in the deployed stitch is not in this transformers version: {e}") from e


def class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def load_weights(source: str, load: Any) -> Any:
    """``load()`` (a transformers ``from_pretrained``), with a missing, truncated, corrupt or pickle-only
    checkpoint as one EstaError naming the source. Local folders are read with ``use_safetensors=True``: a
    pickled ``.bin`` is refused, never unpickled."""
    try:
        return load()
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise EstaError(f"cannot load the weights of {source!r} (missing, damaged or not safetensors): {first} "
                        f"(esta reads local folders only from model.safetensors)") from e
    except Exception as e:  # safetensors' own error type for a damaged file is not an OSError
        if type(e).__name__ == "SafetensorError":
            raise EstaError(f"anchor {source!r}: model.safetensors is damaged ({e})") from e
        raise


@dataclass(frozen=True)
class FamilyKind:
    """One kind of anchor family, as the registry (``esta.families.FAMILIES``) knows it: which transformers
    ``model_type`` values it takes, its Anchor class, how to load one anchor, and what every anchor of a family must
    share (checked before any weights are loaded)."""

    name: str  # "vision", "causal-lm"
    anchor_class: type
    model_types: tuple[str, ...]
    #: (source, config, num_labels, local, dtype) -> Anchor
    load: Callable[..., Anchor]
    #: (sources, configs) -> None, raising EstaError naming what differs
    check: Callable[[list[str], list[Any]], None] = lambda sources, configs: None
