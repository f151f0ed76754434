"""The LightningModule that the Fisher pass of :class:`~t2v_lightning.Task2Vec` trains.

It learns nothing: its training step is empty and :class:`~t2v_lightning.FisherCallback` does
the work after each step. What it owns is the data layout of the pass: every example id in
``[0, num_examples)`` goes to exactly one rank (:class:`~t2v_lightning.fisher.sharding.ShardSampler`:
rank ``r`` takes ids ``r, r + W, r + 2W, ...``) and shorter shards are padded with ids
``>= num_examples`` that the callback ignores, so that all ranks run the same number of steps
without counting any example twice.

Under DDP the module is wrapped by ``DistributedDataParallel``, which broadcasts rank 0's
parameters and buffers to every rank when it wraps the module: all ranks measure the Fisher of
the same network (the same fitted head). DDP refuses a module without a trainable parameter, so
the module holds one unused scalar for it.

This file also holds the pieces that make the pass resumable: :class:`FisherPassCheckpoint`
writes a Lightning checkpoint every ``every_n_steps`` batches (atomically), and
:func:`restore_fisher_pass` reads one back into a fresh module and callback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from t2v_lightning.fisher.sharding import IdsDataset, ShardSampler
from t2v_lightning.probe import load_tensors_safely

__all__ = ["FisherPassModule", "FisherPassCheckpoint", "ShardSampler", "restore_fisher_pass"]

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
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network(inputs)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        return None

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
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
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
