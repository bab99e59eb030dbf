"""Image classification tasks for esta: built-in tasks, image folders and Hugging Face datasets.

Every source comes out the same way: datasets of ``(uint8 [C, image_size, image_size], int label)`` items with a
``.labels`` tensor, converted to ``num_channels`` (1 = greyscale, 3 = RGB) and resized bilinearly with PIL.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from ..errors import EstaError
from ..files import default_cache_dir  # noqa: F401 - where it was first
from .arrays import TensorImageDataset, stratified_split
from .builtin import BUILTIN_TASKS, load_builtin
from .folder import IMAGE_EXTENSIONS, ImageFolderDataset, read_image_folder
from .splits import held_out_sets, materialize, warn_missing_classes

__all__ = [
    "BUILTIN_TASKS",
    "ImageFolderDataset",
    "ImageTask",
    "TensorImageDataset",
    "default_cache_dir",
    "held_out_sets",
    "load_image_task",
    "materialize",
    "stratified_split",
    "warn_missing_classes",
]

# What a hub dataset name looks like ("name" or "owner/name"); anything else that does not exist is a missing path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_HF_DISK_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


@dataclass
class ImageTask:
    """A classification task: items are ``(uint8 tensor [C, H, W], int label)``; ``classes[label]`` names a label."""

    name: str
    train: Dataset
    test: Dataset
    classes: list[str]


def load_image_task(spec: str, *, image_size: int, num_channels: int, cache_dir: str | os.PathLike[str] | None = None,
                    train_examples: int | Literal["default"] | None = "default", seed: int = 0) -> ImageTask:
    """Load a task from a built-in name, an image folder, a ``save_to_disk`` folder or a Hugging Face hub name.

    ``train_examples``: for the target built-ins (``animal-shapes``, ``mnist``, ``digits``) ``"default"`` is the
    VTAB-1k split (1,000 stratified training examples, the rest for testing), an int sets that number, ``None`` keeps
    the source's own split where it has one. ``fashion-mnist`` keeps its official 60k/10k split unless an int is
    given. Folders and Hugging Face datasets keep their own splits; an int draws a stratified subset of train.
    The draws are seeded by ``seed``.
    """
    if not spec:
        raise EstaError(f"no task given: name a built-in task ({', '.join(BUILTIN_TASKS)}), an image folder or a "
                        "Hugging Face dataset")
    _check_arguments(image_size, num_channels, train_examples)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if spec in BUILTIN_TASKS:
        return ImageTask(spec, *load_builtin(spec, cache, image_size, num_channels, train_examples, seed))
    subset = train_examples if isinstance(train_examples, int) else None
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and any((path / marker).is_file() for marker in _HF_DISK_MARKERS):
            return _load_hf(str(path), path, image_size, num_channels, subset, seed)
        if path.is_dir() and (path / "train").is_dir():
            train, test, classes = read_image_folder(path, image_size, num_channels)
            if subset is not None:
                train = train.subset(stratified_split(train.labels, subset, seed)[0])
            return ImageTask(path.resolve().name, train, test, classes)
        raise EstaError(
            f"{path} is neither an image folder nor a saved Hugging Face dataset; expected either "
            f"{path}/train/<class>/<images> and {path}/test/<class>/<images> "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)}), or a folder written by DatasetDict.save_to_disk")
    if not _HUB_NAME.fullmatch(spec):
        raise EstaError(f"{path} does not exist (and {spec!r} is not a built-in task: {', '.join(BUILTIN_TASKS)})")
    near = difflib.get_close_matches(spec.lower(), list(BUILTIN_TASKS), n=1, cutoff=0.8)
    if near:  # a typo of a built-in name: say so at once, rather than after the hub's retries
        raise EstaError(f"unknown task {spec!r}: did you mean the built-in {near[0]!r}? (built-in tasks: "
                        f"{', '.join(BUILTIN_TASKS)}; anything else is read as a folder or a hub dataset)")
    return _load_hf(spec, None, image_size, num_channels, subset, seed)


def _check_arguments(image_size: int, num_channels: int, train_examples: object) -> None:
    # bool is an int to Python, but True as a size or a count is a mistake, not a 1.
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise EstaError(f"image_size must be a positive integer, got {image_size!r}")
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels not in (1, 3):
        raise EstaError(f"num_channels must be 1 (greyscale) or 3 (RGB), got {num_channels!r}")
    if train_examples not in (None, "default") and (
            isinstance(train_examples, bool) or not isinstance(train_examples, int) or train_examples < 1):
        raise EstaError(f"train_examples must be a positive integer, 'default' or None, got {train_examples!r}")


def _load_hf(spec: str, path: Path | None, image_size: int, num_channels: int, train_examples: int | None,
             seed: int) -> ImageTask:
    # datasets is imported only here: it takes seconds to import and the built-in tasks never need it.
    from . import hf

    dataset = hf.open_from_disk(path) if path is not None else hf.open_from_hub(spec, BUILTIN_TASKS)
    where = str(path) if path is not None else f"the Hugging Face dataset {spec!r}"
    train, test, classes = hf.convert_splits(dataset, where, image_size, num_channels, train_examples, seed)
    name = path.resolve().name if path is not None else spec
    return ImageTask(name, train, test, classes)
