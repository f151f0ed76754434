"""The LightningModule that the Fisher pass of :class:`~t2v_lightning.Task2Vec` trains.

It learns nothing: its training step is empty and :class:`~t2v_lightning.FisherCallback` does
the work after each step. What it owns is the data layout of the pass: every example id in
``[0, num_examples)`` goes to exactly one rank (rank ``r`` takes ids ``r, r + W, r + 2W, ...``),
and shorter shards are padded with ids ``>= num_examples`` that the callback ignores, so that all
ranks run the same number of steps without counting any example twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["FisherPassModule", "ShardSampler"]


class ShardSampler(Sampler[int]):
    """Positions ``rank, rank + world_size, ...`` below ``num_examples``, padded to equal length.

    Padding positions are ``>= num_examples``; the dataset maps them onto a real input and the
    Fisher callback skips them by id.
    """

    def __init__(self, num_examples: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_examples = num_examples
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(num_examples / world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.per_rank * self.world_size, self.world_size))

    def __len__(self) -> int:
        return self.per_rank


class _PaddedIds(Dataset):
    """``data[position % n]`` with the position itself as the id."""

    def __init__(self, data: Dataset, num_examples: int) -> None:
        self.data = data
        self.num_examples = num_examples

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        inputs, _ = self.data[position % self.num_examples]
        return inputs, position


class FisherPassModule(pl.LightningModule):
    """Holds the network for the Fisher pass and serves its sharded data.

    Args:
        network: maps inputs to logits (kept in eval mode by the callback).
        data: a dataset of ``(input, id)`` pairs; ids are positions ``0..len(data)-1``.
        batch_size: examples per step on each rank.
        num_workers: data-loading worker processes.
    """

    def __init__(self, network: nn.Module, data: Dataset, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        self.network = network
        self.automatic_optimization = False
        self._data = data
        self._batch_size = batch_size
        self._num_workers = num_workers

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network(inputs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        return None

    def configure_optimizers(self) -> None:
        return None

    def train_dataloader(self) -> DataLoader:
        num_examples = len(self._data)  # type: ignore[arg-type]
        sampler = ShardSampler(num_examples, self.global_rank, self.trainer.world_size)
        return DataLoader(
            _PaddedIds(self._data, num_examples),
            batch_size=self._batch_size,
            sampler=sampler,
            num_workers=self._num_workers,
            persistent_workers=False,
        )
