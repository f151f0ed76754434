"""Tasks to embed: a registry of datasets by name, their readers, and a LightningDataModule.

``get_task(name, root, task_id)`` returns a :class:`~t2v_lightning.data.task.Task` (a dataset of
``(3 x H x W float tensor, int label)``, its number of classes, a name and JSON metadata);
``TaskDataModule`` serves one task to a Trainer. The names below are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from t2v_lightning.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "ClassSubset": "t2v_lightning.data.task",
    "DatasetNotFoundError": "t2v_lightning.data.task",
    "Task": "t2v_lightning.data.task",
    "TaskInfo": "t2v_lightning.data.task",
    "get_targets": "t2v_lightning.data.task",
    "describe_task": "t2v_lightning.data.registry",
    "download_dataset": "t2v_lightning.data.registry",
    "get_task": "t2v_lightning.data.registry",
    "list_datasets": "t2v_lightning.data.registry",
    "num_tasks": "t2v_lightning.data.registry",
    "register_dataset": "t2v_lightning.data.registry",
    "TaskDataModule": "t2v_lightning.data.datamodule",
}

__all__ = [
    "ClassSubset",
    "DatasetNotFoundError",
    "Task",
    "TaskDataModule",
    "TaskInfo",
    "describe_task",
    "download_dataset",
    "get_targets",
    "get_task",
    "list_datasets",
    "num_tasks",
    "register_dataset",
]

if TYPE_CHECKING:  # pragma: no cover
    from t2v_lightning.data.datamodule import TaskDataModule
    from t2v_lightning.data.registry import (
        describe_task,
        download_dataset,
        get_task,
        list_datasets,
        num_tasks,
        register_dataset,
    )
    from t2v_lightning.data.task import (
        ClassSubset,
        DatasetNotFoundError,
        Task,
        TaskInfo,
        get_targets,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
