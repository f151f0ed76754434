"""Reading a task's labels and choosing the examples it is embedded with (pure, no network).

:func:`read_labels` and :func:`read_multilabels` read and check the labels of a map-style
dataset (through ``dataset.targets`` when it has them, so that no image is decoded);
:func:`select_examples` draws the examples used, class-balanced with replacement as the 2019
reference does (SPEC section 2.5) or a seeded subset. :class:`~t2v_lightning.Task2Vec` and the
data modules of :mod:`t2v_lightning.data` both choose their examples here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from t2v_lightning.features import DatasetError

__all__ = ["read_labels", "read_multilabels", "select_examples"]


def _dataset_size(dataset: Dataset) -> int:
    """The length of a map-style dataset; empty or unsized datasets are refused."""
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise DatasetError("the dataset must be a map-style Dataset with a length") from err
    if size == 0:
        raise DatasetError("the dataset is empty")
    return size


def _labels_only(batch: list[Any]) -> torch.Tensor:
    labels: list[int] = []
    for item in batch:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DatasetError(
                f"dataset items must be (input, label) pairs, got {type(item).__name__}"
            )
        label = item[1]
        if isinstance(label, torch.Tensor):
            if label.numel() != 1:
                raise DatasetError(
                    f"each label must be a single integer, got a tensor of shape {tuple(label.shape)}"
                )
            if label.is_floating_point() or label.dtype == torch.bool:
                raise DatasetError(f"labels must be integers (class indices), got {label.item()!r}")
            label = int(label.item())
        elif hasattr(label, "__index__") and not isinstance(label, bool):
            label = int(label.__index__())
        else:
            raise DatasetError(f"labels must be integers (class indices), got {label!r}")
        labels.append(label)
    return torch.tensor(labels, dtype=torch.int64)


def _multilabels_only(batch: list[Any]) -> torch.Tensor:
    rows: list[torch.Tensor] = []
    for item in batch:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DatasetError(
                f"dataset items must be (input, label) pairs, got {type(item).__name__}"
            )
        label = torch.as_tensor(item[1])
        if label.ndim != 1:
            raise DatasetError(
                "likelihood='bernoulli' needs each label to be a 1-D 0/1 vector (K outputs), got "
                f"shape {tuple(label.shape)}"
            )
        rows.append(label.to(torch.float32))
    if len({row.numel() for row in rows}) > 1:
        raise DatasetError("multi-label targets must all have the same number of outputs")
    return torch.stack(rows)


def _stored_targets(dataset: Dataset, size: int) -> torch.Tensor | None:
    """``dataset.targets`` (looking through ``Subset``) as a 1-D tensor, else None.

    A plain :class:`~torch.utils.data.TensorDataset` (not a subclass, which may change its
    items) gives its second tensor: its items' labels are that tensor's rows.
    """
    if type(dataset) is TensorDataset and len(dataset.tensors) >= 2:
        column = dataset.tensors[1]
        return column if column.ndim == 1 and column.numel() == size else None
    targets = getattr(dataset, "targets", None)
    if targets is None and isinstance(dataset, Subset):
        parent = _stored_targets(dataset.dataset, len(dataset.dataset))  # type: ignore[arg-type]
        return (
            None if parent is None else parent[torch.as_tensor(dataset.indices, dtype=torch.int64)]
        )
    if targets is None:
        return None
    try:
        labels = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels.ndim != 1 or labels.numel() != size:
        return None
    return labels


def _read_all(
    dataset: Dataset,
    collate: Callable[[list[Any]], torch.Tensor],
    batch_size: int,
    num_workers: int,
) -> torch.Tensor:
    """Every item's label, as ``collate`` takes it out of a batch, concatenated in order."""
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
    )
    return torch.cat(list(loader))


def read_labels(
    dataset: Dataset, batch_size: int = 100, num_workers: int = 0, check: bool = True
) -> torch.Tensor:
    """The int64 class label of every item of ``dataset``, in order.

    ``dataset.targets`` is used when it holds one label per item (also through
    :class:`~torch.utils.data.Subset`); otherwise the items are read with a data loader.

    Args:
        dataset: a map-style dataset of ``(input, label)`` pairs.
        batch_size: items per read when the dataset has no ``targets``.
        num_workers: data-loading worker processes for that read.
        check: refuse negative labels and single-class datasets.

    Raises:
        DatasetError: an empty or unsized dataset, labels that are not integers, negative
            labels or a single class (``check``); the first offending example is named.
    """
    size = _dataset_size(dataset)
    labels = _stored_targets(dataset, size)
    if labels is None:
        labels = _read_all(dataset, _labels_only, batch_size, num_workers)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DatasetError(
            f"labels must be integers (class indices), got dtype {labels.dtype} (first "
            f"label: {labels.reshape(-1)[0].item()!r})"
        )
    labels = labels.to(torch.int64)
    if labels.ndim != 1:
        raise DatasetError(
            f"each label must be a single integer, got shape {tuple(labels.shape[1:])}"
        )
    if not check:
        return labels
    if (labels < 0).any():
        first = int((labels < 0).nonzero()[0])
        raise DatasetError(
            f"labels must be non-negative class indices; example {first} has label "
            f"{int(labels[first])}"
        )
    if labels.unique().numel() < 2:
        raise DatasetError(
            f"the dataset has a single class ({int(labels[0])}); a task needs at least two"
        )
    return labels


def read_multilabels(dataset: Dataset, batch_size: int = 100, num_workers: int = 0) -> torch.Tensor:
    """The ``(N, K)`` float 0/1 targets of a multi-label dataset (``likelihood="bernoulli"``).

    Raises:
        DatasetError: an empty dataset, labels that are not 1-D vectors of one length, or
            entries other than 0 and 1 (the first offending example is named).
    """
    _dataset_size(dataset)
    labels = _read_all(dataset, _multilabels_only, batch_size, num_workers)
    if labels.ndim != 2 or labels.shape[1] < 1:
        raise DatasetError(
            "likelihood='bernoulli' needs each label to be a 0/1 vector of K outputs, got "
            f"labels of shape {tuple(labels.shape[1:])}"
        )
    if not bool(((labels == 0) | (labels == 1)).all()):
        row = int((~((labels == 0) | (labels == 1))).any(-1).nonzero()[0])
        raise DatasetError(
            f"multi-label targets must be 0 or 1; example {row} has {labels[row].tolist()}"
        )
    return labels


def select_examples(
    labels: torch.Tensor,
    max_samples: int | None,
    balanced: bool,
    seed: int,
    shuffle: bool = False,
) -> torch.Tensor:
    """Indices of the examples used, in the order they are visited.

    ``balanced``: ``max_samples`` draws with replacement, each example weighted by 1/(size of
    its class) (the reference's sampler). Otherwise ``max_samples`` distinct examples of a
    seeded permutation (all of them when ``max_samples`` is None or at least the dataset's
    size), in increasing order or, with ``shuffle``, in the permutation's order.

    Args:
        labels: ``(N,)`` class labels (only their number is read unless ``balanced``).
        max_samples: how many examples; ``None`` for as many as there are.
        balanced: class-balanced draws with replacement.
        seed: seed of the draw.
        shuffle: keep the permutation's order (unbalanced selection only).

    Raises:
        ValueError: no examples.

    Example:
        >>> select_examples(torch.tensor([0, 0, 0, 1]), 3, balanced=False, seed=0)
        tensor([0, 1, 3])
    """
    size = int(labels.shape[0])
    if size == 0:
        raise ValueError("the task has no examples")
    count = size if max_samples is None else max_samples
    generator = torch.Generator().manual_seed(seed)
    if balanced:
        classes = torch.unique(labels, return_inverse=True)[1]  # labels may be 0 and 2**40
        weights = 1.0 / torch.bincount(classes)[classes].to(torch.float64)
        return torch.multinomial(weights, count, replacement=True, generator=generator)
    if count >= size and not shuffle:
        return torch.arange(size)
    chosen = torch.randperm(size, generator=generator)[:count]
    return chosen if shuffle else chosen.sort().values
