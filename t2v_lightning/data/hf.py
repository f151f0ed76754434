"""Reading Hugging Face ``datasets``: loading one split, its columns, a streamed prefix, images.

Kept apart from the task logic (:mod:`t2v_lightning.data.sources`) so that every reader of
``datasets`` in the package shares one way to load, name and report a dataset:

* :func:`load_hf_dataset` is ``datasets.load_dataset`` for one split, with a failure turned into
  one :class:`~t2v_lightning.data.task.DataSourceError` line naming the dataset; local files go
  through the packaged builders (``imagefolder``, ``json``, ``csv``, ``parquet``, ...), which
  work offline;
* :func:`column_names`, :func:`class_label_names` and :func:`is_image_column` read its schema;
  :func:`require_columns` names a missing column and lists those there are;
* :func:`take_rows` reads the first ``count`` rows of a streamed dataset (nothing more is read);
* :class:`ImageColumnDataset` reads one image of an image column when indexed, through
  :func:`~t2v_lightning.data.folders.open_image` (the column is cast to undecoded images, so
  ``datasets`` never decodes one itself).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from t2v_lightning.data.folders import open_image
from t2v_lightning.data.task import DatasetNotFoundError, DataSourceError, LabelledDataset

__all__ = [
    "ImageColumnDataset",
    "class_label_names",
    "column_names",
    "describe_source",
    "is_image_column",
    "load_hf_dataset",
    "require_columns",
    "take_rows",
]


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "reading Hugging Face datasets needs the datasets package: pip install "
            "'t2v-lightning[data]'"
        ) from err
    return datasets


def describe_source(
    path: str, config: str | None, split: str, data_files: str | Sequence[str] | None
) -> str:
    """How messages name a dataset: ``'csv' (files a.csv, b.csv), split 'train'``."""
    text = repr(path)
    if config:
        text += f" config {config!r}"
    if data_files:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        text += f" (file{'s' if len(files) > 1 else ''} {', '.join(map(str, files))})"
    return f"{text}, split {split!r}"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_hf_dataset(
    path: str,
    config: str | None = None,
    split: str = "train",
    data_files: str | Sequence[str] | None = None,
    streaming: bool = False,
) -> Any:
    """One split of a Hugging Face dataset (``datasets.load_dataset``).

    Args:
        path: a dataset on the Hub, a local dataset folder or script, or a packaged builder
            (``imagefolder``, ``json``, ``csv``, ``parquet``, ``text``) reading ``data_files``.
        config: the dataset's configuration name.
        split: the split to read.
        data_files: local files (or globs) for a packaged builder.
        streaming: read rows lazily (``IterableDataset``) instead of preparing the whole split.

    Raises:
        DatasetNotFoundError: a local data file that does not exist.
        DataSourceError: ``datasets`` could not load it (the first line of its message).
    """
    datasets = _import_datasets()
    if not isinstance(path, str) or not path:
        raise DataSourceError(
            f"the Hugging Face dataset path must be a non-empty string, got {path!r}"
        )
    files = [data_files] if isinstance(data_files, str) else list(data_files or [])
    for file in files:
        if (
            "://" not in str(file)
            and not any(c in str(file) for c in "*?[")
            and not os.path.exists(file)
        ):
            raise DatasetNotFoundError(f"data file {file} does not exist")
    where = describe_source(path, config, split, data_files)
    # Off a terminal, datasets' progress bars would print every redrawn frame into the log.
    quiet = not _on_terminal() and datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            path,
            name=config,
            split=split,
            data_files=data_files or None,
            streaming=streaming,
        )
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:  # a third-party loader: any failure is a line about the data
        raise DataSourceError(
            f"cannot load Hugging Face dataset {where}: {_first_line(err)}"
        ) from err
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _on_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def _features(dataset: Any) -> Any:
    return getattr(dataset, "features", None)


def column_names(dataset: Any) -> list[str]:
    """The columns of a dataset, from its features (empty when unknown: a JSON stream)."""
    features = _features(dataset)
    if features is not None:
        return list(features)
    return list(getattr(dataset, "column_names", None) or [])


def require_columns(columns: Sequence[str], wanted: dict[str, str | None], where: str) -> None:
    """Raise a DataSourceError naming the first missing column and listing those there are.

    Args:
        columns: the dataset's columns.
        wanted: ``{option: column}``, e.g. ``{"label_column": "label"}``; None entries skipped.
        where: how to name the dataset.
    """
    for option, column in wanted.items():
        if column is not None and column not in columns:
            raise DataSourceError(
                f"{where} has no column {column!r} (--data.{option}); its columns are: "
                f"{', '.join(columns) or 'none'}"
            )


def class_label_names(dataset: Any, column: str) -> list[str] | None:
    """The class names of a ``ClassLabel`` column, else None."""
    datasets = _import_datasets()
    features = _features(dataset)
    feature = features.get(column) if features is not None else None
    if isinstance(feature, datasets.ClassLabel):
        return [str(name) for name in feature.names]
    return None


def is_image_column(dataset: Any, column: str) -> bool:
    """Whether ``column`` is an ``Image`` feature."""
    datasets = _import_datasets()
    features = _features(dataset)
    return features is not None and isinstance(features.get(column), datasets.Image)


def undecoded_images(dataset: Any, column: str) -> Any:
    """The dataset with ``column`` cast to undecoded images (``{"bytes", "path"}`` dicts)."""
    datasets = _import_datasets()
    return dataset.cast_column(column, datasets.Image(decode=False))


def take_rows(dataset: Any, count: int, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The first ``count`` rows of a (streamed) dataset, only ``columns`` kept.

    Only those rows are read: a stream is stopped after them. ``columns`` empty keeps every
    column.
    """
    rows: list[dict[str, Any]] = []
    if count <= 0:
        return rows
    for row in dataset:
        rows.append({column: row.get(column) for column in columns} if columns else dict(row))
        if len(rows) >= count:
            break
    return rows


def image_source(value: Any, where: str) -> tuple[str | bytes, str]:
    """``(path or bytes, name for errors)`` of one undecoded image value."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return bytes(data), str(path or where)
        if path:
            return str(path), str(path)
    if isinstance(value, str) and value:
        return value, value
    raise DataSourceError(f"{where} holds no image (got {type(value).__name__})")


class ImageColumnDataset(LabelledDataset):
    """The images of one column of a (non-streamed) Hugging Face dataset, read when indexed.

    Args:
        dataset: a ``datasets.Dataset`` whose ``column`` holds undecoded images
            (:func:`undecoded_images`).
        column: the image column.
        targets: the task label of every row.
        transform: turns the RGB PIL image into a tensor.
        where: how to name the dataset in errors.
    """

    def __init__(
        self,
        dataset: Any,
        column: str,
        targets: Sequence[int],
        transform: Callable[[Any], torch.Tensor],
        where: str,
    ) -> None:
        if len(dataset) != len(targets):
            raise ValueError(f"{len(dataset)} rows but {len(targets)} labels")
        self.dataset = dataset.select_columns([column])
        self.column = column
        self._targets = [int(t) for t in targets]
        self.transform = transform
        self.where = where

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        where = f"row {index} of column {self.column!r} of {self.where}"
        source, name = image_source(self.dataset[int(index)][self.column], where)
        return self.transform(open_image(source, name=name)), self._targets[index]
