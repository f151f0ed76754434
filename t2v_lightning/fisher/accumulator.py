r"""The state of a Monte Carlo Fisher pass: per-layer sums of squares, a count, the ids counted.

Like a torchmetrics ``MeanMetric``, a diagonal Fisher is a sum and a count, both summed across
ranks (never averaged) and divided at the end, so the result does not depend on the number of
processes:

.. math::

    \text{hessian}[o] = \frac{\sum_\text{ranks} \sum_n \lVert g_n[o, :] \rVert^2}
                             {\sum_\text{ranks} N_\text{rank} \cdot \text{row size}}.

:class:`FisherSums` declares that state, every part of it reduced by ``"sum"``:

* ``sum_sq_grad``: per embedded layer, one float64 value per filter (row of the weight);
* ``num_samples``: the examples (or, for the ``batch`` estimator, the batches) summed over;
* ``seen`` (when the number of example ids is known): which ids this rank counted; summed over
  ranks it becomes a count per id, which tells ids counted twice from ids never counted.

It also keeps the ids counted before a restore (``skip``), so that a resumed pass skips them.
The owner (:class:`~t2v_lightning.fisher.callback.FisherCallback`) decides when to call
:meth:`~FisherSums.update`, :meth:`~FisherSums.reduce` and the checkpoint methods.

Example:
    >>> sums = FisherSums([("fc", 2)], num_examples=4)
    >>> ids = torch.tensor([0, 1, 1, 7])
    >>> valid = sums.valid(ids)  # id 1 twice in the batch, 7 out of range
    >>> valid.tolist()
    [True, True, False, False]
    >>> sums.update({"fc": torch.tensor([1.0, 2.0])}, 2, ids, valid)
    >>> reduced = sums.reduce()
    >>> reduced.sums["fc"].tolist(), reduced.total, reduced.counts.tolist()
    ([1.0, 2.0], 2, [1.0, 1.0, 0.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from t2v_lightning.choices import FisherError
from t2v_lightning.fisher.sharding import check_counted

__all__ = ["FisherSums", "ReducedSums"]


class ReducedSums(NamedTuple):
    """The state summed over ranks."""

    sums: dict[str, torch.Tensor]
    """Per layer, float64 sums of squared gradient rows."""
    total: int
    """Examples (or batches) summed over."""
    counts: torch.Tensor | None
    """Per example id, how many ranks counted it (float64), or None without ids."""


class FisherSums:
    """Sums of squared per-example gradient rows and their count, reduced across ranks by sum.

    Args:
        layers: ``(name, rows)`` of each embedded layer, in embedding order.
        num_examples: number of distinct example ids; ids at or beyond it are padding. ``None``:
            no range check and no duplicate check (ids are not recorded).
    """

    def __init__(self, layers: Sequence[tuple[str, int]], num_examples: int | None = None) -> None:
        self.sum_sq_grad: dict[str, torch.Tensor] = {
            name: torch.zeros(rows, dtype=torch.float64) for name, rows in layers
        }
        self.num_samples = 0
        # ids counted by this rank since the start (or the restore); ids counted before a
        # restore, on any rank.
        self.seen: torch.Tensor | None = (
            torch.zeros(num_examples, dtype=torch.bool) if num_examples else None
        )
        self.skip: torch.Tensor | None = None

    # ------------------------------------------------------------------ update
    def valid(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows that count: in range, not counted before, first occurrence within the batch."""
        valid = ids >= 0
        if self.seen is None:
            return valid
        in_range = valid & (ids < self.seen.numel())
        rows = in_range.nonzero().flatten()
        batch_ids = ids[rows]
        fresh = ~self.seen[batch_ids]
        if self.skip is not None:
            fresh &= ~self.skip[batch_ids]
        unique, inverse = torch.unique(batch_ids, return_inverse=True)
        first = torch.full((unique.numel(),), batch_ids.numel(), dtype=torch.int64)
        first = first.scatter_reduce(0, inverse, torch.arange(batch_ids.numel()), reduce="amin")
        is_first = torch.zeros(batch_ids.numel(), dtype=torch.bool)
        is_first[first] = True
        valid = torch.zeros_like(valid)
        valid[rows] = fresh & is_first
        return valid

    def update(
        self, sums: Mapping[str, torch.Tensor], count: int, ids: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Add one batch: its per-layer sums, its count, and the ids of its ``valid`` rows."""
        for name, value in sums.items():
            self.sum_sq_grad[name] += value.detach().to("cpu", torch.float64)
        self.num_samples += count
        if self.seen is not None:
            self.seen[ids[valid]] = True

    # ------------------------------------------------------------------ reduce
    def _flat(self) -> torch.Tensor:
        parts = list(self.sum_sq_grad.values())
        parts.append(torch.tensor([float(self.num_samples)], dtype=torch.float64))
        if self.seen is not None:
            parts.append(self.seen.to(torch.float64))
        return torch.cat(parts)

    def reduce(self, strategy: Any = None) -> ReducedSums:
        """The state summed over the ranks of ``strategy`` (one float64 all-reduce, op sum).

        Args:
            strategy: a Lightning strategy (``reduce(tensor, reduce_op="sum")``); ``None`` or
                one process: this rank's state.
        """
        flat = self._flat()
        if strategy is not None and int(getattr(strategy, "world_size", 1)) > 1:
            flat = strategy.reduce(flat.to(strategy.root_device), reduce_op="sum")
            flat = torch.as_tensor(flat).to("cpu", torch.float64)
        sums: dict[str, torch.Tensor] = {}
        position = 0
        for name, value in self.sum_sq_grad.items():
            sums[name] = flat[position : position + value.numel()].clone()
            position += value.numel()
        total = int(round(float(flat[position])))
        counts = None if self.seen is None else flat[position + 1 :].clone()
        return ReducedSums(sums, total, counts)

    def totals(
        self, strategy: Any = None, warn_missing: bool = False
    ) -> tuple[dict[str, torch.Tensor], int]:
        """The sums over ranks and their count, for an embedding (:meth:`reduce`, checked).

        Args:
            strategy: as for :meth:`reduce`.
            warn_missing: warn about ids that no rank counted (a per-batch pass).

        Raises:
            FisherError: nothing was counted, or an id was counted on more than one rank.
        """
        sums, total, counts = self.reduce(strategy)
        if total == 0:
            raise FisherError(
                "FisherCallback: no example reached the Fisher pass, so there is nothing to embed "
                "(an empty dataset, or every id was padding or already counted)"
            )
        if counts is not None:
            check_counted(counts, self.counted(counts) if warn_missing else None)
        return sums, total

    def counted(self, counts: torch.Tensor) -> torch.Tensor:
        """Ids counted on some rank, before or since a restore (``counts`` from :meth:`reduce`)."""
        counted = counts > 0
        if self.skip is not None:
            counted |= self.skip
        return counted

    # ------------------------------------------------------------------ checkpoints
    def state(self, strategy: Any = None) -> dict[str, Any]:
        """The global state (summed over ranks): ``sum_sq_grad``, ``num_samples``, ``seen``.

        Under DDP every rank must call it together (it all-reduces).
        """
        reduced = self.reduce(strategy)
        seen = None if reduced.counts is None else self.counted(reduced.counts)
        return {"sum_sq_grad": reduced.sums, "num_samples": reduced.total, "seen": seen}

    def restore(self, state: Mapping[str, Any], rank: int) -> None:
        """Take the state of :meth:`state`; rank 0 alone carries the restored sums and count.

        Every rank skips the ids already counted, so the sum over ranks counts each example once,
        whatever the number of processes.

        Raises:
            ValueError: the state is for other layers or another number of example ids.
        """
        stored = state["sum_sq_grad"]
        if set(stored) != set(self.sum_sq_grad) or any(
            stored[name].shape != self.sum_sq_grad[name].shape for name in stored
        ):
            raise ValueError("cannot resume: the checkpoint's Fisher state is for other layers")
        seen = state.get("seen")
        if seen is not None and (self.seen is None or seen.shape != self.seen.shape):
            raise ValueError(
                f"cannot resume: the checkpoint counted {tuple(seen.shape)} example ids, this run "
                f"has {None if self.seen is None else tuple(self.seen.shape)}"
            )
        if rank == 0:
            self.sum_sq_grad = {
                name: stored[name].to(torch.float64).clone() for name in self.sum_sq_grad
            }
            self.num_samples = int(state["num_samples"])
        else:
            self.sum_sq_grad = {
                name: torch.zeros_like(value) for name, value in self.sum_sq_grad.items()
            }
            self.num_samples = 0
        if self.seen is not None:
            self.seen.zero_()
        self.skip = None if seen is None else torch.as_tensor(seen, dtype=torch.bool).clone()
