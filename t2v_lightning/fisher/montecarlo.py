"""The Monte Carlo Fisher pass: labels sampled from the model, squared gradients summed.

:func:`embed_montecarlo` turns a :class:`~t2v_lightning.prepare.PreparedTask` into a
:class:`~t2v_lightning.embedding.TaskEmbedding` with one Lightning fit of
:class:`FisherPassModule`, :class:`~t2v_lightning.fisher.callback.FisherCallback` doing the
math (:mod:`t2v_lightning.fisher.estimators`) after every batch. :class:`MonteCarloSettings` holds
the method's own options.

The module learns nothing: its training step only checks the batch's inputs for NaN / inf (the
callback does the Fisher step after it). What it owns is the data layout of the pass: every example id in ``[0, num_examples)`` goes to exactly one rank
(:class:`~t2v_lightning.fisher.sharding.ShardSampler`: rank ``r`` takes ids ``r, r + W, r + 2W,
...``) and shorter shards are padded with ids ``>= num_examples`` that the callback ignores, so
that all ranks run the same number of steps without counting any example twice.

Under DDP the module is wrapped by ``DistributedDataParallel``, which broadcasts rank 0's
parameters and buffers to every rank when it wraps the module: all ranks measure the Fisher of
the same network (the same fitted head). DDP refuses a module without a trainable parameter, so
the module holds one unused scalar for it.

The pass is resumable: :class:`FisherPassCheckpoint` writes a Lightning checkpoint every
``every_n_steps`` batches (atomically), and :func:`restore_fisher_pass` reads one back into a
fresh module and callback; :class:`MonteCarloSettings` names the checkpoint file of a task and
finds the one to resume from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from t2v_lightning.choices import ESTIMATORS, Estimator, UnsupportedLayerError, check_choice
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.features import check_finite
from t2v_lightning.fisher.callback import FisherCallback
from t2v_lightning.fisher.estimators import embedded_layers
from t2v_lightning.fisher.sharding import IdsDataset, ShardSampler
from t2v_lightning.prepare import PreparedTask, artifact_meta
from t2v_lightning.probe import ProbeError, load_tensors_safely
from t2v_lightning.safety import is_int
from t2v_lightning.trainers import add_callbacks

__all__ = [
    "FisherPassCheckpoint",
    "FisherPassModule",
    "MonteCarloSettings",
    "RESUME_IDENTITY",
    "embed_montecarlo",
    "restore_fisher_pass",
]

log = logging.getLogger(__name__)


def _inputs_only(item: Any) -> Any:
    return item[0] if isinstance(item, (tuple, list)) else item


class _InputsWithIds(Dataset):
    """``(input of data[id % n], id)``: the items of ``data`` are ``(input, position)`` pairs."""

    def __init__(self, data: Dataset, num_examples: int) -> None:
        self.ids = IdsDataset(data, num_examples)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        item, position = self.ids[position]
        return _inputs_only(item), position


class FisherPassModule(pl.LightningModule):
    """Holds the network for the Fisher pass and serves its sharded data.

    Args:
        network: maps inputs to logits (kept in eval mode by the callback).
        data: a dataset of ``(input, id)`` pairs; ids are positions ``0..len(data)-1``.
        batch_size: examples per step on each rank.
        num_workers: data-loading worker processes.
        skip: optional bool mask over the ids: those already counted (when resuming) are not
            visited again.
    """

    def __init__(
        self,
        network: nn.Module,
        data: Dataset,
        batch_size: int,
        num_workers: int = 0,
        skip: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        # DistributedDataParallel refuses to wrap a module with no trainable parameter; this one
        # is never used in a computation.
        self.ddp_anchor = nn.Parameter(torch.zeros(()))
        self.automatic_optimization = False
        self._data = data
        self._batch_size = batch_size
        self._num_workers = num_workers
        self._skip = skip

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # The inputs are checked here, before the Fisher step that follows; padding ids wrap.
        inputs, ids = batch
        positions = ids.cpu() % len(self._data)  # type: ignore[arg-type]
        check_finite(inputs, positions, "the dataset's input", self._data)

    @override
    def configure_optimizers(self) -> None:
        return None

    @override
    def train_dataloader(self) -> DataLoader:
        num_examples = len(self._data)  # type: ignore[arg-type]
        sampler = ShardSampler(num_examples, self.global_rank, self.trainer.world_size, self._skip)
        return DataLoader(
            _InputsWithIds(self._data, num_examples),
            batch_size=self._batch_size,
            sampler=sampler,
            num_workers=self._num_workers,
            persistent_workers=False,
        )


class FisherPassCheckpoint(Callback):
    """Write a Lightning checkpoint of the Fisher pass every ``every_n_steps`` batches.

    The Fisher pass optimises nothing, so Lightning's ``global_step`` never moves and
    ``ModelCheckpoint(every_n_train_steps=...)`` would never fire; this callback counts batches
    instead. It must come after the :class:`~t2v_lightning.FisherCallback` in the Trainer's
    callbacks, so that the batch it follows is already in the saved sums. Every rank takes part
    (the callback's state is reduced across ranks); rank 0 writes to a temporary name and
    renames it, so ``path`` always holds a complete checkpoint.

    Args:
        path: the checkpoint file.
        every_n_steps: batches (per rank) between two checkpoints.
    """

    def __init__(self, path: str | os.PathLike[str], every_n_steps: int) -> None:
        super().__init__()
        if not is_int(every_n_steps) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.path = Path(path)
        self.every_n_steps = every_n_steps

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if (batch_idx + 1) % self.every_n_steps == 0:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Write the checkpoint now (call on every rank)."""
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(temporary)  # ends with a barrier
        if trainer.is_global_zero:
            os.replace(temporary, self.path)
            log.debug("Fisher pass checkpoint written to %s", self.path)


def restore_fisher_pass(
    path: str | os.PathLike[str], module: FisherPassModule, callback: Callback
) -> torch.Tensor | None:
    """Load a Fisher-pass checkpoint into a fresh ``module`` and ``callback``.

    The module gets the checkpoint's network (so the resumed pass measures exactly the network
    of the interrupted one, fitted head included); the callback gets its sums, count and the
    mask of ids already counted (its ``load_state_dict`` checks that the checkpoint belongs to
    the same task, probe and settings).

    Returns:
        The mask of ids already counted (pass it as the module's ``skip``), or ``None``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: checkpoint {path} does not exist")
    checkpoint = load_tensors_safely(path, "Fisher-pass checkpoint")  # one line if refused
    states = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
    key = callback.state_key
    if key not in states:
        found = [k for k in states if "FisherCallback" in k]
        raise ValueError(
            f"cannot resume from {path}: it holds no Fisher state for {key} (Fisher states in it: "
            f"{found or 'none'})"
        )
    callback.load_state_dict(states[key])
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"cannot resume from {path}: its network does not match this probe (missing "
            f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
        )
    seen = states[key].get("seen")
    return None if seen is None else torch.as_tensor(seen, dtype=torch.bool)


RESUME_IDENTITY = (
    "probe_fingerprint",
    "head",
    "num_classes",
    "skip_layers",
    "max_samples",
    "balanced_sampling",
    "dataset_size",
    "task_name",
    "labels_fingerprint",
)
"""Facts of the artifact's meta that a Fisher-pass checkpoint and the run resuming it share."""


@dataclass(frozen=True)
class MonteCarloSettings:
    """The options of the Monte Carlo method (SPEC 3.1-3.3).

    Args:
        estimator: ``"per_sample"``, ``"exact"`` or ``"batch"``.
        mc_samples: labels drawn per example by ``per_sample``.
        checkpoint_dir: folder of the pass's Lightning checkpoint (``None``: none); the
            checkpoint is removed when the pass completes.
        checkpoint_every_n_steps: batches (per process) between two checkpoints.
        resume_from: a checkpoint to resume from, or ``"last"``: the one in ``checkpoint_dir``
            if an interrupted pass left one (else start afresh).
    """

    estimator: Estimator = "per_sample"
    mc_samples: int = 1
    checkpoint_dir: str | None = None
    checkpoint_every_n_steps: int = 50
    resume_from: str | None = None

    def __post_init__(self) -> None:
        check_choice("estimator", self.estimator, ESTIMATORS)
        if not is_int(self.mc_samples) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {self.mc_samples!r}")
        if not is_int(self.checkpoint_every_n_steps) or self.checkpoint_every_n_steps < 1:
            raise ValueError(
                "checkpoint_every_n_steps must be a positive integer, got "
                f"{self.checkpoint_every_n_steps!r}"
            )
        if self.resume_from == "last" and self.checkpoint_dir is None:
            raise ValueError("resume_from='last' needs checkpoint_dir (where the checkpoint is)")

    def checkpoint(self, task_name: str | None) -> str | None:
        """The pass's checkpoint file for this task (``None`` without ``checkpoint_dir``)."""
        if self.checkpoint_dir is None:
            return None
        name = "fisher-pass" if task_name is None else f"fisher-pass-{task_name}"
        return os.path.join(self.checkpoint_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".ckpt")

    def resume_path(self, checkpoint: str | None) -> str | None:
        """The checkpoint to resume from, or ``None`` to start afresh."""
        if self.resume_from is None:
            return None
        if self.resume_from == "last":
            if checkpoint is not None and os.path.isfile(checkpoint):
                return checkpoint
            rank_zero_info(f"No Fisher-pass checkpoint at {checkpoint}; starting afresh")
            return None
        if not os.path.isfile(self.resume_from):
            raise FileNotFoundError(f"resume_from={self.resume_from!r}: no such checkpoint file")
        return self.resume_from


def embed_montecarlo(
    prepared: PreparedTask, trainer: pl.Trainer, settings: MonteCarloSettings
) -> TaskEmbedding:
    """The Monte Carlo embedding of a prepared task: one Fisher pass in ``trainer``.

    Args:
        prepared: the task (network with its head, inputs, labels, meta).
        trainer: a Trainer of one epoch without callbacks of its own besides a progress bar
            (:meth:`~t2v_lightning.trainers.TrainerSpec.build`); the pass's callbacks are added
            to it.
        settings: the method's options.

    Returns:
        The filter-wise Fisher of every layer after the prefix but the head, ``scale`` ones,
        and the meta of :func:`~t2v_lightning.prepare.artifact_meta` plus the callback's facts
        (estimator, samples, world size, precision).

    Raises:
        ProbeError: no layer with weights after the skipped prefix.
        FisherError: NaN / inf in the pass (examples named by id).
    """
    task = prepared.settings
    try:
        layers = embedded_layers(prepared.network, task.head, task.exclude)
    except UnsupportedLayerError as err:
        raise UnsupportedLayerError(
            f"{err}; leave it out with Task2Vec(exclude=[{err.layer!r}]) (or skip_layers)",
            layer=err.layer,
        ) from None
    if not layers:
        raise ProbeError(
            "nothing to embed: no layer with weights after the skipped prefix (and exclude=)"
        )
    # Ties a Fisher-pass checkpoint to the task it was made for.
    labels_fingerprint = hashlib.sha256(prepared.labels.numpy().tobytes()).hexdigest()[:16]
    meta = artifact_meta(
        prepared.meta,
        "montecarlo",
        batch_size=task.batch_size,
        labels_fingerprint=labels_fingerprint,
    )
    callback = FisherCallback(
        at="train_batch",
        estimator=settings.estimator,
        mc_samples=settings.mc_samples,
        likelihood=task.likelihood,
        seed=task.seed,
        num_examples=len(prepared.inputs),  # type: ignore[arg-type]
        head=task.head,
        exclude=task.exclude,
        network="network",
        meta=meta,
        identity={key: meta[key] for key in RESUME_IDENTITY if key in meta},
    )
    skip = None
    checkpoint = settings.checkpoint(prepared.meta.get("task_name"))
    resume = settings.resume_path(checkpoint)
    if checkpoint is not None and resume != checkpoint and os.path.lexists(checkpoint):
        # an interrupted pass's checkpoint (or any file of that name) is never written over
        raise FileExistsError(
            f"checkpoint_dir: {checkpoint} exists (an interrupted Fisher pass?); pass "
            "resume_from='last' to continue it, or remove it to start afresh"
        )
    if resume is not None:
        fresh = FisherPassModule(prepared.network, prepared.inputs, task.batch_size)
        skip = restore_fisher_pass(resume, fresh, callback)
        rank_zero_info(f"Resuming the Fisher pass from {resume}")
    module = FisherPassModule(
        prepared.network, prepared.inputs, task.batch_size, task.num_workers, skip
    )
    add_callbacks(trainer, callback)
    if checkpoint is not None:
        add_callbacks(trainer, FisherPassCheckpoint(checkpoint, settings.checkpoint_every_n_steps))
    trainer.fit(module)
    embedding = callback.embedding  # after ddp_spawn: the one rank 0 handed over
    if embedding is None:
        raise RuntimeError("the Fisher pass ended without producing an embedding")
    if checkpoint is not None and trainer.is_global_zero and os.path.isfile(checkpoint):
        os.remove(checkpoint)  # the pass is complete; nothing left to resume
    return embedding
