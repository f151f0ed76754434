"""The ``"fit_end"`` pass of :class:`~t2v_lightning.fisher.callback.FisherCallback`: its data.

Which batches each rank reads when the Fisher is measured after ``fit`` (every index of the
training dataset once across ranks), what the network's forward is on them (``pl_module(inputs)``
or the user's ``logits_fn``), and the two cross-rank steps around the pass: every rank takes rank
0's weights first, and checks afterwards that all ranks measured the same ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from t2v_lightning.choices import FisherError
from t2v_lightning.fisher.sharding import CollateWithIds, IdsDataset, ShardSampler
from t2v_lightning.probe import batch_rows, call_probe

__all__ = [
    "BatchLogits",
    "batch_inputs",
    "broadcast_from_rank_zero",
    "check_same_network",
    "pass_batches",
    "running_ids",
]


class BatchLogits(nn.Module):
    """The forward of the ``"fit_end"`` pass: ``module(inputs)`` or ``logits_fn(module, batch)``.

    Holds the LightningModule as a child so that the Fisher taps freeze all of its parameters.
    """

    def __init__(self, module: nn.Module, logits_fn: Callable[[nn.Module, Any], torch.Tensor] | None) -> None:
        super().__init__()
        self.module = module
        self.logits_fn = logits_fn
        self.batch: Any = None

    @override
    def forward(self, inputs: torch.Tensor | None = None, **named: torch.Tensor) -> torch.Tensor:
        # Mapping inputs (tokenised text) arrive as keyword arguments (see call_probe).
        batch_inputs: torch.Tensor | dict[str, torch.Tensor] = named if inputs is None else inputs
        if self.logits_fn is not None:
            logits = self.logits_fn(self.module, self.batch)
            source = "logits_fn(module, batch)"
        else:
            logits = call_probe(self.module, batch_inputs)
            source = f"{type(self.module).__name__}.forward(inputs)"
        rows = batch_rows(batch_inputs)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != rows:
            got = (
                f"a tensor of shape {tuple(logits.shape)}"
                if isinstance(logits, torch.Tensor)
                else f"a {type(logits).__name__}"
            )
            raise FisherError(
                f"FisherCallback needs logits of shape ({rows}, classes) but {source} returned "
                f"{got}. Make the module's forward return logits, or pass "
                "FisherCallback(logits_fn=lambda module, batch: <logits of the batch>)"
            )
        return logits


def pass_batches(
    trainer: pl.Trainer, loader: DataLoader, batch_size: int | None = None
) -> tuple[Iterable[tuple[Any, torch.Tensor]], int | None]:
    """``(batch, ids)`` pairs of this rank, and the number of distinct ids (if known).

    A map-style dataset is re-read in shards (every index once across ranks, whatever the
    Trainer's sampler), ``batch_size`` examples per step (``None``: the loader's); an
    iterable one is read as it comes, each rank numbering its examples.
    """
    rank, world = int(trainer.global_rank), int(trainer.world_size)
    dataset = loader.dataset
    batch_size = batch_size or loader.batch_size
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
        num_examples = len(dataset)  # type: ignore[arg-type]
        if num_examples == 0:
            raise ValueError("FisherCallback: the training dataset is empty")
        sharded = DataLoader(
            IdsDataset(dataset, num_examples),
            batch_size=batch_size or 32,
            sampler=ShardSampler(num_examples, rank, world),
            collate_fn=CollateWithIds(loader.collate_fn),
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )
        return sharded, num_examples
    return running_ids(loader, rank, world), None

def batch_inputs(
    batch: Any,
    rows: int,
    device: torch.device,
    logits_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> torch.Tensor | Mapping[str, torch.Tensor]:
    """The inputs of a training batch: the batch itself, or its first element."""
    if logits_fn is not None:
        return torch.empty(rows, 0, device=device)  # logits_fn reads the batch itself
    if isinstance(batch, torch.Tensor):
        return batch
    if (
        isinstance(batch, (tuple, list))
        and batch
        and isinstance(batch[0], (torch.Tensor, Mapping))
    ):
        return batch[0]
    raise FisherError(
        "FisherCallback cannot find the inputs in a training batch of type "
        f"{type(batch).__name__}: batches must be a tensor or (inputs, labels, ...) with a "
        "tensor (or a mapping of tensors) first; otherwise pass FisherCallback(logits_fn=lambda module, batch: logits)"
    )


def check_same_network(trainer: pl.Trainer, network: nn.Module) -> None:
    """Every rank must have measured the same weights, or the sum over ranks is meaningless."""
    if int(trainer.world_size) <= 1:
        return
    checksum = torch.stack(
        [t.detach().to(torch.float64).sum() for t in network.state_dict().values() if t.is_floating_point()]
    )
    # One all-reduce of (c, -c) with max gives the largest and the smallest of each entry.
    both = torch.cat([checksum, -checksum]).to(trainer.strategy.root_device)
    extremes = torch.as_tensor(trainer.strategy.reduce(both, reduce_op="max")).to("cpu")
    largest, smallest = extremes[: checksum.numel()], -extremes[checksum.numel() :]
    if not bool((largest == smallest).all()):
        raise FisherError(
            "the ranks hold different weights for the embedded network; the Fisher summed over "
            "ranks would mix networks (were the weights changed on one rank only?)"
        )


def broadcast_from_rank_zero(trainer: pl.Trainer, module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers.

    DDP keeps parameters equal, but each rank updates its batch-norm running statistics with its
    own batches; rank 0's model is the one that checkpoints keep, so it is the one measured.
    """
    if int(trainer.world_size) <= 1:
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise FisherError(
            "FisherCallback: the Trainer has several processes but torch.distributed is not "
            "initialised; call compute() inside the run (e.g. from a hook), on every rank"
        )
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


def running_ids(loader: Iterable[Any], rank: int, world: int) -> Iterator[tuple[Any, torch.Tensor]]:
    """Iterable datasets have no indices: number each rank's examples ``k * world + rank``."""
    position = 0
    for batch in loader:
        rows = batch_rows(batch)
        ids = torch.arange(position, position + rows, dtype=torch.int64) * world + rank
        position += rows
        yield batch, ids
