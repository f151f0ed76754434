r"""Which example ids each rank visits in a Fisher pass, so that every example counts once.

With :math:`W` ranks and the ids still to visit :math:`t_0 < t_1 < \dots < t_{U-1}`, rank
:math:`r` takes :math:`t_r, t_{r+W}, t_{r+2W}, \dots`, then *padding* ids
:math:`\ge` ``num_examples`` until all ranks have :math:`\max(1, \lceil U / W \rceil)` ids. The
Fisher callback ignores padding ids, so the union over ranks is exactly the ids to visit, each
once, whatever :math:`W` (``torch.utils.data.DistributedSampler`` instead pads with repeated ids,
which would count some examples twice).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate

from t2v_lightning.choices import FisherError

__all__ = ["ShardSampler", "IdsDataset", "CollateWithIds", "check_id_batch", "check_counted"]


class _Sized:
    """A stand-in dataset for :class:`DistributedSampler`, which only asks for a length."""

    def __init__(self, size: int) -> None:
        self._size = size

    def __len__(self) -> int:
        return self._size


class ShardSampler(DistributedSampler):
    """Example ids of one rank: the ids still to visit, dealt round-robin, padded past the end.

    It subclasses :class:`~torch.utils.data.DistributedSampler` so that Lightning keeps it as the
    distributed sampler instead of wrapping it in another one.

    Args:
        num_examples: ids run over ``[0, num_examples)``.
        rank: this process's global rank.
        world_size: number of processes.
        skip: optional bool mask of length ``num_examples``; ids where it is True (already
            counted before a resume) are not visited.

    Example:
        >>> list(ShardSampler(5, rank=1, world_size=2))
        [1, 3, 5]
    """

    def __init__(
        self,
        num_examples: int,
        rank: int = 0,
        world_size: int = 1,
        skip: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        super().__init__(
            _Sized(num_examples),  # type: ignore[arg-type]
            num_replicas=world_size,
            rank=rank,
            shuffle=False,
            drop_last=False,
        )
        todo = torch.arange(num_examples)
        if skip is not None:
            skip = torch.as_tensor(skip, dtype=torch.bool)
            if skip.shape != (num_examples,):
                raise ValueError(
                    f"skip must be a bool mask of shape ({num_examples},), got {tuple(skip.shape)}"
                )
            todo = todo[~skip]
        self.num_examples = num_examples
        self.per_rank = max(1, math.ceil(todo.numel() / world_size))
        mine = todo[rank::world_size].tolist()
        padding = range(num_examples, num_examples + self.per_rank - len(mine))
        self._ids: list[int] = [*mine, *padding]
        # What DistributedSampler reports as this rank's length.
        self.num_samples = self.per_rank
        self.total_size = self.per_rank * world_size

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __len__(self) -> int:
        return self.per_rank


class IdsDataset(Dataset):
    """``(data[id % n], id)`` for ids from :class:`ShardSampler` (padding ids wrap around)."""

    def __init__(self, data: Dataset, num_examples: int) -> None:
        self.data = data
        self.num_examples = num_examples

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, position: int) -> tuple[Any, int]:
        return self.data[position % self.num_examples], position


class CollateWithIds:
    """Collate :class:`IdsDataset` items into ``(batch, int64 ids)`` with the user's collate.

    A class rather than a closure so that data-loading workers can pickle it.

    Args:
        collate_fn: the collate function of the original data loader (``None``: PyTorch's
            default).
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: Sequence[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        inner = self.collate_fn if self.collate_fn is not None else default_collate
        batch = inner([item for item, _ in items])
        return batch, torch.tensor([position for _, position in items], dtype=torch.int64)


def check_id_batch(batch: Any, num_examples: int | None) -> None:
    """Refuse a per-batch Fisher batch that is not ``(inputs, ids)`` with distinct int64 ids.

    Labels in place of ids are caught here: they repeat within a batch.

    Raises:
        ValueError: naming what the batch holds instead.
    """
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            "FisherCallback(at='train_batch') expects training batches of (inputs, ids); got "
            f"{type(batch).__name__} (at='fit_end', the default, embeds a project whose "
            "batches are (inputs, labels))"
        )
    inputs, ids = batch
    problem = None
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.ndim != 1:
        problem = (
            f"a {type(ids).__name__}"
            if not isinstance(ids, torch.Tensor)
            else f"a {ids.dtype} tensor of shape {tuple(ids.shape)}"
        )
    elif isinstance(inputs, torch.Tensor) and ids.numel() != inputs.shape[0]:
        problem = f"{ids.numel()} ids for {inputs.shape[0]} inputs"
    elif ids.numel() and int(ids.min()) < 0:
        problem = f"negative ids ({int(ids.min())})"
    elif torch.unique(ids).numel() != ids.numel():
        problem = "repeated ids within the batch (labels, not example ids?)"
    if problem is not None:
        raise ValueError(
            "FisherCallback(at='train_batch') expects (inputs, ids) batches with one distinct "
            f"int64 example id per row in [0, {num_examples}) (padding at or beyond it), got "
            f"{problem}; at='fit_end', the default, embeds a project whose batches are "
            "(inputs, labels)"
        )


def check_counted(counts: torch.Tensor, counted: torch.Tensor | None = None) -> None:
    """After a per-batch pass: no id counted twice across ranks; warn about ids never counted.

    Args:
        counts: per id, the number of ranks that counted it.
        counted: per id, counted in this pass or before a restore (``None``: do not warn).

    Raises:
        FisherError: ids counted on more than one rank (named).
    """
    if bool((counts > 1).any()):
        repeated = (counts > 1).nonzero().flatten()
        raise FisherError(
            f"{repeated.numel()} example ids (e.g. {repeated[:5].tolist()}) were counted on more "
            "than one rank, so the sums count them twice; a DistributedSampler pads ranks with "
            "repeated examples. Give the Fisher pass unique ids per rank (ShardSampler and "
            "Trainer(use_distributed_sampler=False)) or use FisherCallback(at='fit_end')"
        )
    if counted is None:
        return
    missing = int((~counted).sum())
    if missing:
        warnings.warn(
            f"FisherCallback: {missing} of {counted.numel()} example ids were never "
            "counted; the Fisher covers the others only (a run resumed mid-epoch with "
            "Trainer.fit(ckpt_path=...) restarts the data at its beginning and stops "
            "early; Task2Vec(resume_from=...) resumes a Fisher pass exactly)",
            stacklevel=3,
        )
