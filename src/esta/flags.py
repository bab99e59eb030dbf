"""Command-line flags made from the config dataclasses: one flag per setting, its help the field's own comment, its
default the config's (shown in the help, never restated by hand), so the CLI and the Python API cannot drift.

Every flag defaults to "not given"; a run's config starts from its config class's defaults and takes only the
flags given. Nested settings keep short names (``--groups`` is ``train.sampling.groups``, ``--calibrate-steps``
is ``calibration.steps``); :data:`NAMES` lists the names that are not the field's own.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Literal, get_args, get_origin

from .errors import EstaError

#: flag names other than the field's own (kept from earlier releases, or clearer on a command line)
NAMES = {"out_dir": "out", "heldout_examples": "heldout", "train.sampling.uniform": "uniform-sampling",
         "train.sampling.spacing": "group-spacing"}
#: the prefix of a nested config's flags ("" for none)
PREFIXES = {"train": "", "train.sampling": "", "pst": "", "calibration": "calibrate-"}
#: settings a method sets, not a user (no flag)
#: list settings given as separate words (paths may hold commas); other lists are comma-separated
SPACE_SEPARATED = {"anchors"}
NO_FLAG = {"train.track_importance", "train.sampling.by_group", "pst.full_finetune", "train.log_every",
           "train.num_workers"}


@dataclass(frozen=True)
class Flag:
    path: str  # the setting, e.g. "train.sampling.groups"
    name: str  # e.g. "--groups"
    hint: Any  # the field's type, None removed
    help: str
    owners: tuple[type, ...]  # the config classes that have this setting

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in the class body: a ``#:`` block above it, else its trailing ``#`` comment."""
    docs: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if is_dataclass(c)]):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                above.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            line = lines[node.end_lineno - 1]
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            docs[node.target.id] = " ".join(above) or trailing
    return docs


def _flags(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    out = []
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        if is_dataclass(hint):
            out += _flags(hint, f"{path}.")
        elif path not in NO_FLAG:
            out.append((path, hint, docs.get(f.name, "")))
    return out


def _flag_name(path: str) -> str:
    if path in NAMES:
        return "--" + NAMES[path]
    parent, _, leaf = path.rpartition(".")
    return "--" + PREFIXES.get(parent, "") + leaf.replace("_", "-")


def _strip_none(hint: Any) -> Any:
    """``X | None`` -> ``X``; any other hint as it is."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def config_flags(*config_classes: type) -> list[Flag]:
    """The flags of one or more config classes (a setting they share is one flag)."""
    found: dict[str, Flag] = {}
    for cls in config_classes:
        for path, hint, doc in _flags(cls):
            old = found.get(path)
            found[path] = Flag(path, _flag_name(path), old.hint if old else _strip_none(hint),
                               old.help if old and old.help else doc,
                               (old.owners if old else ()) + (cls,))
    names = [f.name for f in found.values()]
    clash = {n for n in names if names.count(n) > 1}
    if clash:
        raise RuntimeError(f"two settings share the flags {sorted(clash)}: give one a name in flags.NAMES")
    return list(found.values())


def _get(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return "none" if v is None or v == "" else f"{v:g}" if isinstance(v, float) else str(v)


def int_list(text: str) -> list[int]:
    """Comma-separated integers (``12,12,12``)."""
    return [int(p.strip()) for p in text.split(",") if p.strip()]


def _pairs(text: str) -> dict[str, float]:
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER pairs separated by commas, got {text!r}") from None


def _kind(path: str, hint: Any) -> dict:
    """argparse's arguments for a setting of type ``hint``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": list(args)}
    if path in SPACE_SEPARATED:
        return {"nargs": "+"}
    if origin is dict:
        return {"type": _pairs, "metavar": "NAME=X,..."}
    if origin in (list, tuple):  # comma-separated on the command line
        if args and args[0] is int:
            return {"type": int_list, "metavar": "1,2,..."}
        return {"type": lambda text: [p.strip() for p in text.split(",") if p.strip()], "metavar": "A,B,..."}
    if hint in (int, float, str):
        return {"type": hint}
    return {"type": lambda text: int(text) if text.lstrip("-").isdigit() else text}  # int | str


def add_config_flags(parser: argparse.ArgumentParser, flags: list[Flag], defaults: dict[type, Any],
                     labels: dict[type, str] | None = None) -> None:
    """One argument per flag, defaulting to "not given"; its help ends with the default of each config class that
    has the setting (``labels`` names them when they differ)."""
    for f in flags:
        shown = {labels.get(c, c.__name__) if labels else c.__name__: _show(_get(defaults[c], f.path))
                 for c in f.owners if c in defaults}
        if len(set(shown.values())) == 1:
            default = f"default {next(iter(shown.values()))}"
        else:
            default = "default " + ", ".join(f"{v} for {k}" for k, v in shown.items())
        parser.add_argument(f.name, dest=f.dest, default=None, help=f"{f.help} ({default})".lstrip().replace("%", "%%"),
                            **_kind(f.path, f.hint))


def given_settings(args: argparse.Namespace, flags: list[Flag]) -> dict[str, Any]:
    """The settings whose flags were given, by path."""
    return {f.path: getattr(args, f.dest) for f in flags if getattr(args, f.dest, None) is not None}


def build_config(base: Any, settings: dict[str, Any], flags: list[Flag],
                 labels: dict[type, str] | None = None) -> Any:
    """``base`` (a config with its defaults) with ``settings`` (by path) applied; a setting of another config class
    is refused naming its flag (and the class's label, e.g. its Task)."""
    by_path = {f.path: f for f in flags}
    cls = type(base)
    name = (labels or {}).get
    foreign = [p for p in settings if cls not in by_path[p].owners]
    if foreign:
        owners = {name(c, c.__name__) for p in foreign for c in by_path[p].owners}
        raise EstaError(f"{', '.join(by_path[p].name for p in foreign)}: only for {' and '.join(sorted(owners))}, "
                        f"not for {name(cls, cls.__name__)}")

    def apply(obj: Any, prefix: str) -> Any:
        changes = {}
        for f in dataclasses.fields(obj):
            path = f"{prefix}{f.name}"
            value = getattr(obj, f.name)
            if is_dataclass(value):
                new = apply(value, f"{path}.")
                if new is not value:
                    changes[f.name] = new
            elif path in settings:
                v = settings[path]
                changes[f.name] = tuple(v) if isinstance(value, tuple) else v
        return replace(obj, **changes) if changes else obj

    return apply(base, "")


class Commands:
    """``add_subparsers`` whose flags are built only for the command being run: the flags made from the configs
    import torch and the Tasks (seconds), which ``esta --help``, ``esta sources`` or ``esta serve`` need not pay.
    Every command is still listed; one that is not ``only`` gets a parser that keeps no flags."""

    def __init__(self, sub: Any, only: str | None) -> None:
        self.sub, self.only = sub, only

    def wanted(self, name: str) -> bool:
        return self.only is None or self.only == name

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        p = self.sub.add_parser(name, **kw)
        return p if self.wanted(name) else argparse.ArgumentParser(add_help=False)
