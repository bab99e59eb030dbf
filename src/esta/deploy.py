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


def stitch_dict(s: Stitch) -> dict:
    """The stitch as saved: a two-segment one without the (empty) fields of a middle segment."""
    d = asdict(s)
    return d if s.mid is not None else {k: v for k, v in d.items() if k not in ("mid", "mid_first", "mid_last",
                                                                                  "layer2")}


def _plain_layer(src: nn.Module, stitch: int, dtype: torch.dtype) -> StitchingLayer:
    """A palette's (maybe PST-wrapped) stitching layer as a plain one with the stitch's update and bias merged."""
    base = src.base if isinstance(src, StitchLinear) else src
    layer = StitchingLayer(src.in_features, src.out_features, getattr(base, "tokens", 0),
                           getattr(base, "first_state", None) is not None, dtype=dtype)
    _load_plain(layer, src, stitch)
    return layer.eval()


def _layer_shape(layer: StitchingLayer | None) -> list[int] | None:
    """What ``StitchingLayer(*shape)`` takes: [in, out]; with per-position offsets [in, out, positions]; with a
    first-token state [in, out, positions, 1] (positions 0 for language models)."""
    if layer is None:
        return None
    if getattr(layer, "first_state", None) is not None:  # [in, out, positions, 1]: with a first-token state
        return [layer.in_features, layer.out_features, getattr(layer, "tokens", 0), 1]
    return [layer.in_features, layer.out_features] + ([layer.tokens] if getattr(layer, "tokens", 0) else [])


def stitch_parts(model: nn.Module) -> tuple[list[Anchor], list[StitchingLayer]]:
    """The part that runs each segment of a deployed stitch (esta's or its transformers model: both hold ``front``,
    ``end``, ``stitching`` and, for a three-segment route, ``mid``, ``stitching2``) and the layers between them."""
    if model.end is None:
        return [model.front], []
    if getattr(model, "mid", None) is None:
        return [model.front, model.end], [model.stitching]
    return [model.front, model.mid, model.end], [model.stitching, model.stitching2]


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
    """A stitch as a standalone network: ``model(inputs)`` gives what ``palette(inputs, stitch=id)`` gave. A
    three-segment route also has a middle part and a second stitching layer (``mid``, ``stitching2``)."""

    def __init__(self, stitch: Stitch, front: Anchor, end: Anchor | None, stitching: StitchingLayer | None,
                 meta: dict | None = None, mid: Anchor | None = None,
                 stitching2: StitchingLayer | None = None) -> None:
        super().__init__()
        self.stitch = stitch
        self.front = front
        self.end = end
        self.stitching = stitching
        if mid is not None:  # only then: a two-segment stitch keeps the state-dict keys it always had
            self.mid = mid
            self.stitching2 = stitching2
        self.meta = dict(meta or {})

    @classmethod
    def _assemble(cls, s: Stitch, parts: list[Anchor], layers: list[StitchingLayer],
                  meta: dict | None) -> "DeployedStitch":
        """The deployed stitch of ``s`` from its parts (one per segment) and the layers between them."""
        if s.is_anchor:
            return cls(s, parts[0], None, None, meta)
        if s.mid is None:
            return cls(s, parts[0], parts[1], layers[0], meta)
        return cls(s, parts[0], parts[2], layers[0], meta, mid=parts[1], stitching2=layers[1])

    def forward(self, inputs: Any) -> torch.Tensor:
        return run_stitch(*stitch_parts(self), self.stitch, inputs)

    @classmethod
    def from_palette(cls, palette: Palette, stitch_id: int, meta: dict | None = None) -> "DeployedStitch":
        s = palette.space[stitch_id]
        segments = s.segments
        parts = []
        for k, (a, first, last) in enumerate(segments):
            src = palette.anchors[a]
            parts.append(_part(src, first, src.depth - 1 if last is None else last, k == 0, k == len(segments) - 1,
                               stitch_id))
        layers = [_plain_layer(palette.stitching[key], stitch_id, weight_dtype(parts[0])) for key in s.layer_keys]
        return cls._assemble(s, parts, layers, meta)

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "version": 1,
            "stitch": stitch_dict(self.stitch),
            "front": self.front.spec(),
            "end": self.end.spec() if self.end is not None else None,
            "stitching": _layer_shape(self.stitching),
            "dtype": str(weight_dtype(self)).removeprefix("torch."),
            "meta": self.meta,
        }
        if getattr(self, "mid", None) is not None:
            config.update(mid=self.mid.spec(), stitching2=_layer_shape(self.stitching2))
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
        specs = {"front": cfg["front"], "mid": cfg.get("mid"), "end": cfg["end"]}
        roles = ["front"] if s.is_anchor else ["front", "end"] if s.mid is None else ["front", "mid", "end"]
        parts = []
        with built_in(getattr(torch, cfg.get("dtype", "float32"))):
            for k, ((_, first, last), role) in enumerate(zip(s.segments, roles, strict=True)):
                spec = specs[role]
                depth = _depth(spec)
                last = depth - 1 if last is None else last
                if not 0 <= first <= last < depth:
                    raise ValueError(f"{role} blocks {first}-{last} are outside its {depth} blocks")
                parts.append(_anchor_class(spec["family"]).build_part(spec, first, last, k == 0, k == len(roles) - 1))
            layers = [StitchingLayer(*cfg[key]) for key in ("stitching", "stitching2")[:len(roles) - 1]]
        return cls._assemble(s, parts, layers, cfg.get("meta"))


def hf_config(esta_config: dict, classes: list[str] | None = None):
    """The transformers config of a deployed stitch described by ``esta_stitch.json``'s content (its class is
    the front anchor's family's: ``Anchor.stitch_config``)."""
    parts = {"stitch": esta_config["stitch"], "front": esta_config["front"], "end": esta_config["end"],
             "stitching": esta_config["stitching"], "esta_dtype": esta_config.get("dtype", "float32"),
             "esta_meta": esta_config.get("meta", {})}
    if esta_config.get("mid") is not None:  # a three-segment route
        parts.update(mid=esta_config["mid"], stitching2=esta_config["stitching2"])
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


#: the parts of a deployed config that decide its predictions (meta, e.g. the class names, may be edited);
#: a three-segment route's middle part and second layer, only where present (older checksums stay valid)
_CHECKED = ("stitch", "front", "end", "stitching", "dtype")
_CHECKED_IF_PRESENT = ("mid", "stitching2")


def _checksum(cfg: dict) -> str:
    """SHA-256 of what decides the stitch's predictions: architecture, cut and preprocessing (mean/std)."""
    checked = {k: cfg.get(k) for k in _CHECKED} | {k: cfg[k] for k in _CHECKED_IF_PRESENT if k in cfg}
    as_read = json.loads(json.dumps(checked))  # as a reader sees it (int keys -> str)
    blob = json.dumps(as_read, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _depth(spec: dict) -> int:
    return int(spec["config"]["num_hidden_layers"])
