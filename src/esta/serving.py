"""One palette, every budget: the whole adapted palette as one artifact that runs any stitch.

Under PST every stitch that runs a layer shares that layer's low-rank update, so the update folds into the frozen
weight once, for all of them; what differs between stitches is only their small bias vectors (and which blocks and
stitching layer they run). ``save_palette`` writes the anchors with the updates folded in, the stitching layers,
every stitch's biases and the new heads (``palette.safetensors``) and a table of the stitches with their costs
(``palette.json``). ``load_palette`` gives back a :class:`~esta.palette.Palette` whose ``palette(x, stitch=k)``
equals stitch ``k`` deployed alone, so switching budget between requests is choosing another ``k``: no reload.
Deployed one stitch per folder, every budget is a full copy; this is the anchors' size plus the bias table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .deploy import _anchor_class, built_in, weight_dtype
from .errors import EstaError
from .files import atomic_write, write_json
from .palette import Palette
from .pst import PSTConfig, StitchLinear

FORMAT = "esta-palette"
WEIGHTS = "palette.safetensors"
TABLE = "palette.json"
_LORA = ("lora_A", "lora_B")


def fold_palette_(palette: Palette) -> Palette:
    """Fold every shared low-rank update into its frozen weight, in place (the palette then serves, not trains)."""
    for m in palette.modules():
        if isinstance(m, StitchLinear):
            m.fold_lora_()
    return palette


def save_palette(palette: Palette, folder: str | Path, *, space_args: dict, stitches: list[dict],
                 classes: list[str] | None = None, task: str | None = None, tokenizer=None) -> Path:
    """Write ``palette`` (trained, PST applied) as one artifact; ``stitches``: one row per stitch (its cost and
    whatever was measured), in stitch order; a language palette's ``tokenizer`` is saved beside it. Folds the
    palette's LoRA updates in place."""
    if palette.pst is None or palette.pst.full_finetune:
        raise EstaError("only a PST palette (shared LoRA, per-stitch biases) can be saved as one palette")
    if len(stitches) != len(palette):
        raise EstaError(f"{len(stitches)} rows for a palette of {len(palette)} stitches")
    folder = Path(folder)
    fold_palette_(palette.eval())
    state = {k: v.detach().contiguous() for k, v in palette.state_dict().items() if not k.endswith(_LORA)}
    # An anchor rebuilt from its spec has a bias on every layer a stitch-specific bias may reach (Llama's q/k/v/o
    # carry none when pretrained): write zeros for the bias-less ones, so the file is complete either way.
    for name, m in palette.named_modules():
        if isinstance(m, nn.Linear) and m.bias is None:
            state[f"{name}.bias"] = torch.zeros(m.out_features, dtype=m.weight.dtype)
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise EstaError(f"refusing to save the palette: {len(broken)} tensors hold NaN or inf (e.g. {broken[0]})")
    atomic_write(folder / WEIGHTS, lambda p: save_file(state, str(p)))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_json(folder / TABLE, {
        "format": FORMAT, "version": 1, "task": task, "family": palette.anchors[0].family,
        "score": palette.anchors[0].score,
        "classes": classes,
        "anchors": [a.spec() for a in palette.anchors], "space": space_args, "pst": palette.pst.to_dict(),
        "dtype": str(weight_dtype(palette.anchors[0].blocks)).removeprefix("torch."),
        "stitches": [{"id": s.id, "name": s.name, **row} for s, row in zip(palette.space.stitches, stitches)],
    })
    return folder


def load_palette(folder: str | Path) -> tuple[Palette, dict]:
    """The served palette and its table (``palette.json``)."""
    folder = Path(folder)
    if not (folder / TABLE).is_file() or not (folder / WEIGHTS).is_file():
        raise EstaError(f"{folder} is not a saved palette (needs {TABLE} and {WEIGHTS})")
    try:
        table = json.loads((folder / TABLE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise EstaError(f"{folder / TABLE} is not valid JSON ({e})") from e
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise EstaError(f"{folder / TABLE} is not an esta palette")
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors' own error types for a damaged file
        raise EstaError(f"{folder / WEIGHTS} is damaged or not a safetensors file ({str(e)[:120]})") from e
    try:
        with built_in(getattr(torch, table.get("dtype", "float32"))):
            anchors = []
            for spec in table["anchors"]:
                depth = int(spec["config"]["num_hidden_layers"])
                anchors.append(_anchor_class(spec["family"]).build_part(spec, 0, depth - 1, True, True))
            palette = Palette(anchors, **table["space"])
        palette.apply_pst(PSTConfig.from_dict(table["pst"]))
        fold_palette_(palette)  # zero updates, and no branch computed
        missing, unexpected = palette.load_state_dict(state, strict=False)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise EstaError(f"{folder / TABLE} does not describe the weights beside it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from e
    missing = [k for k in missing if not k.endswith(_LORA)]
    # the zero biases save_palette writes for layers that the rebuilt anchor builds without one (e.g. an LM head)
    unexpected = [k for k in unexpected if not (k.endswith(".bias") and not state[k].any())]
    if missing or unexpected:
        raise EstaError(f"{folder} does not match its table: {len(missing)} tensors missing, {len(unexpected)} "
                        f"unknown (e.g. {(missing or unexpected)[0]})")
    palette.requires_grad_(False)
    return palette.eval(), table
