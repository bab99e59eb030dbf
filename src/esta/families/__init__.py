"""Load a family of anchors (hub ids or local folders) and check that they can be stitched."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig

from ..errors import EstaError
from . import causal_lm, vision
from .base import Anchor, FamilyKind
from .causal_lm import CausalLMAnchor, convert_gguf
from .timm_checkpoints import convert_timm, is_timm
from .vision import VisionAnchor

#: every kind of family esta can stitch: loading, the CLI and deployment all look here. A new kind is one file
#: (an Anchor subclass and its ``FAMILY``) and one entry below.
FAMILIES: dict[str, FamilyKind] = {f.name: f for f in (vision.FAMILY, causal_lm.FAMILY)}


def anchor_class(family: str) -> type[Anchor]:
    """The Anchor class of a family kind (e.g. to rebuild a deployed stitch's parts)."""
    if family not in FAMILIES:
        raise EstaError(f"unknown anchor family {family!r}; esta knows {', '.join(FAMILIES)}")
    return FAMILIES[family].anchor_class

__all__ = ["Anchor", "VisionAnchor", "CausalLMAnchor", "FAMILIES", "FamilyKind", "anchor_class", "load_anchor",
           "load_family", "family_kind", "MINI_FAMILY",
           "mini_family_paths", "anchor_names", "source_kind"]

#: esta's own pretrained mini DeiT family (Fashion-MNIST), shipped inside the package.
MINI_FAMILY = "esta-mini"
_MINI_NAMES = ("mini-deit-ti", "mini-deit-s", "mini-deit-b")


def mini_family_paths() -> list[str]:
    root = Path(__file__).resolve().parent.parent / "pretrained"
    return [str(root / n) for n in _MINI_NAMES]


_SIZE_WORDS = {"ti": "Ti", "tiny": "Ti", "s": "S", "small": "S", "b": "B", "base": "B", "l": "L", "large": "L",
               "h": "H", "huge": "H"}


def anchor_names(sources: list[str]) -> list[str]:
    """Short names for plots and tables: DeiT/ViT size words (``mini-deit-ti`` -> ``Ti``, ``deit-small-patch16``
    -> ``S``) or parameter counts (``Qwen2.5-0.5B-Instruct`` -> ``0.5B``) when every anchor has a distinct one, else
    the folder or hub names."""
    # esta's own caches add "-<16 hex digits>" to a converted model's folder (GGUF, timm): not part of its name
    bases = [re.sub(r"-[0-9a-f]{16}$", "", Path(s.rstrip("/")).name or s) for s in sources]
    sizes = []
    for b in bases:
        words = [w for w in re.split(r"[-_.]", b.lower()) if w in _SIZE_WORDS]
        sizes.append(_SIZE_WORDS[words[-1]] if words else None)
    if None not in sizes and len(set(sizes)) == len(sizes):
        return sizes
    # language models name their size in parameters: "qwen2.5-coder-0.5b-instruct" -> "0.5B"
    counts = [re.findall(r"(?:^|[-_])(\d+(?:\.\d+)?[bm])(?=$|[-_])", b.lower()) for b in bases]
    if all(counts) and len({c[-1] for c in counts}) == len(counts):
        return [c[-1].upper() for c in counts]
    return bases


def _config(source: str) -> tuple[object, bool]:
    local = Path(source).exists()
    # A hub id is "name" or "org/name"; anything else that is not on disk is a missing folder.
    if not local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise EstaError(f"anchor folder {source!r} does not exist")
    if local and not (Path(source) / "config.json").is_file():
        raise EstaError(f"anchor folder {source!r} has no config.json (expected a transformers checkpoint folder)")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot find/read this model"
        where = "folder" if local else "hub id (no such local folder; is the model hub reachable?)"
        raise EstaError(f"cannot load anchor {source!r} as a {where}: {' '.join(str(e).split())}") from e
    return config, local


def family_kind(config: object) -> str:
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family.name
    known = "; ".join(f"{f.name}: {', '.join(sorted(f.model_types))}" for f in FAMILIES.values())
    raise EstaError(f"model type {model_type or '?'!r} is not supported as an anchor ({known})")


def source_kind(source: str) -> str:
    """The family kind of one anchor source ("vision" or "causal-lm"), from its config alone (no weights)."""
    if source == MINI_FAMILY:
        return "vision"
    if source.endswith(".gguf"):
        return "causal-lm"
    if is_timm(source):
        return "vision"
    return family_kind(_config(source)[0])


@contextmanager
def quiet_transformers():
    """Silence transformers' load reports and weight-loading bars while esta loads anchors (expected: a base model
    loaded from a classification checkpoint drops its classifier), then restore the user's settings."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_anchor(source: str, num_labels: int | None = None, dtype: torch.dtype = torch.float32) -> Anchor:
    config, local = _config(source)
    with quiet_transformers():
        return FAMILIES[family_kind(config)].load(source, config, num_labels, local, dtype)


def load_family(sources: list[str] | str, num_labels: int | None = None,
                dtype: torch.dtype = torch.float32) -> list[Anchor]:
    """Anchors sorted from small to large, after checking that they can be stitched.

    ``sources``: hub ids / folders, or ``"esta-mini"`` for the shipped mini DeiT family. Vision anchors must agree on
    image size, patch size, channels and the number of prefix tokens; anything else is refused naming the mismatch.
    """
    if isinstance(sources, str):
        sources = mini_family_paths() if sources == MINI_FAMILY else [sources]
    sources = [s for part in sources for s in (mini_family_paths() if part == MINI_FAMILY else [part])]
    # once, then cached as transformers folders: GGUF files, timm checkpoints
    sources = [convert_gguf(s) if s.endswith(".gguf") else convert_timm(s) if is_timm(s) else s for s in sources]
    if len(sources) < 2:
        raise EstaError(f"a family needs two or more anchors, got {len(sources)}")
    configs = [_config(s)[0] for s in sources]  # check every source before loading any weights
    kinds = {family_kind(c) for c in configs}
    if len(kinds) > 1:
        raise EstaError(f"cannot stitch anchors of different kinds: {sorted(kinds)}")
    FAMILIES[kinds.pop()].check(sources, configs)
    anchors = [load_anchor(s, num_labels, dtype) for s in sources]
    return sorted(anchors, key=lambda a: sum(p.numel() for p in a.blocks.parameters()))
