"""The Tasks a palette can be adapted to: one file each, all run by the same recipe (``esta.recipe``).

``TASKS`` maps a task's name to its config and Task classes; ``task_for_family`` finds the Task for a family
kind (``"vision"``: image classification, ``"causal-lm"``: instruction tuning). A new Task is a new file here and
one line in ``TASKS``.
"""

from __future__ import annotations

from ..errors import EstaError
from .base import Task
from .image_classification import AdaptConfig, ImageClassification
from .instruction_tuning import InstructionTuning, LMAdaptConfig

#: name -> (config class, Task class)
TASKS: dict[str, tuple[type, type[Task]]] = {
    ImageClassification.kind: (AdaptConfig, ImageClassification),
    InstructionTuning.kind: (LMAdaptConfig, InstructionTuning),
}


def task_class(config) -> type[Task]:
    """The Task a config belongs to."""
    for config_cls, task_cls in TASKS.values():
        if type(config) is config_cls:
            return task_cls
    raise EstaError(f"{type(config).__name__} belongs to no Task; use one of "
                    f"{', '.join(c.__name__ for c, _ in TASKS.values())}")


def task_for_family(family: str) -> tuple[type, type[Task]]:
    """The config and Task classes for a family kind (the Task of its anchors' modality)."""
    from ..families import anchor_class

    modality = anchor_class(family).modality
    for config_cls, task_cls in TASKS.values():
        if task_cls.modality == modality:
            return config_cls, task_cls
    raise EstaError(f"no Task takes {family!r} anchors ({modality or 'unknown'} inputs)")


def config_for(settings: dict, flags: list, changes: dict | None = None, config_cls: type | None = None):
    """The config of the Task whose family the anchors in ``settings`` belong to (or ``config_cls``): its defaults,
    then ``changes``, then ``settings`` (by path, e.g. ``"train.sampling.groups"``; ``flags`` from
    ``esta.flags.config_flags``). A default K (stitches per step) above a smaller batch size becomes the batch size;
    a K given is checked as it is."""
    from dataclasses import replace

    from ..families import source_kind
    from ..flags import build_config

    if config_cls is None:
        config_cls = task_for_family(source_kind((settings.get("anchors") or AdaptConfig().anchors)[0]))[0]
    labels = {c: kind.replace("-", " ") for kind, (c, _) in TASKS.items()}  # "image classification"
    config = build_config(replace(config_cls(), **(changes or {})), settings, flags, labels)
    if "train.stitches_per_step" not in settings and config.train.stitches_per_step > config.train.batch_size:
        config = replace(config, train=replace(config.train, stitches_per_step=config.train.batch_size))
    return config


def config_from_file(path) -> object:
    """The config a JSON/YAML file or a run's ``run.json`` describes, of the Task it belongs to: the one the run
    recorded, else the one its anchors' family takes (image classification when it names none)."""
    from ..config import read_config_file
    from ..families import source_kind

    data, kind = read_config_file(path)
    if not isinstance(data, dict):
        raise EstaError(f"config {path}: expected a mapping, got {type(data).__name__}")
    if kind is None:
        anchors = data.get("anchors") or AdaptConfig().anchors
        kind = task_for_family(source_kind(anchors[0] if isinstance(anchors, list) else anchors))[1].kind
    if kind not in TASKS:
        raise EstaError(f"config {path}: unknown task {kind!r}; esta knows {', '.join(TASKS)}")
    return TASKS[kind][0].from_dict(data)


__all__ = ["config_for", "config_from_file", "TASKS", "Task", "task_class", "task_for_family", "AdaptConfig", "ImageClassification",
           "LMAdaptConfig", "InstructionTuning"]
