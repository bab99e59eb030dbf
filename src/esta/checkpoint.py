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
from .files import replace_dir
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
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))  # last: its presence marks a complete checkpoint
    replace_dir(tmp, folder)


def _read(path: Path, load: Any) -> Any:
    """``load(path)``, with a missing or corrupt file (truncated, not the format) as one EstaError naming it."""
    if not path.is_file():
        raise EstaError(f"checkpoint file {path} is missing: the checkpoint is incomplete; start the run again "
                        f"with --overwrite")
    try:
        return load(path)
    except Exception as e:  # safetensors, torch and json each raise their own types for a damaged file
        raise EstaError(f"checkpoint file {path} is damaged ({type(e).__name__}: {str(e)[:120]}); start the run "
                        f"again with --overwrite") from e


def load_adaptation(folder: Path, model: Palette) -> dict:
    """Put a checkpoint's adaptation state into ``model`` (same anchors, same PST); return its meta."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise EstaError(f"no checkpoint in {folder}")
    meta = _read(folder / "state.json", lambda p: json.loads(p.read_text()))
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise EstaError(f"checkpoint file {folder / 'state.json'} is damaged (no step); start the run again with "
                        f"--overwrite")
    state = _read(folder / "adaptation.safetensors", lambda p: load_file(str(p)))
    params = dict(model.named_parameters())
    expected = model.adaptation_state().keys()
    missing = [n for n in expected if n not in state]
    unknown = [n for n in state if n not in expected]
    if missing or unknown:
        raise EstaError(f"checkpoint {folder} does not match this palette: {len(missing)} tensors missing, "
                        f"{len(unknown)} unknown (e.g. {(missing or unknown)[0]})")
    wrong = [n for n, t in state.items() if t.shape != params[n].shape]
    if wrong:
        raise EstaError(f"checkpoint {folder} does not match this palette: {wrong[0]} has shape "
                        f"{tuple(state[wrong[0]].shape)}, the palette {tuple(params[wrong[0]].shape)}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    return meta


def load_sampler_state(folder: Path) -> dict:
    return _read(Path(folder) / "sampler.safetensors", lambda p: load_file(str(p)))


def load_checkpoint(folder: Path, model: Palette, optimizer: Any, scheduler: Any) -> tuple[dict, dict]:
    """Restore model/optimizer/scheduler in place to resume training; return (sampler tensors, meta)."""
    meta = load_adaptation(folder, model)
    optim = _read(Path(folder) / "optim.pt", lambda p: torch.load(p, weights_only=True))
    try:
        optimizer.load_state_dict(optim["optimizer"])
        scheduler.load_state_dict(optim["scheduler"])
    except (KeyError, TypeError, ValueError) as e:
        raise EstaError(f"checkpoint file {Path(folder) / 'optim.pt'} does not fit this run ({e}); start the run "
                        f"again with --overwrite") from e
    return load_sampler_state(folder), meta
