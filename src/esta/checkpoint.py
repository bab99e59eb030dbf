"""Training checkpoints: what training changed (never the pretrained anchors), in formats that cannot run code.

The adaptation state (trainable tensors and the least-squares stitching layers) and the sampler's tensors go to
safetensors; the optimizer and scheduler states (nested dicts of
tensors and numbers) go through ``torch.save`` and come back with ``torch.load(weights_only=True)``; the step and
configuration are JSON. Files are written to a temporary folder that replaces the old one only once complete, so a
crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import EstaError
from .palette import Palette


def save_checkpoint(folder: Path, model: Palette, optimizer: Any, scheduler: Any, sampler_state: dict,
                    meta: dict) -> None:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model.adaptation_state(), str(tmp / "adaptation.safetensors"))
    tensors = {k: v for k, v in sampler_state.items() if isinstance(v, torch.Tensor)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "sampler.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_adaptation(folder: Path, model: Palette) -> dict:
    """Put a checkpoint's adaptation state into ``model`` (same anchors, same PST); return its meta."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise EstaError(f"no checkpoint in {folder}")
    state = load_file(str(folder / "adaptation.safetensors"))
    params = dict(model.named_parameters())
    expected = model.adaptation_state().keys()
    missing = [n for n in expected if n not in state]
    unknown = [n for n in state if n not in expected]
    if missing or unknown:
        raise EstaError(f"checkpoint {folder} does not match this palette: {len(missing)} tensors missing, "
                        f"{len(unknown)} unknown (e.g. {(missing or unknown)[0]})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    return json.loads((folder / "state.json").read_text())


def load_sampler_state(folder: Path) -> dict:
    return load_file(str(Path(folder) / "sampler.safetensors"))


def load_checkpoint(folder: Path, model: Palette, optimizer: Any, scheduler: Any) -> tuple[dict, dict]:
    """Restore model/optimizer/scheduler in place to resume training; return (sampler tensors, meta)."""
    meta = load_adaptation(folder, model)
    optim = torch.load(Path(folder) / "optim.pt", weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    return load_sampler_state(folder), meta
