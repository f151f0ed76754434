"""What every dataset of the registry returns: a :class:`Task`, and the pieces tasks are made of.

A task is a labelled, map-style dataset whose items are ``(float tensor C x H x W, int label)``
with labels ``0 .. num_classes - 1``, plus a name and JSON-serialisable metadata. This module
holds that dataclass, the in-memory image dataset used by the small benchmarks, the
:class:`ClassSubset` wrapper that turns a subset of classes into a task, and the image
transforms (ImageNet normalisation, grayscale to three channels, optional resizing).

Datasets here expose ``targets`` (one int label per item) so that samplers can count classes
without decoding a single image; :func:`get_targets` falls back to iterating a dataset that
does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from t2v_lightning.labels import read_labels

Normalize = Literal["imagenet", "none"]
"""How images are normalised after conversion to ``[0, 1]``: ImageNet mean/std or not at all."""

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetNotFoundError(FileNotFoundError):
    """Files of a dataset are missing; the message names the path and how to obtain them."""


class DataSourceError(ValueError):
    """A user's data cannot be made into a task: the message names the file, folder or column.

    Raised for image folders, Hugging Face datasets and CSV / JSONL files (empty folders, a
    single class, a missing column, labels that are neither integers nor strings, a file that is
    not an image ...).
    """


@dataclass
class Task:
    """A classification task: a dataset, its number of classes, a name and metadata.

    Args:
        dataset: map-style dataset yielding ``(image, label)``; ``image`` a float tensor
            ``C x H x W``, ``label`` an int in ``0 .. num_classes - 1``.
        num_classes: number of classes of the task.
        name: human-readable task name (used on plot axes).
        metadata: JSON-serialisable facts about the task: at least ``dataset``, ``task_id``,
            ``split`` and ``class_names``; CUB / iNaturalist tasks add ``taxonomy``.
    """

    dataset: Dataset[tuple[torch.Tensor, int]]
    num_classes: int
    name: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskInfo:
    """What is known about a task without loading its data: name, classes and metadata.

    Args:
        name: human-readable task name.
        num_classes: number of classes.
        metadata: JSON-serialisable metadata, as in :class:`Task` but without the split.
    """

    name: str
    num_classes: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceRequest:
    """What a dataset that reads a user's data is asked to build (see :class:`DatasetEntry`).

    Args:
        root: the task folder (``imagefolder``) or file (``csv`` / ``jsonl``); unused by ``hf``.
        source: the :class:`~t2v_lightning.data.sources.DataSource` (dataset, split, columns).
        train: the training split (``False``: the held-out one, where the dataset has one).
        input_size: image side in pixels (``None``: 224 for images).
        normalize: the image normalisation.
        max_samples: rows read by a streamed ``hf`` dataset.
    """

    root: str
    source: Any
    train: bool = True
    input_size: int | None = None
    normalize: Normalize = "imagenet"
    max_samples: int | None = None


BuildSourceTask = Callable[[SourceRequest], "Task"]
"""Builds the task of a dataset that reads a user's data: ``build_source(request) -> Task``."""


class BuildTask(Protocol):
    """Builds one task of a registered dataset (see :class:`DatasetEntry`); called with its
    arguments in this order."""

    def __call__(
        self,
        root: str,
        task_id: int | None,
        train: bool,
        input_size: int | None,
        download: bool,
        normalize: Normalize,
        /,
    ) -> Task: ...


@dataclass(frozen=True)
class DatasetEntry:
    """How the registry builds, describes, counts and downloads the tasks of one dataset.

    Args:
        build: ``build(root, task_id, train, input_size, download, normalize) -> Task``.
        describe: ``describe(root, task_id) -> TaskInfo`` without loading images (for
            ``num_classes`` before any data is read); ``None`` builds the task instead.
        max_tasks: ``None`` for a single-task dataset (``task_id`` must be ``None`` or 0);
            otherwise the number of task ids the dataset defines. ``0`` means the count depends
            on the data found under ``root`` (``count_tasks`` says how many).
        count_tasks: ``count_tasks(root) -> int`` for datasets whose task count depends on the
            data; ``None`` uses ``max_tasks``.
        download: ``download(root)`` fetches the files, or ``None`` when the dataset cannot be
            downloaded by the library (offline sets, or data behind a download script).
        has_test_split: whether ``train=False`` gives a held-out split.
        summary: one line for listings.
        build_source: for the datasets that read a user's data (``imagefolder``, ``hf``,
            ``csv``, ``jsonl``): ``build_source(request) -> Task`` with ``request`` a
            :class:`SourceRequest`; used instead of ``build``.
    """

    build: BuildTask
    describe: Callable[[str, int | None], TaskInfo] | None = None
    max_tasks: int | None = None
    count_tasks: Callable[[str], int] | None = None
    download: Callable[[str], None] | None = None
    has_test_split: bool = True
    summary: str = ""
    build_source: BuildSourceTask | None = None


class TaskFacts(Protocol):
    """One task of a dataset entry: its facts without loading it, and how to load it."""

    def info(self) -> TaskInfo:
        """The task's name, class count and metadata (no image read)."""
        ...

    def build(
        self, root: str, train: bool, input_size: int | None, download: bool, normalize: Normalize
    ) -> Task:
        """Load the task (the arguments of :class:`BuildTask` but its id)."""
        ...


def facts_entry(facts: Callable[[str, int | None], TaskFacts], **fields: Any) -> DatasetEntry:
    """The entry whose task ``task_id`` under ``root`` is ``facts(root, task_id)``.

    Args:
        facts: ``facts(root, task_id)``: the task's :class:`TaskFacts`.
        fields: the entry's other fields (``max_tasks``, ``download``, ``summary``, ...).
    """

    def build(root: str, task_id: int | None, *options: Any) -> Task:
        # options: train, input_size, download, normalize, in BuildTask's order.
        return facts(root, task_id).build(root, *options)

    def describe(root: str, task_id: int | None) -> TaskInfo:
        return facts(root, task_id).info()

    return DatasetEntry(build=build, describe=describe, **fields)


def download_failed(name: str, root: object, err: BaseException) -> DatasetNotFoundError:
    """The one-line error of a failed download of dataset ``name`` into ``root``."""
    cause = " ".join(str(err).split()) or type(err).__name__
    return DatasetNotFoundError(
        f"downloading {name!r} into {root} failed: {cause[:400]} (check the network, or "
        f"place the files under {root} yourself and leave download off)"
    )


def check_normalize(normalize: str) -> None:
    """Raise a ValueError naming the argument when ``normalize`` is not a known choice."""
    choices = get_args(Normalize)
    if normalize not in choices:
        raise ValueError(f"normalize={normalize!r} is not one of {list(choices)}")


# An image side above this would need gigabytes per image (4096 px: 200 MB as float32 RGB).
MAX_INPUT_SIZE = 4096


def check_input_size(input_size: int | None) -> None:
    """Raise a ValueError naming the argument unless ``input_size`` is None or 1..4096.

    Raises:
        TypeError: ``input_size`` is not an int (``"32"``, ``32.5``, ``True``).
        ValueError: it is not in 1..4096.
    """
    if input_size is not None and (
        not hasattr(input_size, "__index__") or isinstance(input_size, bool)
    ):
        raise TypeError(f"input_size must be an int (pixels per side) or None, got {input_size!r}")
    if input_size is not None and input_size < 1:
        raise ValueError(f"input_size must be a positive int or None, got {input_size!r}")
    if input_size is not None and input_size > MAX_INPUT_SIZE:
        raise ValueError(
            f"input_size={input_size} is too large: at most {MAX_INPUT_SIZE} pixels per side (one "
            f"image of {input_size} x {input_size} would take "
            f"{3 * 4 * input_size**2 / 2**30:.0f} GiB)"
        )


class ImageTransform:
    """Turns a stored image tensor into the float ``3 x H x W`` tensor a probe expects.

    Steps: ``uint8`` images are scaled to ``[0, 1]`` (float images are taken to be in
    ``[0, 1]`` already); grayscale images are repeated to three channels; the image is resized
    to ``input_size x input_size`` (bilinear, antialiased) when ``input_size`` is given; with
    ``normalize="imagenet"`` the ImageNet mean is subtracted and the result divided by the
    ImageNet std. A plain class rather than a lambda so that DataLoader workers can pickle it.

    Args:
        input_size: side of the output image; ``None`` keeps the stored size.
        normalize: ``"imagenet"`` or ``"none"``.
    """

    def __init__(self, input_size: int | None = None, normalize: Normalize = "imagenet") -> None:
        check_input_size(input_size)
        check_normalize(normalize)
        self.input_size = input_size
        self.normalize = normalize

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        if image.dim() == 2:
            image = image.unsqueeze(0)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if self.input_size is not None and tuple(image.shape[-2:]) != (
            self.input_size,
            self.input_size,
        ):
            image = F.interpolate(
                image.unsqueeze(0),
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            ).squeeze(0)
        else:
            image = image.contiguous()
        if self.normalize == "imagenet":
            mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
            image = (image - mean) / std
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size={self.input_size}, normalize={self.normalize!r})"


class ImageTensorDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images held in memory as one tensor, with int labels.

    Args:
        images: ``N x H x W`` (grayscale) or ``N x C x H x W`` tensor, ``uint8`` in ``[0, 255]``
            or float in ``[0, 1]``.
        targets: ``N`` integer labels.
        transform: applied to each image (by default :class:`ImageTransform` with ImageNet
            normalisation at the stored size).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | Sequence[int],
        transform: ImageTransform | None = None,
    ) -> None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if images.dim() not in (3, 4):
            raise ValueError(
                f"images must be N x H x W or N x C x H x W, got {tuple(images.shape)}"
            )
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self._targets = targets
        self.transform = transform if transform is not None else ImageTransform()

    @property
    def targets(self) -> list[int]:
        """The label of every item, in order."""
        return self._targets.tolist()

    def __len__(self) -> int:
        return len(self._targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self._targets[index])


def get_targets(dataset: Dataset[Any]) -> list[int]:
    """The label of every item of ``dataset``, without decoding images where possible.

    Uses ``dataset.targets`` when present, looks through :class:`torch.utils.data.Subset`, and
    otherwise iterates the dataset (slow for image files).
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        return []
    return read_labels(dataset, check=False).tolist()


def class_mapping(classes: Sequence[int] | Mapping[int, int]) -> dict[int, int]:
    """Validate a class selection and return it as ``{source label: task label}``.

    A sequence maps ``classes[i]`` to ``i``; a mapping is taken as given (several source labels
    may share a task label, e.g. "tops vs footwear"). Task labels must be ``0 .. C - 1``.
    """
    if isinstance(classes, Mapping):
        mapping = {int(k): int(v) for k, v in classes.items()}
    else:
        seq = [int(c) for c in classes]
        if len(set(seq)) != len(seq):
            raise ValueError(f"classes must not repeat a class, got {seq}")
        mapping = {c: i for i, c in enumerate(seq)}
    if not mapping:
        raise ValueError("classes must select at least one class")
    new_labels = sorted(set(mapping.values()))
    if new_labels != list(range(len(new_labels))):
        raise ValueError(
            f"classes must map onto labels 0..C-1 without gaps, got task labels {new_labels}"
        )
    return mapping


class LabelledDataset(Dataset[tuple[torch.Tensor, int]]):
    """A map-style dataset of ``(input, label)`` that keeps every label, in order.

    Subclasses fill ``self._targets`` (one int per example) and define ``__getitem__``; the
    labels are read without loading any input, and the length is the number of labels.
    """

    _targets: list[int]

    @property
    def targets(self) -> list[int]:
        """The label of every example, in order."""
        return list(self._targets)

    def __len__(self) -> int:
        return len(self._targets)


class ClassSubset(LabelledDataset):
    """The items of some classes of a dataset, relabelled ``0 .. C - 1``.

    Args:
        dataset: a map-style dataset yielding ``(image, label)``.
        classes: a sequence of source labels (``classes[i]`` becomes label ``i``) or a mapping
            ``{source label: task label}`` whose values are ``0 .. C - 1`` (several source
            labels may share one task label).

    Example:
        >>> import torch
        >>> base = ImageTensorDataset(torch.zeros(4, 2, 2, dtype=torch.uint8), [0, 1, 2, 1])
        >>> subset = ClassSubset(base, [2, 1])
        >>> len(subset), subset.targets, subset.num_classes
        (3, [1, 0, 1], 2)
    """

    def __init__(
        self, dataset: Dataset[tuple[torch.Tensor, int]], classes: Sequence[int] | Mapping[int, int]
    ) -> None:
        self.dataset = dataset
        self.class_map = class_mapping(classes)
        source = get_targets(dataset)
        missing = sorted(set(self.class_map) - set(source))
        if missing:
            log.warning(
                "classes %s have no example in this split (its labels are %s)",
                missing,
                sorted(set(source)),
            )
        self.indices = [i for i, t in enumerate(source) if t in self.class_map]
        self._targets = [self.class_map[source[i]] for i in self.indices]
        self.num_classes = len(set(self.class_map.values()))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.dataset[self.indices[index]]
        return image, self._targets[index]
