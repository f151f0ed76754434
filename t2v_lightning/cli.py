"""The ``t2v`` command: ``fit``, ``validate``, ``embed`` (LightningCLI), ``distance``, ``select``.

* ``t2v fit``: trains the classifier head of a probe on one task (:class:`ProbeClassifier`) and
  saves a Lightning checkpoint holding that head;
* ``t2v validate``: the head's accuracy on the task's test split;
* ``t2v embed``: fits a head on cached features (or loads the one of ``--ckpt_path``) and writes
  the task's embedding artifact; over several datasets or task ids it loads the probe once,
  writes one artifact per task and skips the tasks whose artifact exists;
* ``t2v distance FILES...``: the distance matrix between artifacts, as CSV and as a clustered
  figure;
* ``t2v select --target T --experts DIR_OR_FILES...``: the experts ranked for a target task by
  the asymmetric distance (SPEC section 4);
* ``t2v diversity --probe lm:DIR --data CORPUS --output DIR``: the diversity coefficient of a
  text corpus (SPEC section 8; :mod:`t2v_lightning.lm_diversity`).

Options are the typed ``__init__`` arguments of :class:`ProbeClassifier` (``--model.*``),
:class:`~t2v_lightning.data.datamodule.TaskDataModule` (``--data.*``) and Lightning's Trainer
(``--trainer.*``), and the arguments of :meth:`EmbeddingTrainer.embed`; YAML configs
(``--config configs/montecarlo.yaml``) set the same keys.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import pickle
import re
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from typing_extensions import override

from t2v_lightning.allocator import keep_freed_memory
from t2v_lightning.choices import FisherError
from t2v_lightning.cli_checks import (
    KeepingConfigSaver,
    argument_defaults,
    check_checkpoint_identity,
    check_embed_trainer_options,
    check_output_template,
    expected_settings,
    settings_difference,
    smoke_test_batches,
)
from t2v_lightning.data.datamodule import TaskDataModule
from t2v_lightning.data.folders import task_folders
from t2v_lightning.data.registry import get_entry, num_tasks
from t2v_lightning.data.sources import SOURCE_DATASETS, DataSource, check_probe_fits, source_label
from t2v_lightning.embedding import artifact_damage
from t2v_lightning.outputs import check_new_outputs, check_output_path, write_atomically
from t2v_lightning.probe_classifier import ProbeClassifier
from t2v_lightning.safety import (
    ALLOWED_IMPORTS,
    check_checkpoint_path,
    interrupted,
    restrict_config_reading,
    terminal_text,
    trainer_options_checked,
)
from t2v_lightning.similarity.report import nearest_tasks, write_csv, write_distance_csv
from t2v_lightning.trainers import phase_progress

__all__ = [
    "EmbeddingJob",
    "EmbeddingTrainer",
    "SUBCOMMANDS",
    "T2VCLI",
    "distance_main",
    "embedding_jobs",
    "expert_files",
    "main",
    "parse_task_ids",
    "select_main",
]

DEFAULT_OUTPUT = "embeddings/{task}.safetensors"

_TASK_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
# The most task ids one --tasks may list (cub_inat2018 has 232).
MAX_TASK_IDS = 100_000


def parse_task_ids(spec: str, count: int | None = None) -> list[int]:
    """Task ids from a list of ids and inclusive ranges: ``"0-9,12,20-29"``, or ``"all"``.

    Args:
        spec: comma-separated ids and ``a-b`` ranges (both ends included), or ``all``.
        count: number of tasks of the dataset; ids must be below it (``all`` needs it).

    Returns:
        The ids in the order given, without repeats.

    Example:
        >>> parse_task_ids("0-3,7,2")
        [0, 1, 2, 3, 7]
    """
    if spec.strip().lower() == "all":
        if count is None:
            raise ValueError("tasks='all' needs a dataset with several tasks")
        return list(range(count))
    ranges: list[range] = []
    bad: list[int] = []  # the first few ids out of range, found without listing every id
    for part in spec.split(","):
        match = _TASK_RANGE.match(part)
        if match is None:
            raise ValueError(
                f"tasks={spec!r}: {part!r} is not a task id or an a-b range (example: '0-9,12')"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"tasks={spec!r}: the range {part.strip()!r} is empty")
        if count is not None and last >= count:
            start = max(first, count)
            bad.extend(range(start, min(last + 1, start + 5)))
        ranges.append(range(first, last + 1))
    if bad:
        raise ValueError(
            f"tasks={spec!r}: task ids {sorted(set(bad))[:5]} are out of range (the dataset has "
            f"{count} tasks: 0-{count - 1})"
            if count
            else f"tasks={spec!r}: the dataset has no tasks"
        )
    if sum(len(r) for r in ranges) > MAX_TASK_IDS:
        raise ValueError(
            f"tasks={spec!r} lists more than {MAX_TASK_IDS:,} task ids; no dataset has that many"
        )
    return list(dict.fromkeys(i for r in ranges for i in r))


@dataclass(frozen=True)
class EmbeddingJob:
    """One task to embed: a registered dataset, a task id (None: single task), an output file.

    ``root`` is the task folder of an ``imagefolder`` sweep (None: the data module's root);
    ``label`` is the ``{task}`` of your own data (a folder's or file's name).
    """

    dataset: str
    task_id: int | None
    output: Path
    root: str | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        """How logs and ``{task}`` name the task: ``digits``, ``cub_inat2018_017``, ``birds``."""
        return self.label if self.label is not None else _task_label(self.dataset, self.task_id)


def _task_label(dataset: str, task_id: int | None) -> str:
    return dataset if task_id is None else f"{dataset}_{task_id:03d}"


def embedding_jobs(
    datasets: Sequence[str],
    root: str,
    tasks: str | None,
    default_task_id: int | None,
    output: str,
    shard_index: int = 0,
    num_shards: int = 1,
    source: DataSource | None = None,
    task_folders_in: str | None = None,
) -> list[EmbeddingJob]:
    """The tasks one ``t2v embed`` run covers, with their output files.

    Args:
        datasets: registered dataset names; with ``task_folders_in``, glob patterns of task
            folders (``*``).
        root: data folder (only read to count the tasks of iNat-based datasets).
        tasks: task ids of the multi-task datasets (see :func:`parse_task_ids`); None uses
            ``default_task_id``.
        default_task_id: ``--data.task_id``.
        output: a path that may contain ``{dataset}``, ``{task_id}`` and ``{task}`` (``digits``
            or ``cub_inat2018_017``), or an existing folder / a path ending in ``/`` (then
            ``{task}.safetensors`` inside it).
        shard_index: this run's share of the jobs: ``jobs[shard_index::num_shards]``.
        num_shards: how many runs share the jobs.
        source: where ``hf`` / ``csv`` / ``jsonl`` read (names their ``{task}``).
        task_folders_in: a folder of ``imagefolder`` task folders: one job per folder matching
            ``datasets``, ``{task}`` the folder's name, ``{task_id}`` its position.

    Raises:
        ValueError: unknown dataset, bad task ids, bad shard, or an output that would give two
            tasks the same file.
    """
    if not datasets:
        raise ValueError("datasets must name at least one dataset")
    if isinstance(num_shards, bool) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    if isinstance(shard_index, bool) or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in 0..{num_shards - 1}, got {shard_index!r}")
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        output = os.path.join(output, "{task}.safetensors")
    pairs: list[tuple[str, int | None]] = []
    folders: list[Path] = []
    if task_folders_in is not None:
        folders = task_folders(task_folders_in, datasets)
        datasets = []
    for dataset in datasets:
        entry = get_entry(dataset)
        single = entry.max_tasks is None
        if tasks is None:
            if not single and default_task_id is None:
                raise ValueError(
                    f"dataset {dataset!r} has several tasks: pass --tasks (e.g. '0-9' or 'all') "
                    "or --data.task_id"
                )
            pairs.append((dataset, None if single else default_task_id))
        elif single:
            raise ValueError(f"--tasks is given but dataset {dataset!r} has a single task")
        else:
            ids = parse_task_ids(tasks, num_tasks(dataset, root))
            pairs.extend((dataset, task_id) for task_id in ids)
    check_output_template(output, ("dataset", "task_id", "task"))  # before formatting it
    jobs: list[EmbeddingJob] = []
    named: list[tuple[str, int | None, str | None, str | None]] = [
        (
            dataset,
            task_id,
            None,
            source_label(dataset, root, source or DataSource())
            if dataset in SOURCE_DATASETS
            else None,
        )
        for dataset, task_id in pairs
    ]
    named += [
        ("imagefolder", None, str(folder), source_label("imagefolder", str(folder), DataSource()))
        for folder in folders
    ]
    for number, (dataset, task_id, task_root, label) in enumerate(named):
        name = label if label is not None else _task_label(dataset, task_id)
        position = task_id if task_id is not None else (number if task_root is not None else 0)
        try:
            path = output.format(dataset=dataset, task_id=position, task=name)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"output={output!r} is not a valid template ({type(err).__name__}: {err}); the "
                "fields are {dataset}, {task_id} and {task}"
            ) from err
        jobs.append(EmbeddingJob(dataset, task_id, Path(path), task_root, label))
    seen: dict[Path, EmbeddingJob] = {}
    for job in jobs:
        if job.output in seen:
            other = seen[job.output]
            raise ValueError(
                f"output={output!r} gives {other.name} and {job.name} the same file "
                f"{str(job.output)!r}; put "
                "{task} (or {dataset} and {task_id}) in --output"
            )
        seen[job.output] = job
    return jobs[shard_index::num_shards]


class _TargetsView:
    """The sampled examples of a data module, with their labels readable without the images."""

    def __init__(self, datamodule: TaskDataModule) -> None:
        from t2v_lightning.data.task import get_targets

        self.dataset = datamodule.train_dataset
        self.targets = get_targets(self.dataset)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def _public(hparams: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(hparams).items() if not k.startswith("_")}


def _sibling(datamodule: TaskDataModule, job: EmbeddingJob) -> TaskDataModule:
    """A data module like ``datamodule`` (same sampling, size, root...) for another task."""
    accepted = inspect.signature(type(datamodule).__init__).parameters
    settings = {k: v for k, v in datamodule.hparams.items() if k in accepted and k != "self"}
    settings.update(name=job.dataset, task_id=job.task_id)
    if job.root is not None:
        settings.update(root=job.root)
    return type(datamodule)(**settings)


def _task_data(
    datamodule: TaskDataModule, job: EmbeddingJob, built: dict[EmbeddingJob, TaskDataModule]
) -> TaskDataModule:
    """The data module of ``job``: ``datamodule`` for its own task, else a sibling built once
    (kept in ``built`` until the caller drops it)."""
    if (
        job.dataset == datamodule.dataset_name
        and job.task_id == datamodule.task_id
        and job.root in (None, datamodule.root)
    ):
        return datamodule
    if job not in built:
        built[job] = _sibling(datamodule, job)
    return built[job]


def _check_writable(path: Path) -> None:
    """Raise unless ``path``'s folder exists and is writable, or can be created."""
    existing = Path(os.path.abspath(path.parent))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: folder {existing} is not writable")


class EmbeddingTrainer(pl.Trainer):
    """Lightning's Trainer with an ``embed`` entry point (the ``t2v embed`` subcommand)."""

    def embed(
        self,
        model: ProbeClassifier,
        datamodule: TaskDataModule,
        output: str = DEFAULT_OUTPUT,
        ckpt_path: str | None = None,
        overwrite: bool = False,
        datasets: list[str] | None = None,
        tasks: str | None = None,
        shard_index: int = 0,
        num_shards: int = 1,
        fisher_checkpoint_dir: str | None = None,
        resume_mismatch: Literal["stop", "reembed"] = "stop",
    ) -> list[Path]:
        """Embed tasks: fit the probe's head (or load it) and write each task's artifact.

        Without ``ckpt_path`` a fresh head is fitted for ``--trainer.max_epochs`` epochs on
        cached features; with it, the head fitted by ``t2v fit`` is used as it is. The probe is
        loaded once for all tasks.

        Args:
            model: the probe (``--model.*``).
            datamodule: the task and its sampling (``--data.*``); with ``datasets`` or ``tasks``
                it is the template of every task's data.
            output: artifact path; may contain ``{dataset}``, ``{task_id}`` and ``{task}``
                (``digits``, ``cub_inat2018_017``); a folder (ending in ``/``) gets
                ``{task}.safetensors``. Parent folders are created.
            ckpt_path: a checkpoint of ``t2v fit``: embed with its fitted head (one task only).
            overwrite: replace existing artifacts. Without it, a single task refuses to
                overwrite its file and several tasks skip the ones already written (so an
                interrupted sweep resumes).
            datasets: several registered datasets to embed in turn (default: ``--data.name``);
                with ``--data.name imagefolder``, glob patterns of task folders in
                ``--data.root`` (``'*'``: every folder there), one artifact per folder.
            tasks: task ids of a multi-task dataset: ``0-9,12`` (ranges include both ends) or
                ``all``; replaces ``--data.task_id``.
            shard_index: embed only the tasks ``shard_index, shard_index + num_shards, ...``
                of the list (e.g. ``$SLURM_ARRAY_TASK_ID``).
            num_shards: number of runs that share the list (e.g. ``$SLURM_ARRAY_TASK_COUNT``).
            fisher_checkpoint_dir: folder for Fisher-pass checkpoints; a task interrupted in
                its Fisher pass resumes from there.
            resume_mismatch: what a sweep does with an existing artifact made with other
                settings (another task, probe, estimator, max_samples, seed...): ``stop``
                (exit 2, naming what differs; the default) or ``reembed`` (embed the task again
                and replace the file). An artifact that matches is skipped either way.

        With ``--trainer.fast_dev_run`` the run is a smoke test: the first task only, on as
        many batches of examples as ``fast_dev_run`` says, one epoch of head fitting, and no
        artifact written.

        Returns:
            The artifacts written by this run.
        """
        hp = datamodule.hparams
        folder_sweep = datamodule.dataset_name == "imagefolder" and bool(datasets)
        jobs = embedding_jobs(
            datasets or [datamodule.dataset_name],
            datamodule.root,
            tasks,
            datamodule.task_id,
            output,
            shard_index,
            num_shards,
            source=datamodule.source,
            task_folders_in=os.path.dirname(os.path.abspath(datamodule.root))
            if folder_sweep
            else None,
        )
        several = (
            len(jobs) > 1
            or tasks is not None
            or bool(datasets and len(datasets) > 1)
            or folder_sweep
        )
        if ckpt_path is not None and several:
            raise ValueError(
                "--ckpt_path holds the head of one task; it cannot be combined with several "
                "tasks (drop --tasks / --datasets, or embed without --ckpt_path)"
            )
        head_epochs = self.max_epochs
        if ckpt_path is None and (head_epochs is None or head_epochs < 0):
            raise ValueError(
                f"--trainer.max_epochs sets the epochs of head fitting; got {head_epochs}"
            )
        if resume_mismatch not in ("stop", "reembed"):
            raise ValueError(
                f"--resume_mismatch must be 'stop' or 'reembed', got {resume_mismatch!r}"
            )
        if ckpt_path is not None:
            model.load_head(ckpt_path)
        smoke = smoke_test_batches(getattr(self, "fast_dev_run", False)) > 0
        if smoke:
            jobs = jobs[:1]
        todo: list[EmbeddingJob] = []
        built: dict[EmbeddingJob, TaskDataModule] = {}  # the other tasks' data modules
        damaged: set[Path] = set()  # existing artifacts to replace: unreadable, or other settings
        for job in jobs:
            check_output_path(job.output, "--output")  # a device, FIFO or folder; too long a name
            if fisher_checkpoint_dir is not None:
                _check_writable(Path(fisher_checkpoint_dir) / job.name / "last.ckpt")
            if smoke:  # nothing is written
                todo.append(job)
                continue
            if os.path.lexists(job.output) and not overwrite:
                if not several:
                    raise FileExistsError(
                        f"{job.output} already exists; pass --overwrite to replace it"
                    )
                label = job.name
                damage = artifact_damage(job.output)
                if damage is None:
                    data = _task_data(datamodule, job, built)
                    difference = _resume_difference(
                        model, data, job, int(head_epochs or 0), ckpt_path
                    )
                    if difference is None:
                        built.pop(job, None)
                        rank_zero_info(f"skipping {label}: {job.output} exists")
                        continue
                    if resume_mismatch == "stop":
                        raise ValueError(
                            f"{job.output} exists but was made with other settings than this "
                            f"run's ({difference}); pass --resume_mismatch reembed to embed "
                            f"{label} again and replace it, or choose another --output"
                        )
                    rank_zero_info(
                        f"{job.output} was made with other settings ({difference}); "
                        f"embedding {label} again"
                    )
                else:
                    rank_zero_info(f"{job.output} is damaged ({damage}); embedding {label} again")
                damaged.add(job.output)
            _check_writable(job.output)  # before any work, not after an hour of it
            todo.append(job)
        # Task folders are read before any work: a bad one stops the sweep before the first.
        folders = [_task_data(datamodule, job, built) for job in todo if job.root is not None]
        for data in {id(data): data for data in [datamodule, *folders]}.values():
            check_probe_fits(model.hparams["probe"], data.task_metadata, data.task_name)
        if smoke:
            rank_zero_info(
                "fast_dev_run: a smoke test of the first task on a few examples; no "
                "artifact is written"
            )
        else:
            rank_zero_info(f"embedding {len(todo)} task(s) ({len(jobs) - len(todo)} already done)")
        for logger in self.loggers:
            logger.log_hyperparams({"model": _public(model.hparams), "data": _public(hp)})
        written: list[Path] = []
        for number, job in enumerate(todo):
            data = _task_data(datamodule, job, built)
            built.pop(job, None)  # not held once embedded
            check_probe_fits(model.hparams["probe"], data.task_metadata, data.task_name)
            data.prepare_data()
            data.setup("fit")
            checkpoint_dir = None
            if fisher_checkpoint_dir is not None:
                checkpoint_dir = os.path.join(fisher_checkpoint_dir, job.name)
            task2vec = model.task2vec(
                self,
                fitted_head=ckpt_path is not None,
                head_epochs=int(head_epochs or 0),
                batch_size=data.batch_size,
                num_workers=data.num_workers,
                checkpoint_dir=checkpoint_dir,
            )
            rank_zero_info(
                f"[{number + 1}/{len(todo)}] {terminal_text(data.task_name)} -> {job.output}"
            )
            start = time.perf_counter()
            embedding = task2vec.embed(_TargetsView(data), task_name=data.task_name)  # type: ignore[arg-type]
            seconds = time.perf_counter() - start
            embedding.meta.update(
                dataset=job.dataset,
                task_id=job.task_id,
                task_metadata=data.task_metadata,
                max_samples=data.max_samples,
                balanced_sampling=data.balanced_sampling,
                data_seed=data.seed,
                checkpoint=None if ckpt_path is None else os.fspath(ckpt_path),
            )
            # Under DDP the embedding Trainers run every rank; all hold the reduced embedding.
            if smoke:
                rank_zero_info(
                    f"fast_dev_run: {terminal_text(data.task_name)} embedded ({len(embedding)} "
                    f"entries); {job.output} not written"
                )
                continue
            if getattr(rank_zero_only, "rank", 0) == 0:
                job.output.parent.mkdir(parents=True, exist_ok=True)
                # Without --overwrite, a file that appeared meanwhile (another run) is kept.
                embedding.save(job.output, overwrite=overwrite or job.output in damaged)
                written.append(job.output)
            metrics = {"embed/seconds": seconds, "embed/entries": float(len(embedding))}
            accuracy = embedding.meta.get("head_train_accuracy")
            if accuracy is not None:
                metrics["embed/head_train_accuracy"] = float(accuracy)
            for logger in self.loggers:
                logger.log_metrics(metrics, step=number)
            rank_zero_info(f"wrote {job.output} ({len(embedding)} entries, {seconds:.1f} s)")
        for logger in self.loggers:
            logger.save()
        return written


def _resume_difference(
    model: ProbeClassifier,
    data: TaskDataModule,
    job: EmbeddingJob,
    head_epochs: int,
    ckpt_path: str | None,
) -> str | None:
    """How the artifact at ``job.output`` differs from what this run would write on ``data``."""
    from t2v_lightning.embedding import TaskEmbedding

    expected = expected_settings(
        model, data, head_epochs, None if ckpt_path is None else os.fspath(ckpt_path)
    )
    return settings_difference(TaskEmbedding.load(job.output).meta, expected)


# No abbreviated options (a typo such as --model.skip_layer must fail, not match a longer name);
# parse errors raise, so that main() reports them in one line.
_STRICT_PARSING: dict[str, Any] = {"allow_abbrev": False, "exit_on_error": False}


class T2VCLI(LightningCLI):
    """LightningCLI for :class:`ProbeClassifier` and ``TaskDataModule`` with an ``embed`` command.

    ``data.num_classes`` is linked to ``model.num_classes``. The Trainer defaults to 10 epochs
    (the reference's head fitting), seed 0, and a CSV logger under ``lightning_logs/``.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        restrict_config_reading()  # class paths of configs are checked before any import
        super().__init__(
            ProbeClassifier,
            TaskDataModule,
            trainer_class=EmbeddingTrainer,
            trainer_defaults={
                "max_epochs": 10,
                "logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": ".", "name": "lightning_logs"},
                },
            },
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_callback=KeepingConfigSaver,  # never over an existing config.yaml
            parser_kwargs={
                "prog": "t2v",
                "description": (
                    "Task2Vec task embeddings. Subcommands: fit (train a probe's head on a task), "
                    "validate, embed (write embedding artifacts). Compare artifacts with "
                    "'t2v distance FILES... --out matrix.png --csv matrix.csv'."
                ),
                **_STRICT_PARSING,
                **{name: dict(_STRICT_PARSING) for name in self.subcommands()},
            },
            args=list(args) if args is not None else None,
            run=run,
        )

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "embed": {"model", "datamodule"},
        }

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces every model argument by the checkpoint's. For embed only the
        # probe's identity comes from the checkpoint; skip_layers, method, estimator... stay
        # the user's (they choose how to measure the fitted model, not what it is).
        # Every checkpoint is a local file read with weights_only=True before Lightning sees it
        # (Lightning loads URLs with weights_only=False).
        # Whatever the subcommand, the checkpoint's task and probe must be the ones asked for.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        checkpoint = check_checkpoint_path(ckpt_path) if ckpt_path else None
        if checkpoint is not None:
            check_checkpoint_identity(
                checkpoint,
                self.config[subcommand]["model"],
                self.config[subcommand]["data"],
                f"--ckpt_path {ckpt_path!r}",
                argument_defaults(ProbeClassifier.__init__),
            )
        if subcommand != "embed":
            if ckpt_path and "weights_only" in self.config[subcommand]:
                self.config[subcommand]["weights_only"] = True
            super()._parse_ckpt_path()

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    @override
    def before_instantiate_classes(self) -> None:
        # With --tasks / --datasets the data module is a template: make it the first task so
        # that it (and the model's num_classes) can be built.
        if self.subcommand != "embed":
            return
        config = self.config["embed"]
        data = config["data"]
        check_embed_trainer_options(config["trainer"])  # limits embed cannot apply: refused
        batches = smoke_test_batches(config["trainer"].get("fast_dev_run"))
        if batches:  # a smoke test: a few batches of examples
            smoke = batches * int(data["batch_size"])
            data["max_samples"] = min(data["max_samples"] or smoke, smoke)
        datasets = config.get("datasets")
        if datasets and data["name"] == "imagefolder":
            # A folder of task folders: --datasets are glob patterns of its folders. The data
            # module becomes the first task folder; the list, the folders themselves.
            folders = task_folders(data["root"], datasets)
            config["datasets"] = [glob.escape(os.path.abspath(f)) for f in folders]
            data["root"] = str(folders[0])
            return
        if datasets:
            data["name"] = datasets[0]
        tasks = config.get("tasks")
        if tasks is not None and get_entry(data["name"]).max_tasks is not None:
            ids = parse_task_ids(tasks, num_tasks(data["name"], data["root"]))
            if ids and data.get("task_id") not in ids:
                data["task_id"] = ids[0]

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # fit trains the head, validate measures it: title their progress (bars on a terminal,
        # lines elsewhere) unless progress is off or the user gave a progress bar
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        phase = {"fit": "head fitting", "validate": "validation"}.get(self.subcommand or "")
        if (
            phase is not None
            and config.get("enable_progress_bar") is not False
            and not any(isinstance(c, ProgressBar) for c in callbacks)
        ):
            kwargs.setdefault("callbacks", [*callbacks, phase_progress(phase)])
        with trainer_options_checked():
            return super().instantiate_trainer(**kwargs)

    def _check_probe_fits(self) -> None:
        data = self.datamodule
        check_probe_fits(self.model.hparams["probe"], data.task_metadata, data.task_name)

    def before_fit(self) -> None:
        """Refuse a text task with an image probe (and the reverse) before training."""
        self._check_probe_fits()

    def before_validate(self) -> None:
        """Refuse a text task with an image probe (and the reverse)."""
        self._check_probe_fits()

    def after_fit(self) -> None:
        """Say where the head's checkpoint went."""
        callback = self.trainer.checkpoint_callback
        path = getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")
        if path:
            rank_zero_info(f"head checkpoint: {path} (embed with: t2v embed --ckpt_path {path})")


# ------------------------------------------------------------------------------ distance
def _distance_parser() -> argparse.ArgumentParser:
    from t2v_lightning.similarity.distance import DISTANCES

    parser = argparse.ArgumentParser(
        prog="t2v distance",
        description="Distances between task embedding artifacts: the matrix as CSV, a clustered "
        "figure, and each task's nearest other task.",
    )
    parser.add_argument("files", nargs="+", help="embedding artifacts (.safetensors)")
    parser.add_argument(
        "--distance",
        default="cosine",
        choices=DISTANCES,
        help="distance between embeddings (default: cosine)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="write the clustered distance matrix figure here (.png, .pdf, .svg)",
    )
    parser.add_argument("--csv", default=None, help="write the distance matrix here as CSV")
    parser.add_argument("--title", default=None, help="title of the figure")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing --out / --csv files"
    )
    parser.add_argument(
        "--assume_comparable",
        action="store_true",
        help="compare artifacts that record no probe fingerprint or layer table "
        "(refused otherwise: nothing says they were made with the same probe)",
    )
    return parser


def task_names(embeddings: Sequence[Any], files: Sequence[str | os.PathLike[str]]) -> list[str]:
    """A unique display name per artifact: its task name, else its file name."""
    names = [terminal_text(e.name) or Path(f).stem for e, f in zip(embeddings, files)]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [f"{n} ({Path(f).stem})" if counts[n] > 1 else n for n, f in zip(names, files)]


def distance_main(argv: Sequence[str]) -> None:
    """``t2v distance FILES... [--distance cosine] [--out matrix.png] [--csv matrix.csv]``."""
    from t2v_lightning.embedding import TaskEmbedding
    from t2v_lightning.similarity.distance import check_distance_defined, pdist

    options = _distance_parser().parse_args(list(argv))
    check_new_outputs(
        {"--csv": options.csv, "--out": options.out},
        options.files,
        options.overwrite,
        refused_suffix=".safetensors",
    )  # never over an artifact
    if options.out:
        figure_format(options.out)  # an extension matplotlib can write, before any work
    embeddings = [TaskEmbedding.load(f) for f in options.files]
    for embedding, file in zip(embeddings, options.files):
        check_distance_defined(embedding, options.distance, file)
    names = task_names(embeddings, options.files)
    matrix = pdist(embeddings, options.distance, assume_comparable=options.assume_comparable)
    figure = None
    if options.out:  # drawn before anything is written: a failure leaves no file behind
        figure = distance_figure(matrix, names, options.distance, options.title)
    if options.csv:
        write_distance_csv(options.csv, names, matrix, overwrite=options.overwrite)
    if options.out and figure is not None:
        save_figure(figure, options.out, overwrite=options.overwrite)
    width = max(len(n) for n in names)
    print(f"nearest task by {options.distance} distance:")
    for name, other, distance in nearest_tasks(names, matrix):
        print(f"  {name:<{width}}  ->  {other:<{width}}  {distance:.4f}")
    for label, path in (("matrix", options.csv), ("figure", options.out)):
        if path:
            print(f"{label}: {path}")


def figure_format(path: str | os.PathLike[str], what: str = "--out") -> str:
    """The matplotlib format of ``path``'s extension; a ValueError naming ``what`` if none."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        said = f"has the extension .{suffix}" if suffix else "has no extension"
        raise ValueError(
            f"{what} {os.fspath(path)!r} {said}; the figure's format is read from it: "
            f"{', '.join('.' + name for name in sorted(formats))}"
        )
    return suffix


def distance_figure(
    matrix: Any, names: Sequence[str], distance: str, title: str | None = None
) -> Any:
    """The clustered distance matrix as a matplotlib figure (nothing written)."""
    from t2v_lightning.plot import plot_distance_matrix

    return plot_distance_matrix(matrix, labels=list(names), title=title or f"{distance} distance")


def save_figure(figure: Any, path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Render ``figure`` to ``path`` atomically (rendered in memory first, then written)."""
    import io

    path = Path(path)
    file_format = figure_format(path)  # the temporary's suffix is .tmp
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=150, format=file_format)  # a label that fails, fails here
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(name: str) -> None:
        Path(name).write_bytes(buffer.getvalue())

    write_atomically(path, write, overwrite, what="--out")


def save_distance_figure(
    path: str | os.PathLike[str],
    matrix: Any,
    names: Sequence[str],
    distance: str,
    title: str | None = None,
    overwrite: bool = False,
) -> None:
    """Draw the clustered distance matrix and save it to ``path`` (atomically)."""
    save_figure(distance_figure(matrix, names, distance, title), path, overwrite)


# ------------------------------------------------------------------------------ select
class _SelectArgumentError(ValueError):
    """A mistake in the ``t2v select`` command line (reported in one line by ``main``)."""


class _SelectParser(argparse.ArgumentParser):
    @override
    def error(self, message: str) -> NoReturn:
        raise _SelectArgumentError(f"select: {message} (see: t2v select --help)")


def _select_parser() -> argparse.ArgumentParser:
    from t2v_lightning.similarity.distance import DISTANCES
    from t2v_lightning.similarity.selection import DEFAULT_ALPHA
    from t2v_lightning.similarity.transferability import TRANSFERABILITY_METHODS

    parser = _SelectParser(
        prog="t2v select",
        description="Rank pretrained experts for a target task by the asymmetric Task2Vec "
        "distance d(target, source) - alpha * d(source, trivial), from the embeddings of the "
        "target task and of each expert's training task (same probe). The first row is the "
        "pick.",
        allow_abbrev=False,
    )
    parser.add_argument("--target", required=True, help="embedding artifact of the target task")
    parser.add_argument(
        "--experts",
        required=True,
        nargs="+",
        metavar="DIR_OR_FILE",
        help="artifacts of the experts' training tasks, or folders of them "
        "(every *.safetensors inside; the target itself is left out)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"weight of the source's complexity (default: {DEFAULT_ALPHA})",
    )
    parser.add_argument(
        "--distance",
        default="cosine",
        choices=DISTANCES,
        help="symmetric distance d (default: cosine)",
    )
    parser.add_argument("--csv", default=None, help="also write the ranking here as CSV")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    parser.add_argument(
        "--assume_comparable",
        action="store_true",
        help="compare artifacts that record no probe fingerprint or layer table "
        "(refused otherwise: nothing says they were made with the same probe)",
    )
    rerank = parser.add_argument_group(
        "reranking",
        "reorder Task2Vec's first --top_k experts by a transferability estimator, "
        "from one forward pass of each shortlisted expert's model over the target's data",
    )
    rerank.add_argument(
        "--rerank",
        default=None,
        choices=TRANSFERABILITY_METHODS,
        help="the estimator (default: none, Task2Vec's order only)",
    )
    rerank.add_argument("--top_k", type=int, default=3, help="shortlist length (default: 3)")
    rerank.add_argument(
        "--models",
        default=None,
        metavar="DIR",
        help="folder of the experts' checkpoints, DIR/<expert>.safetensors "
        "(or .pt, .pth, .ckpt), each loaded by get_probe(--arch, weights=...)",
    )
    rerank.add_argument(
        "--arch",
        default=None,
        help="get_probe name of the experts' network (default: the target artifact's probe)",
    )
    rerank.add_argument(
        "--data",
        default=None,
        help="registered dataset of the target (default: the one recorded in the target artifact)",
    )
    rerank.add_argument("--data_root", default="data", help="data folder (default: data)")
    rerank.add_argument(
        "--input_size",
        type=int,
        default=None,
        help="image side (default: recorded in the artifact, else native)",
    )
    rerank.add_argument(
        "--max_samples",
        type=int,
        default=1000,
        help="target training examples scored (default: 1000)",
    )
    return parser


def _rerank_inputs(
    options: argparse.Namespace, target: Any, names: Sequence[str]
) -> tuple[dict[str, Any], Any]:
    """The shortlisted experts' models and the target's training examples for ``--rerank``."""
    import torch
    from torch.utils.data import Subset

    from t2v_lightning.data.registry import get_task
    from t2v_lightning.probe import get_probe

    if options.models is None or not Path(options.models).is_dir():
        raise ValueError(
            f"--rerank needs --models DIR, a folder of the experts' checkpoints "
            f"(got {options.models!r})"
        )
    if options.top_k < 1 or options.max_samples < 1:
        raise ValueError("--top_k and --max_samples must be positive")
    arch = options.arch or target.meta.get("probe")
    dataset = options.data or target.meta.get("dataset")
    if not arch or not dataset:
        raise ValueError(
            "--rerank needs --arch and --data (the target artifact records "
            f"probe={target.meta.get('probe')!r}, dataset="
            f"{target.meta.get('dataset')!r})"
        )
    models = {}
    for name in names:
        found = [
            Path(options.models) / f"{name}{suffix}"
            for suffix in (".safetensors", ".pt", ".pth", ".ckpt")
        ]
        found = [f for f in found if f.is_file()]
        if len(found) > 1:
            raise ValueError(
                f"--models: several checkpoints for expert {name!r}: {', '.join(map(str, found))}"
            )
        if found:
            models[name] = get_probe(arch, weights=found[0])
    task_id = target.meta.get("task_id") if options.data is None else None
    input_size = options.input_size or target.meta.get("input_size")
    task = get_task(dataset, options.data_root, task_id, train=True, input_size=input_size)
    generator = torch.Generator().manual_seed(0)
    size = len(task.dataset)  # type: ignore[arg-type]
    keep = torch.randperm(size, generator=generator)[: options.max_samples]
    return models, Subset(task.dataset, sorted(keep.tolist()))


def expert_files(
    sources: Sequence[str | os.PathLike[str]], exclude: str | os.PathLike[str] | None = None
) -> list[Path]:
    """The artifacts named by ``sources``: files as given, folders as their ``*.safetensors``.

    Args:
        sources: files and folders.
        exclude: a file left out wherever it appears (the target).

    Raises:
        FileNotFoundError: a source that does not exist.
        ValueError: a folder without artifacts, or nothing left.
    """
    skipped = os.path.realpath(exclude) if exclude is not None else None
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(path.glob("*.safetensors"))
            if not found:
                raise ValueError(f"expert folder {path} holds no .safetensors artifacts")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"expert artifact {path} does not exist")
    # One entry per real file, in the order first met, spelled as last given.
    kept: dict[str, Path] = {}
    for file in files:
        real = os.path.realpath(file)
        if real != skipped:
            kept[real] = file
    if not kept:
        raise ValueError("no expert artifacts besides the target")
    return list(kept.values())


def select_main(argv: Sequence[str]) -> None:
    """``t2v select --target T.safetensors --experts DIR_OR_FILES... [--alpha 0.15] [--csv F]``."""
    from t2v_lightning.embedding import TaskEmbedding
    from t2v_lightning.similarity.selection import ranked_experts, rerank_experts, select_expert

    options = _select_parser().parse_args(list(argv))
    files = expert_files(options.experts, exclude=options.target)
    csv_path = Path(options.csv) if options.csv else None
    check_new_outputs(
        {"--csv": csv_path},
        [options.target, *files],
        options.overwrite,
        refused_suffix=".safetensors",
    )  # never over an artifact
    target = TaskEmbedding.load(options.target)
    experts = [TaskEmbedding.load(f) for f in files]
    names = task_names(experts, files)
    ranking = select_expert(
        target,
        dict(zip(names, experts)),
        options.alpha,
        options.distance,
        assume_comparable=options.assume_comparable,
    )
    if options.rerank is not None:
        shortlist = [ranking.names[i] for i in ranking.order[: options.top_k]]
        models, data = _rerank_inputs(options, target, shortlist)
        ranking = rerank_experts(ranking, models, data, options.rerank, options.top_k)
    rows = ranked_experts(ranking)
    if csv_path is not None:
        header = [
            "rank",
            "expert",
            "file",
            "asymmetric_distance",
            "distance",
            "distance_to_trivial",
            *([options.rerank] if options.rerank else []),
        ]
        table = [
            [
                row.rank,
                row.name,
                str(files[row.index]),
                f"{row.score:.6g}",
                f"{row.distance:.6g}",
                f"{row.complexity:.6g}",
                *([f"{row.transferability:.6g}"] if options.rerank else []),
            ]
            for row in rows
        ]
        write_csv(csv_path, [header, *table], options.overwrite)
    width = max(len("expert"), *(len(n) for n in names))
    target_name = terminal_text(target.name) or Path(options.target).stem
    rerank = f", first {options.top_k} reranked by {options.rerank}" if options.rerank else ""
    print(
        f"experts for {target_name}, best first ({options.distance} distance, "
        f"alpha={options.alpha:g}{rerank}):"
    )
    extra = f"  {options.rerank:>10}" if options.rerank else ""
    print(
        f"  {'rank':>4}  {'expert':<{width}}  {'asymmetric':>10}  {'distance':>8}  "
        f"{'to trivial':>10}{extra}"
    )
    for row in rows:
        extra = f"  {row.transferability:>10.4f}" if row.transferability is not None else ""
        print(
            f"  {row.rank:>4}  {row.name:<{width}}  {row.score:>10.4f}  {row.distance:>8.4f}  "
            f"{row.complexity:>10.4f}{extra}"
        )
    if csv_path is not None:
        print(f"ranking: {csv_path}")


# ------------------------------------------------------------------------------ entry point
_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes ProbeError, DatasetError, EmbeddingFileError
    OSError,  # missing files and data (DatasetNotFoundError), permissions, a full disk
    ImportError,
    pickle.UnpicklingError,  # a checkpoint that needs arbitrary objects (weights_only=True)
    FisherError,  # NaN / inf in the Fisher pass: the message names the layer and examples
)


def _quiet_warnings() -> None:
    for pattern in (
        ".*does not have many workers.*",
        ".*module\\(s\\) in eval mode at the start of training.*",
        ".*GPU available but not used.*",
        ".*The number of training batches.*is smaller than the logging interval.*",
        ".*Checkpoint directory.*exists and is not empty.*",
        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


_FLAGS = ("--overwrite", "--data.streaming")
_LISTS = ("--datasets", "--data.data_files")


def _expand_shorthands(argv: list[str]) -> list[str]:
    """Shell-friendly forms of two option types.

    ``--overwrite`` (or ``--data.streaming``) alone means ``--overwrite true``; ``--datasets a b c`` (or ``--data.data_files``) means
    ``--datasets ["a","b","c"]`` (jsonargparse's list syntax, which also works).
    """
    expanded: list[str] = []
    position = 0
    while position < len(argv):
        token = argv[position]
        position += 1
        expanded.append(token)
        if token in _FLAGS and (position == len(argv) or argv[position].startswith("-")):
            expanded.append("true")
        elif token in _LISTS:
            values: list[str] = []
            while position < len(argv) and not argv[position].startswith("-"):
                values.append(argv[position])
                position += 1
            if len(values) == 1 and values[0].lstrip().startswith("["):
                expanded.append(values[0])
            elif values:  # as JSON: a glob such as * is not read as a YAML alias
                expanded.append(json.dumps(values))
    return expanded


# ------------------------------------------------------------------------------ t2v --help
# One line per subcommand for ``t2v --help`` (tests/test_release.py checks that every
# subcommand that main() dispatches is listed here).
SUBCOMMANDS: dict[str, str] = {
    "fit": "train a probe's head on a task, save a Lightning checkpoint",
    "validate": "accuracy of a fitted head on the task's test split",
    "embed": "write each task's embedding artifact; sweeps resume",
    "distance": "distances between artifacts: CSV, figure, nearest tasks",
    "select": "rank experts for a target task by the asymmetric distance",
    "diversity": "diversity coefficient of a text corpus (LM probe)",
}


class _SubcommandListFormatter(argparse.HelpFormatter):
    """Python 3.11's formatter measures the subcommands' names one indent short, which puts the
    summary of the longest (``diversity``) on a line of its own; count that indent."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        names = getattr(action, "choices", None)
        if isinstance(action, argparse._SubParsersAction) and names:
            longest = max(len(name) for name in names)
            self._action_max_length = max(
                self._action_max_length, longest + self._current_indent + self._indent_increment
            )


def _top_parser() -> argparse.ArgumentParser:
    """What ``t2v --help`` prints: the subcommands, one line each, and ``--version``."""
    from t2v_lightning.version import __version__

    parser = argparse.ArgumentParser(
        prog="t2v",
        description="Task2Vec task embeddings: the diagonal Fisher information of a probe "
        "network, on PyTorch Lightning.",
        epilog="'t2v SUBCOMMAND --help' lists a subcommand's options; fit, validate and embed "
        "also take --config FILE.yaml and --print_config.",
        formatter_class=_SubcommandListFormatter,
    )
    parser.add_argument("--version", action="version", version=f"t2v {__version__}")
    commands = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    for name, summary in SUBCOMMANDS.items():
        commands.add_parser(name, help=summary)
    return parser


def main(args: Sequence[str] | None = None) -> None:
    """The ``t2v`` console script.

    Mistakes in the command (unknown option or config key, unknown dataset, bad task ids, a file
    that exists, missing data) end with one line on stderr and exit status 2; set
    ``T2V_DEBUG=1`` for the traceback. Run as the command (``args`` None), it first tells glibc's
    malloc to keep freed memory in the process (:func:`~t2v_lightning.allocator.keep_freed_memory`;
    ``T2V_DEFAULT_MALLOC=1`` turns that off).
    """
    if args is None:  # run as the t2v command: the process is ours (t2v_lightning.allocator)
        keep_freed_memory()
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] in (["-h"], ["--help"], ["--version"]):
        _top_parser().parse_args(argv[:1])  # prints the help or the version, and exits 0
    _quiet_warnings()
    try:
        if argv and argv[0] == "distance":
            distance_main(argv[1:])
        elif argv and argv[0] == "select":
            select_main(argv[1:])
        elif argv and argv[0] == "diversity":
            from t2v_lightning.lm_diversity import diversity_main

            diversity_main(argv[1:])
        else:
            if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
                sys.argv[1:] = _expand_shorthands(argv)
                T2VCLI()
            else:
                T2VCLI(args=_expand_shorthands(argv))
    except argparse.ArgumentError as err:
        if os.environ.get("T2V_DEBUG"):
            raise
        command = " ".join(["t2v", *[a for a in argv[:1] if a in T2VCLI.subcommands()]])
        message = " ".join(line.strip() for line in err.message.splitlines() if line.strip())
        message = message.replace(  # jsonargparse's advice is for programs, not for configs
            "Add the import path to import_path_allowlist in set_parsing_settings to allow it.",
            "t2v imports classes only from " + ", ".join(ALLOWED_IMPORTS) + ".",
        )
        sys.stderr.write(f"{command}: error: {message}\n(see: {command} --help)\n")
        raise SystemExit(2) from None
    except _USER_ERRORS as err:
        if os.environ.get("T2V_DEBUG"):
            raise
        message = str(err).strip() or type(err).__name__
        sys.stderr.write(f"t2v: error: {message}\n(set T2V_DEBUG=1 for the traceback)\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        sys.stderr.write("t2v: interrupted\n")
        raise SystemExit(130) from None
    except SIGTERMException:
        # Lightning stops after the current batch; its SystemExit carries no exit status.
        sys.stderr.write(
            "t2v: terminated (SIGTERM); artifacts already written are complete, the task in "
            "progress was not written. Rerun the same command to continue\n"
        )
        raise SystemExit(128 + signal.SIGTERM) from None
    except SystemExit as exit_:
        if not interrupted(exit_):  # Lightning exits with 1 after catching Ctrl-C
            raise
        sys.stderr.write("t2v: interrupted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":  # pragma: no cover
    main()
