"""TaskDataModule: one task of the dataset registry as a LightningDataModule.

The training split is sampled once, in :meth:`TaskDataModule.setup`, from a generator seeded
with ``seed``:

* ``balanced_sampling=True`` (the reference's choice): ``max_samples`` indices (all of the
  split's size when ``None``) drawn *with replacement*, each example weighted by
  ``1 / (count of its class)``, so every class is drawn equally often in expectation;
* ``balanced_sampling=False``: a random permutation of the split, cut to ``max_samples``
  (without replacement).

The drawn indices are kept (``train_dataset`` is a :class:`~torch.utils.data.Subset` of them) and
``train_dataloader`` serves them in the drawn order without reshuffling, so every pass over the
data (feature caching, head fitting, the Fisher pass) sees the same examples in the same
order; on several devices Lightning's distributed sampler shards that fixed list. The validation
loader serves the task's test split (the held-out fifth for ``digits`` / ``mnist_subset``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset

from t2v_lightning.data.registry import build_task, describe_task, download_dataset, get_entry
from t2v_lightning.data.sources import DataSource, check_source, data_files_tuple
from t2v_lightning.data.task import (
    DatasetNotFoundError,
    Normalize,
    Task,
    TaskInfo,
    check_input_size,
    check_normalize,
    get_targets,
)
from t2v_lightning.labels import select_examples
from t2v_lightning.safety import check_seed


def sample_indices(
    targets: list[int], max_samples: int | None, balanced: bool, seed: int
) -> list[int]:
    """Seeded indices of the examples to use (see the module docstring).

    Args:
        targets: the label of every example.
        max_samples: how many indices; ``None`` for as many as there are examples.
        balanced: class-balanced draw with replacement, else a permutation cut to size.
        seed: seed of the generator.

    Example:
        >>> sample_indices([0, 0, 0, 1], max_samples=3, balanced=False, seed=0)
        [0, 1, 3]
    """
    labels = torch.as_tensor(targets, dtype=torch.long)
    drawn = select_examples(labels, max_samples, balanced, seed, shuffle=True)
    return [int(i) for i in drawn]


class TaskDataModule(pl.LightningDataModule):
    """One task of the dataset registry: a fixed, seeded sample of its training split.

    ``num_classes``, ``task_name`` and ``task_metadata`` are known right after construction
    (from the registry's description of the task, which reads no images; iNat reads its
    annotation files once), so LightningCLI can link ``data.num_classes`` to a model argument.

    Args:
        name: registered dataset name (``t2v_lightning.data.registry.list_datasets()``), e.g.
            ``digits``, ``fashion_mnist_tops``, ``split_cifar``, ``cub_inat2018``; or your own
            data: ``imagefolder``, ``hf``, ``csv``, ``jsonl``.
        root: data folder (torchvision's layout; CUB / iNat as the download scripts lay it out);
            for ``imagefolder`` the folder with one subfolder per class, for ``csv`` / ``jsonl``
            the file.
        task_id: task of a multi-task dataset (``split_*``, ``cub``, ``inat2018``,
            ``cub_inat2018``); ``None`` for single-task datasets.
        input_size: image side in pixels; ``None`` keeps the native size of the small sets and
            uses 224 for CUB / iNat.
        batch_size: examples per batch.
        num_workers: DataLoader worker processes.
        max_samples: how many training examples to draw; ``None`` for the split's size.
        balanced_sampling: draw with replacement with weights 1 / class count (the reference);
            otherwise a seeded subset without replacement.
        seed: seed of the draw.
        download: let torchvision fetch missing files of the small benchmarks
            (in ``prepare_data``).
        train: serve the training split (``True``) or the test split as ``train_dataset``.
        normalize: ``imagenet`` (mean/std) or ``none``.
        classes: optional subset of the task's labels, relabelled ``0 .. C - 1``.
        path: ``hf``: the Hugging Face dataset (Hub name, local folder, or a packaged builder
            such as ``parquet``, ``json``, ``csv``, ``imagefolder`` reading ``data_files``).
        config: ``hf``: the dataset's configuration.
        split: ``hf``: the split read.
        data_files: ``hf``: local files (or globs) for a packaged builder.
        image_column: ``hf``: the image column (default ``image`` when present).
        text_column: ``hf``, ``csv``, ``jsonl``: the sentence column (default ``text``).
        label_column: ``hf``, ``csv``, ``jsonl``: the label column (integers, strings or a
            ``ClassLabel``; numbered in sorted order).
        streaming: ``hf``: read only the first ``max_samples`` rows, lazily.
    """

    def __init__(
        self,
        name: str = "digits",
        root: str = "data",
        task_id: int | None = None,
        input_size: int | None = None,
        batch_size: int = 100,
        num_workers: int = 0,
        max_samples: int | None = None,
        balanced_sampling: bool = True,
        seed: int = 0,
        download: bool = False,
        train: bool = True,
        normalize: Normalize = "imagenet",
        classes: list[int] | None = None,
        path: str | None = None,
        config: str | None = None,
        split: str = "train",
        data_files: str | list[str] | None = None,
        image_column: str | None = None,
        text_column: str | None = None,
        label_column: str = "label",
        streaming: bool = False,
    ) -> None:
        super().__init__()
        entry = get_entry(name)  # unknown name: ValueError listing the known ones
        files = data_files_tuple(data_files)
        self.source = DataSource(
            path, config, split, files, image_column, text_column, label_column, bool(streaming)
        )
        check_source(name, self.source)
        check_input_size(input_size)
        check_normalize(normalize)
        if isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 1):
            raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
        check_seed(seed)
        self.save_hyperparameters()
        self.dataset_name = name
        self.root = root
        self.task_id = task_id
        self.input_size = input_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_samples = max_samples
        self.balanced_sampling = balanced_sampling
        self.seed = seed
        self.download = download
        self.train = train
        self.normalize = normalize
        self.classes = None if classes is None else [int(c) for c in classes]
        self._task: Task | None = None
        if entry.build_source is not None:
            # Your own data: its labels are read to know the classes; read it once.
            self._task = self._build(train)
            self._info = TaskInfo(
                self._task.name, self._task.num_classes, dict(self._task.metadata)
            )
        else:
            self._info = describe_task(name, root, task_id, self.classes)
        self._val_task: Task | None = None
        self._train_dataset: Subset[Any] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes of the task."""
        return self._info.num_classes

    @property
    def task_name(self) -> str:
        """Human-readable task name."""
        return self._info.name

    @property
    def task_metadata(self) -> dict[str, Any]:
        """JSON-serialisable metadata (taxonomy for CUB / iNat tasks), plus the sampling."""
        meta = dict(self._task.metadata if self._task is not None else self._info.metadata)
        meta.update(
            max_samples=self.max_samples, balanced_sampling=self.balanced_sampling, seed=self.seed
        )
        return meta

    def _build(self, train: bool) -> Task:
        # With download=True the files are normally fetched in prepare_data (rank 0); passing the
        # flag on covers use without a Trainer, and is a no-op once the files are there.
        return build_task(
            self.dataset_name,
            self.root,
            self.task_id,
            train,
            self.input_size,
            self.download,
            self.normalize,
            self.classes,
            self.source,
            self.max_samples,
        )

    @property
    def task(self) -> Task:
        """The whole split (before sampling), built on first use."""
        if self._task is None:
            self._task = self._build(self.train)
        return self._task

    def prepare_data(self) -> None:
        """Download the files (rank 0 only) when ``download=True``."""
        if self.download and get_entry(self.dataset_name).download is not None:
            download_dataset(self.dataset_name, self.root)

    def setup(self, stage: str | None = None) -> None:
        """Build the task and draw the training sample (once)."""
        self._sample()

    def _sample(self) -> Subset[Any]:
        if self._train_dataset is None:
            task = self.task
            targets = get_targets(task.dataset)
            indices = sample_indices(targets, self.max_samples, self.balanced_sampling, self.seed)
            self._train_dataset = Subset(task.dataset, indices)
            rank_zero_info(
                f"{self.task_name}: {len(indices)} of {len(targets)} examples "
                f"({'class-balanced, with replacement' if self.balanced_sampling else 'subset'},"
                f" seed {self.seed}), {self.num_classes} classes"
            )
        return self._train_dataset

    @property
    def train_dataset(self) -> Dataset[tuple[torch.Tensor, int]]:
        """The sampled training examples (drawn on first use)."""
        return self._sample()

    @property
    def train_indices(self) -> list[int]:
        """Indices into ``task.dataset`` of the sampled examples, in serving order."""
        return list(self._sample().indices)

    def train_dataloader(self) -> DataLoader[Any]:
        """The sampled examples in their drawn order (not reshuffled)."""
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader[Any] | list[DataLoader[Any]]:
        """The task's test split (none while fitting a task that has no test split, such as a
        CSV file or an image folder without ``val/`` or ``test/``)."""
        entry = get_entry(self.dataset_name)
        trainer = self.trainer
        fitting = trainer is not None and trainer.state.fn == "fit"
        if not entry.has_test_split:
            if fitting:
                return []  # fit without validation
            raise ValueError(f"dataset {self.dataset_name!r} has no test split for validation")
        if self._val_task is None:
            try:
                self._val_task = self._build(False)
            except DatasetNotFoundError:
                if fitting and entry.build_source is not None:
                    return []  # your own folder without a held-out split: fit without validation
                raise
        return DataLoader(
            self._val_task.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
