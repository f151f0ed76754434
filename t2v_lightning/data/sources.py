"""A user's own data as tasks: image folders, Hugging Face datasets, CSV and JSONL text files.

Four names of the dataset registry read data that the user points at rather than a benchmark:

* ``imagefolder``: ``root`` is a folder in torchvision's ``ImageFolder`` layout (one subfolder
  per class; ``root/train`` when present), see :mod:`t2v_lightning.data.folders`;
* ``hf``: ``path`` is a Hugging Face dataset (Hub name, local folder, or a packaged builder such
  as ``parquet`` / ``json`` / ``csv`` / ``imagefolder`` with ``data_files``), one ``split``; an
  image column makes an image task, a text column a text task (see
  :mod:`t2v_lightning.data.hf`); with ``streaming=True`` only the first ``max_samples`` rows
  are read;
* ``csv`` and ``jsonl``: ``root`` is one file whose rows hold a sentence (``text_column``,
  default ``text``) and a label (``label_column``, default ``label``): a text task.

Text tasks are tokenised for the sentence-encoder probe (``--model.probe
text:all-MiniLM-L6-v2``, :mod:`t2v_lightning.text`); image tasks get the ImageNet evaluation
preprocessing (resize and center crop to ``input_size``, 224 by default).

Labels (:func:`label_ids`): integers, or strings, or the names of a ``ClassLabel`` column. The
distinct values are sorted (numbers by value; strings, and ``ClassLabel`` names, as strings) and
numbered ``0 .. C - 1`` in that order; the task's metadata records them as ``class_names`` (so
label ``i`` is ``class_names[i]``) with ``label_kind``. A CSV column whose every label is a
decimal integer is read as integers. Any other label (a float, a boolean, a list, an empty
cell) is a :class:`~t2v_lightning.data.task.DataSourceError` naming the file, column and row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2v_lightning.data.task import (
    BuildSourceTask,
    DatasetEntry,
    DatasetNotFoundError,
    DataSourceError,
    SourceRequest,
    Task,
)

__all__ = [
    "SOURCE_DATASETS",
    "DataSource",
    "check_probe_fits",
    "check_source",
    "dataset_entries",
    "label_ids",
    "source_label",
]

_INTEGER = re.compile(r"^[+-]?\d+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
TEXT_PROBE_HINT = "--model.probe text:all-MiniLM-L6-v2"


@dataclass(frozen=True)
class DataSource:
    """Where a task of the ``hf``, ``csv`` and ``jsonl`` datasets reads its examples.

    Args:
        path: the Hugging Face dataset (``hf`` only): a Hub name, a local folder, or a packaged
            builder (``parquet``, ``json``, ``csv``, ``imagefolder``) reading ``data_files``.
        config: the dataset's configuration name (``hf``).
        split: the split read (``hf``).
        data_files: local files for a packaged builder (``hf``).
        image_column: the column of images (``hf``; default: ``image`` when there is one).
        text_column: the column of sentences (``hf``: default ``text`` when there is no image
            column; ``csv`` / ``jsonl``: default ``text``).
        label_column: the column of labels.
        streaming: read the first ``max_samples`` rows lazily instead of the whole split
            (``hf``).
    """

    path: str | None = None
    config: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] | None = None
    image_column: str | None = None
    text_column: str | None = None
    label_column: str = "label"
    streaming: bool = False


def data_files_tuple(data_files: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``data_files`` as :class:`DataSource` holds it: a tuple of paths (one path alone, too)."""
    if data_files is None:
        return None
    files = (data_files,) if isinstance(data_files, (str, os.PathLike)) else tuple(data_files)
    return tuple(os.fspath(f) for f in files)


# Which options each dataset reads; any other option that differs from its default is refused.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "imagefolder": (),
    "csv": ("text_column", "label_column"),
    "jsonl": ("text_column", "label_column"),
    "hf": tuple(field.name for field in dataclasses.fields(DataSource)),
}
SOURCE_DATASETS: tuple[str, ...] = tuple(_OPTIONS)
"""The registry names that read a user's own data."""


def check_source(name: str, source: DataSource) -> None:
    """Refuse options that ``name`` does not read (``path`` for ``csv``, ``split`` for images...).

    Raises:
        ValueError: names the option and the datasets it applies to.
    """
    default = DataSource()
    used = _OPTIONS.get(name, ())
    for field in dataclasses.fields(DataSource):
        if field.name in used or getattr(source, field.name) == getattr(default, field.name):
            continue
        takers = [n for n, options in _OPTIONS.items() if field.name in options]
        raise ValueError(
            f"{field.name}={getattr(source, field.name)!r} (--data.{field.name}) is not read by "
            f"dataset {name!r}; it applies to: {', '.join(takers)}"
        )
    if name == "hf" and not source.path:
        raise ValueError(
            "dataset 'hf' needs path= (--data.path): a Hugging Face dataset name, "
            "a local folder, or a builder such as parquet/json/csv with data_files"
        )


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "task"


def source_label(name: str, root: str, source: DataSource) -> str:
    """The ``{task}`` of an output path: the folder's or file's name, or the dataset's.

    Example:
        >>> source_label("csv", "data/reviews.csv", DataSource())
        'reviews'
    """
    if name == "imagefolder":
        return _safe(Path(os.path.abspath(root)).name)
    if name in ("csv", "jsonl"):
        return _safe(Path(root).stem)
    if source.data_files:
        # The file's stem, or the last folder before a glob: data/cars/** -> cars.
        parts = [p for p in Path(source.data_files[0]).parts if not any(c in p for c in "*?[")]
        if len(parts) == len(Path(source.data_files[0]).parts):
            return _safe(Path(source.data_files[0]).stem)
        return _safe(parts[-1] if parts else source.path or "hf")
    label = (source.path or "hf").rstrip("/").replace("/", "__")
    if source.config:
        label += f"_{source.config}"
    return _safe(label)


# --------------------------------------------------------------------------------- labels
def _label_error(where: str, column: str, row: int, value: Any) -> DataSourceError:
    kind = "empty" if value is None or value == "" else f"{type(value).__name__} {value!r}"
    return DataSourceError(
        f"column {column!r} of {where}, row {row}: label {kind}; labels must be integers or strings"
    )


def label_ids(
    values: Sequence[Any],
    column: str,
    where: str,
    names: Sequence[str] | None = None,
    from_text: bool = False,
) -> tuple[list[int], list[str], str]:
    """Number the labels of a column ``0 .. C - 1`` in sorted order.

    Args:
        values: one label per row: int, str, or a ``ClassLabel`` index when ``names`` is given.
        column: the column's name (for messages).
        where: the file or dataset (for messages).
        names: the names of a ``ClassLabel`` column.
        from_text: the values were read from text (CSV): a column of decimal integers is read
            as integers.

    Returns:
        ``(ids, class_names, kind)``: the label id of every row, the name of every id, and
        ``"ClassLabel"``, ``"integer"`` or ``"string"``.

    Raises:
        DataSourceError: no rows, a label that is neither an integer nor a string, or fewer
            than two classes.

    Example:
        >>> label_ids(["dog", "cat", "dog"], "label", "pets.csv")
        ([1, 0, 1], ['cat', 'dog'], 'string')
    """
    if len(values) == 0:
        raise DataSourceError(f"{where} has no rows")
    kind: str
    keys: list[Any]
    if names is not None:
        kind = "ClassLabel"
        keys = []
        for row, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
                raise DataSourceError(
                    f"column {column!r} of {where}, row {row}: {value!r} is not one of its "
                    f"{len(names)} ClassLabel classes (a missing label?)"
                )
            keys.append(str(names[value]))
    else:
        first = values[0]
        if isinstance(first, str) and not isinstance(first, bool):
            kind = "string"
        elif isinstance(first, int) and not isinstance(first, bool):
            kind = "integer"
        else:
            raise _label_error(where, column, 0, first)
        wanted = str if kind == "string" else int
        for row, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, wanted) or value == "":
                raise _label_error(where, column, row, value)
        keys = list(values)
        if kind == "string" and from_text and all(_INTEGER.match(v.strip()) for v in keys):
            kind = "integer"
            keys = [int(v) for v in keys]
    classes = sorted(set(keys))
    if len(classes) < 2:
        raise DataSourceError(
            f"column {column!r} of {where} has a single class ({classes[0]!r}): Task2Vec needs "
            "at least two classes"
        )
    index = {key: i for i, key in enumerate(classes)}
    return [index[key] for key in keys], [str(c) for c in classes], kind


# ----------------------------------------------------------------------------- text files
def _text_file(root: str, kind: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise DatasetNotFoundError(f"{kind} file {path} does not exist")
    if path.is_dir():
        raise DataSourceError(
            f"{path} is a folder; --data.name {kind} reads one {kind} file (--data.root FILE)"
        )
    return path


def _read_csv(path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name for name in (reader.fieldnames or [])]
            if not header:
                raise DataSourceError(f"{path} is empty (a CSV file needs a header row)")
            _require(header, columns, str(path))
            out: dict[str, list[Any]] = {column: [] for column in columns}
            for row in reader:
                for column in columns:
                    out[column].append(row.get(column))
    except UnicodeDecodeError as err:
        raise DataSourceError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
    except csv.Error as err:
        raise DataSourceError(f"{path} is not a valid CSV file ({err})") from err
    return out


def _read_jsonl(path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {column: [] for column in columns}
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataSourceError(f"{path}, line {number}: not JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise DataSourceError(
                        f"{path}, line {number}: a JSON object is expected on every line, got "
                        f"{type(record).__name__}"
                    )
                missing = [c for c in columns if c not in record]
                if missing:
                    raise DataSourceError(
                        f"{path}, line {number}: no column {missing[0]!r}; its columns are: "
                        f"{', '.join(record) or 'none'}"
                    )
                for column in columns:
                    out[column].append(record[column])
    except UnicodeDecodeError as err:
        raise DataSourceError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
    return out  # no rows: label_ids says so, as for CSV


def _require(columns: Sequence[str], wanted: Sequence[str], where: str) -> None:
    for column in wanted:
        if column not in columns:
            raise DataSourceError(
                f"{where} has no column {column!r}; its columns are: {', '.join(columns) or 'none'}"
            )


def _texts(values: Sequence[Any], column: str, where: str) -> list[str]:
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise DataSourceError(
                f"column {column!r} of {where}, row {row}: a text task needs a string, got "
                f"{type(value).__name__} {value!r}"
            )
    return list(values)


def _text_task(texts: list[str], ids: list[int], name: str, meta: dict[str, Any]) -> Task:
    from t2v_lightning.text import TextDataset

    dataset = TextDataset(texts, ids)
    return Task(dataset, len(meta["class_names"]), name, {"modality": "text", **meta})  # type: ignore[arg-type]


def _file_task(kind: str) -> BuildSourceTask:
    def build(request: SourceRequest) -> Task:
        root, source = request.root, request.source
        if not request.train:
            raise ValueError(f"dataset {kind!r} has no test split; use train=True")
        path = _text_file(root, kind)
        text_column = source.text_column or "text"
        columns = [text_column, source.label_column]
        table = _read_csv(path, columns) if kind == "csv" else _read_jsonl(path, columns)
        ids, names, label_kind = label_ids(
            table[source.label_column], source.label_column, str(path), from_text=kind == "csv"
        )
        texts = _texts(table[text_column], text_column, str(path))
        meta = {
            "dataset": kind,
            "task_id": None,
            "split": "train",
            "file": str(path),
            "text_column": text_column,
            "label_column": source.label_column,
            "class_names": names,
            "label_kind": label_kind,
            "num_examples": len(texts),
        }
        return _text_task(texts, ids, source_label(kind, root, source), meta)

    return build


# ------------------------------------------------------------------------------ image folders
def _folder_task(request: SourceRequest) -> Task:
    from t2v_lightning.data.cub_inat import imagenet_eval_transform
    from t2v_lightning.data.folders import ImageSourceDataset, scan_image_folder

    root, source, train = request.root, request.source, request.train
    input_size, normalize = request.input_size, request.normalize
    transform = imagenet_eval_transform(input_size, normalize)
    scan = scan_image_folder(root, train)
    dataset = ImageSourceDataset(scan.paths, scan.targets, transform)
    meta = {
        "dataset": "imagefolder",
        "task_id": None,
        "split": "train" if train else "test",
        "modality": "image",
        **scan.metadata(),
    }
    return Task(dataset, len(scan.class_names), source_label("imagefolder", root, source), meta)


# --------------------------------------------------------------------------- Hugging Face
def _hf_columns(
    columns: Sequence[str], dataset: Any, source: DataSource, where: str
) -> tuple[str, str]:
    """``(modality, column)``: the image or text column the task reads."""
    from t2v_lightning.data.hf import is_image_column, require_columns

    if source.image_column and source.text_column:
        raise ValueError(
            "give image_column or text_column (--data.image_column / "
            "--data.text_column), not both: a task is images or sentences"
        )
    require_columns(
        columns,
        {
            "image_column": source.image_column,
            "text_column": source.text_column,
            "label_column": source.label_column,
        },
        where,
    )
    if source.image_column:
        return "image", source.image_column
    if source.text_column:
        return "text", source.text_column
    images = [c for c in columns if is_image_column(dataset, c)]
    if "image" in columns:
        return "image", "image"
    if images:
        return "image", images[0]
    if "text" in columns:
        return "text", "text"
    raise DataSourceError(
        f"{where} has no 'image' or 'text' column: pass --data.image_column or "
        f"--data.text_column (its columns are: {', '.join(columns) or 'none'})"
    )


def _hf_task(request: SourceRequest) -> Task:
    from t2v_lightning.data.cub_inat import imagenet_eval_transform
    from t2v_lightning.data.folders import ImageSourceDataset
    from t2v_lightning.data.hf import (
        ImageColumnDataset,
        class_label_names,
        column_names,
        describe_source,
        image_source,
        is_image_column,
        load_hf_dataset,
        take_rows,
        undecoded_images,
    )

    root, source, train = request.root, request.source, request.train
    max_samples = request.max_samples
    input_size, normalize = request.input_size, request.normalize
    if not train:
        raise ValueError(
            "dataset 'hf' has no test split; use train=True (choose the split "
            "with split= / --data.split)"
        )
    if not source.path:
        raise ValueError("dataset 'hf' needs path= (--data.path)")
    if source.streaming and max_samples is None:
        raise ValueError(
            "streaming=True (--data.streaming) reads the first max_samples rows: "
            "set max_samples (--data.max_samples)"
        )
    where = describe_source(source.path, source.config, source.split, source.data_files)
    dataset = load_hf_dataset(
        source.path,
        source.config,
        source.split,
        list(source.data_files) if source.data_files else None,
        source.streaming,
    )
    rows: list[dict[str, Any]] = []
    chosen: tuple[str, str] | None = None
    columns = column_names(dataset)
    if source.streaming:
        # With a known schema the column is chosen first, so that an image column is read
        # undecoded; a stream without one (JSON) is read first, its columns taken from its rows.
        chosen = _hf_columns(columns, dataset, source, where) if columns else None
        if chosen is not None and chosen[0] == "image" and is_image_column(dataset, chosen[1]):
            dataset = undecoded_images(dataset, chosen[1])
        rows = take_rows(dataset, int(max_samples or 0), columns)
        if not rows:
            raise DataSourceError(f"{where} has no rows")
        columns = columns or list(rows[0])
    modality, column = (
        chosen if chosen is not None else _hf_columns(columns, dataset, source, where)
    )
    if source.streaming:
        where = f"{where} (its first {len(rows)} rows, streamed)"
    names = class_label_names(dataset, source.label_column)
    labels = (
        [row[source.label_column] for row in rows]
        if source.streaming
        else dataset[source.label_column]
    )
    ids, class_names, label_kind = label_ids(labels, source.label_column, where, names)
    meta: dict[str, Any] = {
        "dataset": "hf",
        "task_id": None,
        "split": source.split,
        "path": source.path,
        "config": source.config,
        "data_files": list(source.data_files or []) or None,
        "streaming": source.streaming,
        "modality": modality,
        f"{modality}_column": column,
        "label_column": source.label_column,
        "class_names": class_names,
        "label_kind": label_kind,
        "num_examples": len(ids),
    }
    name = source_label("hf", root, source)
    if modality == "text":
        values = [row[column] for row in rows] if source.streaming else dataset[column]
        return _text_task(_texts(values, column, where), ids, name, meta)
    transform = imagenet_eval_transform(input_size, normalize)
    if source.streaming:
        found = [
            image_source(row[column], f"row {i} of column {column!r} of {where}")
            for i, row in enumerate(rows)
        ]
        image_data: Any = ImageSourceDataset(
            [s for s, _ in found], ids, transform, names=[n for _, n in found]
        )
    else:
        if not is_image_column(dataset, column):
            feature = dataset.features.get(column)
            raise DataSourceError(
                f"column {column!r} of {where} is not an image column (its type is "
                f"{getattr(feature, 'dtype', None) or type(feature).__name__})"
            )
        image_data = ImageColumnDataset(
            undecoded_images(dataset, column), column, ids, transform, where
        )
    return Task(image_data, len(class_names), name, meta)


def check_probe_fits(probe: str, metadata: dict[str, Any], task: str) -> None:
    """Refuse a text task with an image probe, and an image task of your own data with a text
    probe (the registry's image tasks are checked against the probe's first layer later).

    Args:
        probe: ``--model.probe``.
        metadata: the task's metadata (``modality`` is set by this module's tasks).
        task: the task's name, for the message.
    """
    text_probe = str(probe).startswith("text:")
    modality = metadata.get("modality")
    if modality == "text" and not text_probe:
        raise ValueError(
            f"task {task!r} is a text task: embed it with a text probe "
            f"({TEXT_PROBE_HINT}), not {probe!r}"
        )
    if modality == "image" and text_probe:
        raise ValueError(
            f"task {task!r} holds images, but {probe!r} is a text probe: use an "
            "image probe (e.g. --model.probe resnet18)"
        )


def dataset_entries() -> dict[str, DatasetEntry]:
    """The registry entries of ``imagefolder``, ``hf``, ``csv`` and ``jsonl``."""
    builders: dict[str, tuple[BuildSourceTask, bool, str]] = {
        "imagefolder": (
            _folder_task,
            True,
            "your images, one subfolder per class (root=DIR; DIR/train if present)",
        ),
        "hf": (_hf_task, False, "a Hugging Face dataset (path=, split=, data_files=, columns)"),
        "csv": (_file_task("csv"), False, "a CSV file of sentences and labels (root=FILE)"),
        "jsonl": (_file_task("jsonl"), False, "a JSON-lines file of sentences and labels"),
    }
    entries: dict[str, DatasetEntry] = {}
    for name, (build_source, has_test, summary) in builders.items():

        def build(
            root: str, task_id: int | None, *options: Any, _build: BuildSourceTask = build_source
        ) -> Task:
            train, input_size, _download, normalize = options  # in BuildTask's order
            return _build(SourceRequest(root, DataSource(), train, input_size, normalize))

        entries[name] = DatasetEntry(
            build=build, build_source=build_source, has_test_split=has_test, summary=summary
        )
    return entries
