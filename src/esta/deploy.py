"""One-stage deployment: per budget, the stitch with the highest importance, merged into plain weights and saved.

A deployed stitch is a folder with ``esta_stitch.json`` (which anchors, which cut, each part's transformers config)
and ``model.safetensors`` (plain weights: LoRA and the stitch's own biases folded in). :class:`DeployedStitch` loads
it with no training state and runs the very same forward as the palette.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import EstaError
from .families.base import Anchor
from .files import atomic_write, read_json, write_json
from .palette import Palette, run_stitch
from .pst import StitchLinear, plain_state_dict
from .space import Stitch
from .stitching import StitchingLayer

FORMAT = "esta-stitch"
CONFIG_NAME = "esta_stitch.json"
WEIGHTS_NAME = "model.safetensors"
def _anchor_class(family: str) -> type[Anchor]:
    from .families import (
        anchor_class,  # the family registry (imported late: families imports transformers)
    )

    return anchor_class(family)


def _load_plain(target: nn.Module, source: nn.Module, stitch: int) -> None:
    """Copy ``source`` (maybe PST-adapted) into the plain ``target`` with the stitch's LoRA and biases merged."""
    state = plain_state_dict(source, stitch)
    for name, buf in target.state_dict().items():  # deployed q/k/v always carry a bias; a bias-less source gives 0
        if name not in state and name.endswith("bias"):
            state[name] = torch.zeros_like(buf)
    target.load_state_dict(state, strict=True)


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's largest weight: the frozen pretrained ones (e.g. bf16), not the float32 adapters
    that PST adds beside them, which merging folds away."""
    return max(module.parameters(), key=lambda p: p.numel()).dtype


@contextmanager
def built_in(dtype: torch.dtype) -> Iterator[None]:
    """Create modules directly in ``dtype``. Building in float32 and casting after would hold a float32 copy of a
    1.6B-parameter stitch (6.4 GB) for a moment, and ``.to(bf16)`` would also round the rotary tables, which
    transformers computes and keeps in float32 (they are not saved, so loading cannot restore them)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _part(src: Anchor, first: int, last: int, embed: bool, head: bool, stitch: int) -> Anchor:
    with built_in(weight_dtype(src.blocks)):
        part = type(src).build_part(src.spec(), first, last, embed, head)
    for name, module in part.embed_modules().items():
        _load_plain(module, src.embed_modules()[name], stitch)
    for i in range(first, last + 1):
        _load_plain(part.block_module(i), src.block_module(i), stitch)
    for name, module in part.head_modules().items():
        _load_plain(module, src.head_modules()[name], stitch)
    return part.eval()


class DeployedStitch(nn.Module):
    """A stitch as a standalone network: ``model(inputs)`` gives what ``palette(inputs, stitch=id)`` gave."""

    def __init__(self, stitch: Stitch, front: Anchor, end: Anchor | None, stitching: StitchingLayer | None,
                 meta: dict | None = None) -> None:
        super().__init__()
        self.stitch = stitch
        self.front = front
        self.end = end
        self.stitching = stitching
        self.meta = dict(meta or {})

    def forward(self, inputs: Any) -> torch.Tensor:
        return run_stitch(self.front, self.end if self.end is not None else self.front, self.stitching,
                          self.stitch, inputs)

    @classmethod
    def from_palette(cls, palette: Palette, stitch_id: int, meta: dict | None = None) -> "DeployedStitch":
        s = palette.space[stitch_id]
        fa, ea = palette.anchors[s.front], palette.anchors[s.end]
        if s.is_anchor:
            return cls(s, _part(fa, 0, fa.depth - 1, True, True, stitch_id), None, None, meta)
        front = _part(fa, 0, s.front_last, True, False, stitch_id)
        end = _part(ea, s.end_first, ea.depth - 1, False, True, stitch_id)
        src = palette.stitching[s.layer]
        base = src.base if isinstance(src, StitchLinear) else src
        layer = StitchingLayer(src.in_features, src.out_features, getattr(base, "tokens", 0),
                               dtype=weight_dtype(front))
        _load_plain(layer, src, stitch_id)
        return cls(s, front, end, layer.eval(), meta)

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "version": 1,
            "stitch": asdict(self.stitch),
            "front": self.front.spec(),
            "end": self.end.spec() if self.end is not None else None,
            # [in, out] or, with per-position offsets, [in, out, positions]
            "stitching": ([self.stitching.in_features, self.stitching.out_features]
                          + ([self.stitching.tokens] if getattr(self.stitching, "tokens", 0) else [])
                          if self.stitching else None),
            "dtype": str(weight_dtype(self)).removeprefix("torch."),
            "meta": self.meta,
        }
        config["checksum"] = _checksum(config)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise EstaError(f"refusing to deploy {self.stitch.name}: {len(broken)} tensors hold NaN or inf "
                            f"(e.g. {broken[0]}); the palette diverged")
        if self.stitch.is_anchor and hasattr(self.front, "to_transformers"):
            # An anchor is saved as the plain transformers model with the task's labels (config.json,
            # model.safetensors, preprocessor_config.json): it loads with transformers alone, and esta reads it
            # back through the same loader as any anchor.
            config["weights"] = "transformers"
            from .families import quiet_transformers

            with quiet_transformers():  # no "Writing model shards" bar per deployed model
                self.front.to_transformers(self.meta.get("classes")).save_pretrained(folder)
            self.front.write_processor_files(folder, normalize=True)
        else:
            atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p)))
            # the same weights as a transformers model of esta's registered type (``config.json``): after
            # ``import esta`` the Auto classes, pipeline and generate() take the folder (see esta.hf_native)
            write_transformers_files(folder, config, self.front, self.meta.get("classes"))
        write_json(folder / CONFIG_NAME, config)  # last: a folder with a config holds whole weights
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DeployedStitch":
        folder = Path(folder)
        cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not cfg_path.is_file() or not weights.is_file():
            raise EstaError(f"{folder} is not a deployed stitch (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise EstaError(f"{cfg_path} is not valid JSON ({e}); deploy the stitch again") from e
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise EstaError(f"{cfg_path} is not an esta stitch config")
        if "checksum" in cfg and cfg["checksum"] != _checksum(cfg):
            raise EstaError(f"{cfg_path} was edited after deployment (its architecture or preprocessing no longer "
                            f"matches its checksum); deploy the stitch again rather than edit it")
        for beside in ("config.json", "preprocessor_config.json"):  # what transformers reads: whole, or refused
            if (folder / beside).is_file():
                read_json(folder / beside, "deployment")
        if cfg.get("weights") == "transformers":
            return cls._from_transformers(folder, cfg)
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
            raise EstaError(f"{weights} is damaged or not a safetensors file ({str(e)[:120]}); deploy the stitch "
                            f"again") from e
        try:
            model = cls._build(cfg)
            model.load_state_dict(state, strict=True)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            # an edited config (missing key, cut out of range, wrong width) no longer matches the weights
            raise _mismatch(cfg_path, e) from e
        return model.eval()

    @classmethod
    def _from_transformers(cls, folder: Path, cfg: dict) -> "DeployedStitch":
        """An anchor saved as a plain transformers model, checked against the esta config beside it."""
        from .families import FAMILIES, _config, quiet_transformers

        cfg_path = folder / CONFIG_NAME
        try:
            stitch, fspec = Stitch(**cfg["stitch"]), cfg["front"]
            _anchor_class(fspec["family"])
            if not stitch.is_anchor:
                raise ValueError(f"stitch {stitch.name} is a cut, but the folder holds one whole model")
            config, _ = _config(str(folder))
            with quiet_transformers():
                front = FAMILIES[fspec["family"]].load(str(folder), config, None, True,
                                                       getattr(torch, cfg.get("dtype", "float32")))
            mine, theirs = front.spec(), fspec
            for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
                        "vocab_size"):
                if mine["config"].get(key) != theirs["config"].get(key):
                    raise ValueError(f"{key} is {mine['config'].get(key)} in config.json, "
                                     f"{theirs['config'].get(key)} in {CONFIG_NAME}")
            for key in ("image_mean", "image_std", "num_labels"):
                if mine.get(key) != theirs.get(key):
                    raise ValueError(f"{key} is {mine.get(key)} beside the weights, {theirs.get(key)} in "
                                     f"{CONFIG_NAME}")
        except (KeyError, TypeError, ValueError) as e:
            raise _mismatch(cfg_path, e) from e
        return cls(stitch, front, None, None, cfg.get("meta")).eval()

    @classmethod
    def _build(cls, cfg: dict) -> "DeployedStitch":
        s = Stitch(**cfg["stitch"])
        fspec, espec = cfg["front"], cfg["end"]
        fcls = _anchor_class(fspec["family"])
        depth = _depth(fspec)
        if not s.is_anchor and not (0 <= s.front_last < depth and 0 <= s.end_first < _depth(espec)):
            raise ValueError(f"cut {s.front_last}/{s.end_first} is outside the anchors' {depth} blocks")
        with built_in(getattr(torch, cfg.get("dtype", "float32"))):
            if s.is_anchor:
                front = fcls.build_part(fspec, 0, depth - 1, True, True)
                end, layer = None, None
            else:
                front = fcls.build_part(fspec, 0, s.front_last, True, False)
                ecls = _anchor_class(espec["family"])
                end = ecls.build_part(espec, s.end_first, _depth(espec) - 1, False, True)
                layer = StitchingLayer(*cfg["stitching"])
        return cls(s, front, end, layer, cfg.get("meta"))


def hf_config(esta_config: dict, classes: list[str] | None = None):
    """The transformers config of a deployed stitch described by ``esta_stitch.json``'s content (its class is
    the front anchor's family's: ``Anchor.stitch_config``)."""
    parts = {"stitch": esta_config["stitch"], "front": esta_config["front"], "end": esta_config["end"],
             "stitching": esta_config["stitching"], "esta_dtype": esta_config.get("dtype", "float32"),
             "esta_meta": esta_config.get("meta", {})}
    return _anchor_class(esta_config["front"]["family"]).stitch_config(parts, esta_config, classes)


def write_transformers_files(folder: Path, esta_config: dict, front: Anchor, classes: list[str] | None) -> list[str]:
    """Beside a deployed stitch's weights, what transformers reads: ``config.json`` of esta's registered type and
    what the family adds (an image processor that only resizes and rescales: the model normalises inside).
    Returns the names written."""
    write_json(folder / "config.json", hf_config(esta_config, classes).to_dict())
    return ["config.json", *front.write_processor_files(folder, normalize=False)]


def _mismatch(cfg_path: Path, e: Exception) -> EstaError:
    return EstaError(f"{cfg_path} does not describe the weights beside it ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:160]}); deploy the stitch again")


#: the parts of a deployed config that decide its predictions (meta, e.g. the class names, may be edited)
_CHECKED = ("stitch", "front", "end", "stitching", "dtype")


def _checksum(cfg: dict) -> str:
    """SHA-256 of what decides the stitch's predictions: architecture, cut and preprocessing (mean/std)."""
    as_read = json.loads(json.dumps({k: cfg.get(k) for k in _CHECKED}))  # as a reader sees it (int keys -> str)
    blob = json.dumps(as_read, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _depth(spec: dict) -> int:
    return int(spec["config"]["num_hidden_layers"])
