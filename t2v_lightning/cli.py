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
  the asymmetric distance (SPEC section 4).

Options are the typed ``__init__`` arguments of :class:`ProbeClassifier` (``--model.*``),
:class:`~t2v_lightning.data.datamodule.TaskDataModule` (``--data.*``) and Lightning's Trainer
(``--trainer.*``), and the arguments of :meth:`EmbeddingTrainer.embed`; YAML configs
(``--config configs/montecarlo.yaml``) set the same keys.
"""

from __future__ import annotations

import argparse
import inspect
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
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from typing_extensions import override

from t2v_lightning.allocator import keep_freed_memory
from t2v_lightning.data.datamodule import TaskDataModule
from t2v_lightning.data.registry import get_entry, num_tasks
from t2v_lightning.embedding import artifact_damage
from t2v_lightning.fisher.estimators import FisherError
from t2v_lightning.outputs import check_new_outputs, check_output_path, write_atomically
from t2v_lightning.probe_classifier import ProbeClassifier
from t2v_lightning.safety import check_checkpoint_path, interrupted, trainer_options_checked
from t2v_lightning.similarity.report import nearest_tasks, write_csv, write_distance_csv
from t2v_lightning.trainers import PhaseProgressBar

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
    ids: list[int] = []
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
        ids.extend(range(first, last + 1))
    if count is not None:
        bad = [i for i in ids if i >= count]
        if bad:
            raise ValueError(
                f"tasks={spec!r}: task ids {bad[:5]} are out of range (the dataset has {count} "
                f"tasks: 0-{count - 1})"
            )
    return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class EmbeddingJob:
    """One task to embed: a registered dataset, a task id (None: single task), an output file."""

    dataset: str
    task_id: int | None
    output: Path


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
) -> list[EmbeddingJob]:
    """The tasks one ``t2v embed`` run covers, with their output files.

    Args:
        datasets: registered dataset names.
        root: data folder (only read to count the tasks of iNat-based datasets).
        tasks: task ids of the multi-task datasets (see :func:`parse_task_ids`); None uses
            ``default_task_id``.
        default_task_id: ``--data.task_id``.
        output: a path that may contain ``{dataset}``, ``{task_id}`` and ``{task}`` (``digits``
            or ``cub_inat2018_017``), or an existing folder / a path ending in ``/`` (then
            ``{task}.safetensors`` inside it).
        shard_index: this run's share of the jobs: ``jobs[shard_index::num_shards]``.
        num_shards: how many runs share the jobs.

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
    jobs: list[EmbeddingJob] = []
    for dataset, task_id in pairs:
        try:
            path = output.format(dataset=dataset, task_id=0 if task_id is None else task_id,
                                 task=_task_label(dataset, task_id))
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"output={output!r} is not a valid template ({type(err).__name__}: {err}); the "
                "fields are {dataset}, {task_id} and {task}"
            ) from err
        jobs.append(EmbeddingJob(dataset, task_id, Path(path)))
    seen: dict[Path, EmbeddingJob] = {}
    for job in jobs:
        if job.output in seen:
            other = seen[job.output]
            raise ValueError(
                f"output={output!r} gives {_task_label(other.dataset, other.task_id)} and "
                f"{_task_label(job.dataset, job.task_id)} the same file {str(job.output)!r}; put "
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


def _sibling(datamodule: TaskDataModule, dataset: str, task_id: int | None) -> TaskDataModule:
    """A data module like ``datamodule`` (same sampling, size, root...) for another task."""
    accepted = inspect.signature(type(datamodule).__init__).parameters
    settings = {k: v for k, v in datamodule.hparams.items() if k in accepted and k != "self"}
    settings.update(name=dataset, task_id=task_id)
    return type(datamodule)(**settings)


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
            datasets: several registered datasets to embed in turn (default: ``--data.name``).
            tasks: task ids of a multi-task dataset: ``0-9,12`` (ranges include both ends) or
                ``all``; replaces ``--data.task_id``.
            shard_index: embed only the tasks ``shard_index, shard_index + num_shards, ...``
                of the list (e.g. ``$SLURM_ARRAY_TASK_ID``).
            num_shards: number of runs that share the list (e.g. ``$SLURM_ARRAY_TASK_COUNT``).
            fisher_checkpoint_dir: folder for Fisher-pass checkpoints; a task interrupted in
                its Fisher pass resumes from there.

        Returns:
            The artifacts written by this run.
        """
        hp = datamodule.hparams
        jobs = embedding_jobs(
            datasets or [datamodule.dataset_name], datamodule.root, tasks,
            datamodule.task_id, output, shard_index, num_shards,
        )
        several = len(jobs) > 1 or tasks is not None or bool(datasets and len(datasets) > 1)
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
        if ckpt_path is not None:
            model.load_head(ckpt_path)
        todo: list[EmbeddingJob] = []
        damaged: set[Path] = set()  # existing artifacts that do not load: replaced
        for job in jobs:
            check_output_path(job.output, "--output")  # a device, FIFO or folder; too long a name
            if job.output.exists() and not overwrite:
                if not several:
                    raise FileExistsError(
                        f"{job.output} already exists; pass --overwrite to replace it"
                    )
                damage = artifact_damage(job.output)
                if damage is None:
                    rank_zero_info(f"skipping {_task_label(job.dataset, job.task_id)}: "
                                   f"{job.output} exists")
                    continue
                rank_zero_info(f"{job.output} is damaged ({damage}); embedding "
                               f"{_task_label(job.dataset, job.task_id)} again")
                damaged.add(job.output)
            _check_writable(job.output)  # before any work, not after an hour of it
            todo.append(job)
        rank_zero_info(f"embedding {len(todo)} task(s) ({len(jobs) - len(todo)} already done)")
        for logger in self.loggers:
            logger.log_hyperparams({"model": _public(model.hparams), "data": _public(hp)})
        written: list[Path] = []
        for number, job in enumerate(todo):
            same = job.dataset == datamodule.dataset_name and job.task_id == datamodule.task_id
            data = datamodule if same else _sibling(datamodule, job.dataset, job.task_id)
            data.prepare_data()
            data.setup("fit")
            checkpoint_dir = None
            if fisher_checkpoint_dir is not None:
                checkpoint_dir = os.path.join(fisher_checkpoint_dir,
                                              _task_label(job.dataset, job.task_id))
            task2vec = model.task2vec(
                self, fitted_head=ckpt_path is not None, head_epochs=int(head_epochs or 0),
                batch_size=data.batch_size, num_workers=data.num_workers,
                checkpoint_dir=checkpoint_dir,
            )
            rank_zero_info(f"[{number + 1}/{len(todo)}] {data.task_name} -> {job.output}")
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


# No abbreviated options (a typo such as --model.skip_layer must fail, not match a longer name);
# parse errors raise, so that main() reports them in one line.
_PROBE_IDENTITY = ("probe", "pretrained", "weights", "head")
_STRICT_PARSING: dict[str, Any] = {"allow_abbrev": False, "exit_on_error": False}


class T2VCLI(LightningCLI):
    """LightningCLI for :class:`ProbeClassifier` and ``TaskDataModule`` with an ``embed`` command.

    ``data.num_classes`` is linked to ``model.num_classes``. The Trainer defaults to 10 epochs
    (the reference's head fitting), seed 0, and a CSV logger under ``lightning_logs/``.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
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
            save_config_kwargs={"overwrite": True},
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
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        checkpoint = check_checkpoint_path(ckpt_path) if ckpt_path else None
        if subcommand != "embed":
            if ckpt_path and "weights_only" in self.config[subcommand]:
                self.config[subcommand]["weights_only"] = True
            super()._parse_ckpt_path()
            return
        if checkpoint is None:
            return
        stored = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
        model = self.config["embed"]["model"]
        for key in _PROBE_IDENTITY:
            if key in stored:
                model[key] = stored[key]

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
        datasets = config.get("datasets")
        if datasets:
            data["name"] = datasets[0]
        tasks = config.get("tasks")
        if tasks is not None and get_entry(data["name"]).max_tasks is not None:
            ids = parse_task_ids(tasks, num_tasks(data["name"], data["root"]))
            if ids and data.get("task_id") not in ids:
                data["task_id"] = ids[0]

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # fit trains the head: name its progress bar so (unless bars are off or the user gave one)
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if (
            self.subcommand == "fit"
            and config.get("enable_progress_bar") is not False
            and not any(isinstance(c, ProgressBar) for c in callbacks)
        ):
            kwargs.setdefault("callbacks", [*callbacks, PhaseProgressBar("head fitting")])
        with trainer_options_checked():
            return super().instantiate_trainer(**kwargs)

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
    parser.add_argument("--distance", default="cosine", choices=DISTANCES,
                        help="distance between embeddings (default: cosine)")
    parser.add_argument("--out", default=None, help="write the clustered distance matrix figure "
                        "here (.png, .pdf, .svg)")
    parser.add_argument("--csv", default=None, help="write the distance matrix here as CSV")
    parser.add_argument("--title", default=None, help="title of the figure")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing --out / --csv files")
    return parser


def task_names(embeddings: Sequence[Any], files: Sequence[str | os.PathLike[str]]) -> list[str]:
    """A unique display name per artifact: its task name, else its file name."""
    names = [e.name or Path(f).stem for e, f in zip(embeddings, files)]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [f"{n} ({Path(f).stem})" if counts[n] > 1 else n for n, f in zip(names, files)]


def distance_main(argv: Sequence[str]) -> None:
    """``t2v distance FILES... [--distance cosine] [--out matrix.png] [--csv matrix.csv]``."""
    from t2v_lightning.embedding import TaskEmbedding
    from t2v_lightning.similarity.distance import check_distance_defined, pdist

    options = _distance_parser().parse_args(list(argv))
    check_new_outputs({"--csv": options.csv, "--out": options.out}, options.files,
                      options.overwrite, refused_suffix=".safetensors")  # never over an artifact
    embeddings = [TaskEmbedding.load(f) for f in options.files]
    for embedding, file in zip(embeddings, options.files):
        check_distance_defined(embedding, options.distance, file)
    names = task_names(embeddings, options.files)
    matrix = pdist(embeddings, options.distance)
    if options.csv:
        write_distance_csv(options.csv, names, matrix, overwrite=options.overwrite)
    if options.out:
        save_distance_figure(options.out, matrix, names, options.distance, options.title,
                             overwrite=options.overwrite)
    width = max(len(n) for n in names)
    print(f"nearest task by {options.distance} distance:")
    for name, other, distance in nearest_tasks(names, matrix):
        print(f"  {name:<{width}}  ->  {other:<{width}}  {distance:.4f}")
    for label, path in (("matrix", options.csv), ("figure", options.out)):
        if path:
            print(f"{label}: {path}")


def save_distance_figure(
    path: str | os.PathLike[str], matrix: Any, names: Sequence[str], distance: str,
    title: str | None = None, overwrite: bool = True,
) -> None:
    """Draw the clustered distance matrix and save it to ``path`` (atomically)."""
    from t2v_lightning.plot import plot_distance_matrix

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = plot_distance_matrix(matrix, labels=list(names), title=title or f"{distance} distance")
    file_format = path.suffix.lstrip(".").lower() or None  # the temporary's suffix is .tmp
    write_atomically(path, lambda name: figure.savefig(name, dpi=150, format=file_format),
                     overwrite, what="--out")


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

    parser = _SelectParser(
        prog="t2v select",
        description="Rank pretrained experts for a target task by the asymmetric Task2Vec "
        "distance d(target, source) - alpha * d(source, trivial), from the embeddings of the "
        "target task and of each expert's training task (same probe). The first row is the "
        "pick.",
        allow_abbrev=False,
    )
    parser.add_argument("--target", required=True, help="embedding artifact of the target task")
    parser.add_argument("--experts", required=True, nargs="+", metavar="DIR_OR_FILE",
                        help="artifacts of the experts' training tasks, or folders of them "
                        "(every *.safetensors inside; the target itself is left out)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"weight of the source's complexity (default: {DEFAULT_ALPHA})")
    parser.add_argument("--distance", default="cosine", choices=DISTANCES,
                        help="symmetric distance d (default: cosine)")
    parser.add_argument("--csv", default=None, help="also write the ranking here as CSV")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    return parser


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
    from t2v_lightning.similarity.selection import ranked_experts, select_expert

    options = _select_parser().parse_args(list(argv))
    files = expert_files(options.experts, exclude=options.target)
    csv_path = Path(options.csv) if options.csv else None
    check_new_outputs({"--csv": csv_path}, [options.target, *files], options.overwrite,
                      refused_suffix=".safetensors")  # never over an artifact
    target = TaskEmbedding.load(options.target)
    experts = [TaskEmbedding.load(f) for f in files]
    names = task_names(experts, files)
    ranking = select_expert(target, dict(zip(names, experts)), options.alpha, options.distance)
    rows = ranked_experts(ranking)
    if csv_path is not None:
        header = ["rank", "expert", "file", "asymmetric_distance", "distance",
                  "distance_to_trivial"]
        table = [[row.rank, row.name, str(files[row.index]), f"{row.score:.6g}",
                  f"{row.distance:.6g}", f"{row.complexity:.6g}"] for row in rows]
        write_csv(csv_path, [header, *table], options.overwrite)
    width = max(len("expert"), *(len(n) for n in names))
    target_name = target.name or Path(options.target).stem
    print(f"experts for {target_name}, best first ({options.distance} distance, "
          f"alpha={options.alpha:g}):")
    print(f"  {'rank':>4}  {'expert':<{width}}  {'asymmetric':>10}  {'distance':>8}  "
          f"{'to trivial':>10}")
    for row in rows:
        print(f"  {row.rank:>4}  {row.name:<{width}}  {row.score:>10.4f}  {row.distance:>8.4f}  "
              f"{row.complexity:>10.4f}")
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


_FLAGS = ("--overwrite",)
_LISTS = ("--datasets",)


def _expand_shorthands(argv: list[str]) -> list[str]:
    """Shell-friendly forms of two option types.

    ``--overwrite`` alone means ``--overwrite true``; ``--datasets a b c`` means
    ``--datasets [a,b,c]`` (jsonargparse's list syntax, which also works).
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
            elif values:
                expanded.append("[" + ",".join(values) + "]")
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
}


def _top_parser() -> argparse.ArgumentParser:
    """What ``t2v --help`` prints: the subcommands, one line each, and ``--version``."""
    from t2v_lightning.version import __version__

    parser = argparse.ArgumentParser(
        prog="t2v",
        description="Task2Vec task embeddings: the diagonal Fisher information of a probe "
        "network, on PyTorch Lightning.",
        epilog="'t2v SUBCOMMAND --help' lists a subcommand's options; fit, validate and embed "
        "also take --config FILE.yaml and --print_config.",
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
