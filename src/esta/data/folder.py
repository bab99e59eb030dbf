"""Image folders: ``<root>/train/<class>/<image>`` and ``<root>/test/<class>/<image>``, decoded lazily."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import EstaError
from .arrays import pil_to_tensor

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFolderDataset(Dataset):
    """Image files decoded on access: only paths and labels are held, as real folders can be large.

    An item is ``(uint8 [C, image_size, image_size], int label)``; ``labels`` is an int64 tensor of all labels.
    """

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, image_size: int, num_channels: int) -> None:
        if labels.dtype != torch.int64 or labels.shape != (len(paths),):
            raise ValueError(f"labels must be int64 [{len(paths)}], got {labels.dtype} {tuple(labels.shape)}")
        self.paths = list(paths)
        self.labels = labels
        self.image_size = image_size
        self.num_channels = num_channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                tensor = pil_to_tensor(image, self.image_size, self.num_channels)
        except Exception as error:  # PIL reports damaged or odd files with many types (OSError, ValueError...)
            raise EstaError(f"cannot read image {path}: {error}") from error
        return tensor, int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageFolderDataset:
        """The examples at ``indices``, in that order, as a new dataset (``.labels`` kept, unlike ``Subset``)."""
        index = [int(i) for i in np.asarray(indices)]
        return ImageFolderDataset([self.paths[i] for i in index], self.labels[torch.tensor(index, dtype=torch.int64)],
                                  self.image_size, self.num_channels)


def read_image_folder(root: Path, image_size: int, num_channels: int
                      ) -> tuple[ImageFolderDataset, ImageFolderDataset, list[str]]:
    """Index ``root/train`` and ``root/test``: (train, test, class names). Class names are train's sorted folders."""
    if not root.is_dir():
        raise EstaError(f"image folder {root} does not exist")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise EstaError(f"image folder {root} has no {split}/ sub-folder; expected "
                            f"{root}/train/<class>/<images> and {root}/test/<class>/<images>")
    classes = _class_folders(root / "train")
    if not classes:
        raise EstaError(f"{root / 'train'} has no class sub-folders; expected {root}/train/<class>/<images>")
    if len(classes) < 2:
        raise EstaError(f"{root / 'train'} has only one class folder ({classes[0]}); classification needs at least 2")
    unknown = sorted(set(_class_folders(root / "test")) - set(classes))
    if unknown:
        raise EstaError(f"{root / 'test'} has class folders that are not in {root / 'train'}: {', '.join(unknown)}")
    train = _index_split(root / "train", classes, image_size, num_channels, every_class=True)
    test = _index_split(root / "test", classes, image_size, num_channels, every_class=False)
    return train, test, classes


def _class_folders(split_dir: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .DS_Store-style litter) are never classes.
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _index_split(split_dir: Path, classes: list[str], image_size: int, num_channels: int, every_class: bool
                 ) -> ImageFolderDataset:
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = _image_files(split_dir / name) if (split_dir / name).is_dir() else []
        if every_class and not files:
            raise EstaError(f"no images found in {split_dir / name} (accepted extensions: {_extension_list()})")
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise EstaError(f"no images found in {split_dir} (accepted extensions: {_extension_list()})")
    return ImageFolderDataset(paths, torch.tensor(labels, dtype=torch.int64), image_size, num_channels)


def _image_files(class_dir: Path) -> list[Path]:
    # Sub-folders of a class folder are searched too. Hidden files are skipped: macOS leaves "._name.jpg"
    # metadata files next to every image, and they are not images despite the extension.
    return sorted(p for p in class_dir.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())


def _extension_list() -> str:
    return ", ".join(IMAGE_EXTENSIONS)
