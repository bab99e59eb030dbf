"""Hugging Face datasets: a ``save_to_disk`` folder or a hub name, converted once into in-memory tensors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import EstaError
from .arrays import PROGRESS_MIN, TensorImageDataset, pil_to_array, stratified_split

logger = logging.getLogger("esta.data")

_IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")
_LABEL_COLUMN_NAMES = ("label", "labels")


def open_from_disk(path: Path) -> Any:
    """``datasets.load_from_disk`` with its failures turned into an :class:`EstaError`."""
    try:
        return datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises FileNotFoundError, JSON, Arrow and schema errors alike
        raise EstaError(f"cannot load the Hugging Face dataset saved in {path}: {error}") from error


def open_from_hub(name: str, builtin_names: tuple[str, ...]) -> Any:
    """``datasets.load_dataset(name)``; a failure becomes an :class:`EstaError` saying what else ``name`` could be."""
    # Said up front: offline, the hub client retries for about half a minute before it gives up.
    logger.info("loading %r from the Hugging Face hub", name)
    try:
        return datasets.load_dataset(name)
    except Exception as error:  # offline this is a connection error, online a missing repo or a bad script
        raise EstaError(
            f"{name!r} is not a built-in task ({', '.join(builtin_names)}), no file or folder of that name exists, "
            f"and loading it as a Hugging Face hub dataset failed ({type(error).__name__}: {error}); "
            "without network access no hub is reachable, so use a built-in task, an image folder or a "
            "save_to_disk folder") from error


def convert_splits(dataset: Any, where: str, image_size: int, num_channels: int, train_examples: int | None,
                   seed: int) -> tuple[TensorImageDataset, TensorImageDataset, list[str]]:
    """(train, test, class names) from a ``DatasetDict`` with ``train`` and ``test`` (or ``validation``) splits.

    With ``train_examples`` a stratified subset of train is drawn before any image is decoded.
    """
    if not isinstance(dataset, datasets.DatasetDict):
        raise EstaError(f"{where} holds a single Hugging Face split; save a DatasetDict with 'train' and 'test' "
                        "(or 'validation') splits instead")
    test_split = next((s for s in ("test", "validation") if s in dataset), None)
    if "train" not in dataset or test_split is None:
        raise EstaError(f"{where} needs a 'train' split and a 'test' (or 'validation') split; "
                        f"it has: {', '.join(dataset) or 'none'}")
    train, test = dataset["train"], dataset[test_split]
    image_column, label_column = _pick_columns(train.features, where)
    for column in (image_column, label_column):
        if column not in test.features:
            raise EstaError(f"the {test_split!r} split of {where} has no {column!r} column (train has it)")
    train_labels, test_labels, classes = _labels(train, test, label_column, where)
    if train_examples is not None:
        keep = stratified_split(train_labels, train_examples, seed)[0]
        train, train_labels = train.select(keep), train_labels[keep]
    return (
        _to_tensors(train, image_column, train_labels, f"train split of {where}", image_size, num_channels),
        _to_tensors(test, image_column, test_labels, f"{test_split} split of {where}", image_size, num_channels),
        classes,
    )


def _pick_columns(features: datasets.Features, where: str) -> tuple[str, str]:
    image = next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
    image = image or next((n for n in _IMAGE_COLUMN_NAMES if n in features), None)
    label = next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((n for n in _LABEL_COLUMN_NAMES if n in features), None)
    if image is None or label is None:
        missing = "image column (an Image feature, or one named image/img/pixel_values)" if image is None else \
            "label column (a ClassLabel feature, or one named label/labels)"
        raise EstaError(f"{where} has no {missing}; its columns are: {', '.join(features)}")
    return image, label


def _labels(train: datasets.Dataset, test: datasets.Dataset, column: str, where: str
            ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer labels 0..K-1 for both splits, and the K class names."""
    feature = train.features[column]
    train_values, test_values = list(train[column]), list(test[column])
    if isinstance(feature, datasets.ClassLabel):
        train_labels, test_labels = np.asarray(train_values, np.int64), np.asarray(test_values, np.int64)
        for split, labels in (("train", train_labels), ("test", test_labels)):
            if labels.size and (labels.min() < 0 or labels.max() >= feature.num_classes):
                # -1 is how datasets marks unlabelled examples (e.g. competition test sets).
                raise EstaError(f"the {split} split of {where} has labels outside 0..{feature.num_classes - 1} "
                                "(unlabelled examples?); every example needs a label")
        return train_labels, test_labels, list(feature.names)
    try:
        distinct = sorted(set(train_values) | set(test_values))
    except TypeError:  # mixed or unorderable types: order them by their text instead
        distinct = sorted(set(train_values) | set(test_values), key=str)
    index = {value: i for i, value in enumerate(distinct)}
    return (np.asarray([index[v] for v in train_values], np.int64),
            np.asarray([index[v] for v in test_values], np.int64), [str(v) for v in distinct])


def _to_tensors(split: datasets.Dataset, column: str, labels: np.ndarray, where: str, image_size: int,
                num_channels: int) -> TensorImageDataset:
    images = np.empty((len(split), num_channels, image_size, image_size), dtype=np.uint8)
    rows = iter(split.select_columns([column]))
    for i in tqdm(range(len(split)), desc=f"converting {where}", unit="img", disable=len(split) < PROGRESS_MIN,
                  leave=False):
        try:
            image = _as_pil(next(rows)[column], i, where)
            images[i] = pil_to_array(image, image_size, num_channels)
        except EstaError:
            raise
        except Exception as error:  # a damaged image fails inside datasets' decoder or PIL, with many error types
            raise EstaError(f"cannot decode image {i} of the {where}: {error}") from error
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels))


def _as_pil(value: Any, i: int, where: str) -> Image.Image:
    """An image column's value as a PIL image: already one for Image features, else an array of pixels."""
    if isinstance(value, Image.Image):
        return value
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise EstaError(f"image {i} of the {where} is neither an image nor an array of pixels: {error}") from error
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first (as in pixel_values) -> channels last, as PIL wants
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0 \
            or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise EstaError(f"image {i} of the {where} is not a greyscale, RGB or RGBA image: "
                        f"got an array of shape {array.shape} and type {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and array.max() <= 1.0:
        array = array * 255.0  # floats in 0..1 are the usual convention for normalised pixels
    if array.min() < 0 or array.max() > 255:
        raise EstaError(f"image {i} of the {where} has pixel values outside 0..255 "
                        f"({array.min()}..{array.max()})")
    return Image.fromarray(np.round(array).astype(np.uint8))
