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
    """The config and Task classes for a family kind."""
    for config_cls, task_cls in TASKS.values():
        if task_cls.family == family:
            return config_cls, task_cls
    raise EstaError(f"no Task takes {family!r} anchors")


__all__ = ["TASKS", "Task", "task_class", "task_for_family", "AdaptConfig", "ImageClassification",
           "LMAdaptConfig", "InstructionTuning"]
