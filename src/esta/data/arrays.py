"""In-memory datasets and the low-level helpers every image source shares.

Everything that turns pixels into model input goes through :func:`pil_to_tensor`, so an image gives the same tensor
whether it came from a built-in array, a Hugging Face dataset or a file in an image folder.
"""

from __future__ import annotations

import gzip
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ..errors import EstaError

# Below this many images a progress bar is only noise.
PROGRESS_MIN = 5000


class TensorImageDataset(Dataset):
    """Images already converted and resized, held in memory.

    ``images`` is uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``; an item is ``(image, int label)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be int64 [{images.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> TensorImageDataset:
        """The examples at ``indices``, in that order, as a new dataset (``.labels`` kept, unlike ``Subset``)."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return TensorImageDataset(self.images[index], self.labels[index])


def pil_to_array(image: Image.Image, image_size: int, num_channels: int) -> np.ndarray:
    """Convert to greyscale (1 channel) or RGB (3), resize bilinearly to a square, return uint8 ``[C, H, W]``.

    The colour conversion happens before the resize, and a greyscale source is resized once and then repeated to 3
    channels: this gives exactly what resizing the RGB conversion would, at a third of the cost. The channel
    shuffling is done in numpy: torch's parallel copy of one small image can cost milliseconds on few cores.
    """
    if image.mode.startswith("I;16"):
        # PIL clips 16-bit values to 255 when converting to "L", which turns most of a 16-bit PNG white.
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8), "L")
    elif image.mode in ("P", "PA"):
        # Palettes with transparency must go through RGBA (PIL warns otherwise); the alpha is then dropped.
        image = image.convert("RGBA")
    greyscale = num_channels == 1 or image.mode in ("1", "L", "LA", "I", "F")
    image = image.convert("L" if greyscale else "RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(image)
    if greyscale:
        return np.repeat(array[np.newaxis], num_channels, axis=0)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def pil_to_tensor(image: Image.Image, image_size: int, num_channels: int) -> torch.Tensor:
    """:func:`pil_to_array` as a torch tensor."""
    return torch.from_numpy(pil_to_array(image, image_size, num_channels))


def arrays_to_tensor(images: np.ndarray, image_size: int, num_channels: int, desc: str) -> torch.Tensor:
    """Convert uint8 ``[N, H, W]`` (greyscale) or ``[N, H, W, 3]`` (RGB) arrays to uint8 ``[N, C, S, S]``."""
    out = np.empty((len(images), num_channels, image_size, image_size), dtype=np.uint8)
    for i in tqdm(range(len(images)), desc=desc, unit="img", disable=len(images) < PROGRESS_MIN, leave=False):
        out[i] = pil_to_array(Image.fromarray(images[i]), image_size, num_channels)
    return torch.from_numpy(out)


def stratified_split(labels: np.ndarray | torch.Tensor, num_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``num_train`` training examples, as equal per class as possible, and the rest.

    This is the VTAB-1k protocol (``num_train=1000``); it also draws a stratified subset of any split (ignore the
    second result). With fewer examples than classes, randomly chosen classes get one each. Deterministic for a
    given ``seed``; both index arrays come back sorted.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if not 0 <= num_train <= len(labels):
        raise EstaError(f"cannot draw {num_train} examples: only {len(labels)} are available")
    rng = np.random.default_rng(seed)
    quota = _class_quotas(counts, num_train, rng)
    train = []
    for cls, take in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == cls)
        train.append(rng.permutation(members)[:take])
    train_idx = np.sort(np.concatenate(train))
    test_mask = np.ones(len(labels), dtype=bool)
    test_mask[train_idx] = False
    return train_idx, np.flatnonzero(test_mask)


def _class_quotas(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """How many examples to take per class: equal shares, with small classes' shortfall spread over the others.

    Shares that do not divide evenly go to randomly chosen classes, so no class is favoured by its index.
    """
    quota = np.zeros(len(counts), dtype=np.int64)
    remaining = total
    while remaining > 0:
        open_classes = np.flatnonzero(quota < counts)
        share = remaining // len(open_classes)
        if share == 0:
            lucky = rng.choice(open_classes, size=remaining, replace=False)
            quota[lucky] += 1
            break
        add = np.minimum(share, counts[open_classes] - quota[open_classes])
        quota[open_classes] += add
        remaining -= int(add.sum())
    return quota


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else.

    A pickle can name any importable callable (``os.system``...) and have it called while loading; only the few
    globals a numpy array's pickle needs are let through.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise EstaError(f"refusing to unpickle {module}.{name} from {self._source}: "
                            "only numpy arrays are accepted in this file")
        return _ALLOWED_GLOBALS[(module, name)]


# Pickles name the array rebuilder by the numpy module it lived in when written (numpy.core before numpy 2,
# numpy._core after); taking the function from ndarray.__reduce__ resolves both names in any numpy, without
# importing the deprecated module path.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def safe_unpickle(data: bytes, source: str) -> Any:
    """Unpickle ``data`` allowing only numpy arrays; ``source`` names the file in error messages."""
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), source).load()
    except EstaError:
        raise
    except Exception as error:  # a damaged pickle can fail in many ways (EOFError, struct.error, TypeError...)
        raise EstaError(f"{source} is not a readable pickle of numpy arrays: {error}") from error


# IDX type codes (third byte of the magic number) and the big-endian dtypes they stand for.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as error:
        raise EstaError(f"cannot read IDX file {path}: {error}") from error
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise EstaError(f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty file)'}")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise EstaError(f"IDX file {path} is truncated: its header is incomplete")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise EstaError(f"IDX file {path} is malformed: shape {shape} needs {expected} bytes of data, "
                        f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
