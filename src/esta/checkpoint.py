"""Training checkpoints: only the trainable state, in formats that never unpickle arbitrary objects.

Trainable parameters and sampler tensors go to safetensors; the optimizer and scheduler states (nested dicts of
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
from torch import nn

from .errors import EstaError


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, sampler_state: dict,
                    meta: dict) -> None:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
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


def load_checkpoint(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> tuple[dict, dict]:
    """Restore model/optimizer/scheduler in place; return (sampler tensors, meta)."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise EstaError(f"no checkpoint to resume from in {folder}")
    state = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise EstaError(f"checkpoint {folder} does not match this palette: {len(missing)} trainable tensors "
                        f"missing, {len(unknown)} unknown (e.g. {(missing or unknown)[0]})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    optim = torch.load(folder / "optim.pt", weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    return load_file(str(folder / "sampler.safetensors")), json.loads((folder / "state.json").read_text())
