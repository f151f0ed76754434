"""The ``"fit_end"`` pass of :class:`~t2v_lightning.fisher.callback.FisherCallback`: its data.

Which batches each rank reads when the Fisher is measured after ``fit`` (every index of the
training dataset once across ranks), how they reach the module (Lightning's own batch pipeline),
what the network's forward is on them (``pl_module(inputs)`` or the user's ``logits_fn``), and the
two cross-rank steps around the pass: every rank measures rank 0's weights (and gets its own
back afterwards), and checks that all ranks measured the same ones.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from t2v_lightning.choices import FisherError, UnsupportedLayerError
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.fisher.sharding import CollateWithIds, IdsDataset, ShardSampler
from t2v_lightning.fisher.taps import FP16_GRAD_SCALE
from t2v_lightning.probe import ProbeError, batch_rows, call_probe
from t2v_lightning.safety import check_checkpoint_path

__all__ = [
    "BatchLogits",
    "SpawnHandoff",
    "batch_inputs",
    "check_loader",
    "check_same_network",
    "checkpoint_weights",
    "fit_output",
    "grad_scale_for",
    "log_summary",
    "pass_batches",
    "rank_zero_weights",
    "running_ids",
    "through_pipeline",
]


class BatchLogits(nn.Module):
    """The forward of the ``"fit_end"`` pass: ``module(inputs)`` or ``logits_fn(module, batch)``.

    Holds the LightningModule as a child so that the Fisher taps freeze all of its parameters.

    Args:
        module: the LightningModule.
        logits_fn: the user's ``(module, batch) -> logits`` (``None``: ``module(inputs)``).
        min_classes: fewest outputs per example that have a Fisher (2 for a categorical: the
            softmax of one output is constant).
    """

    def __init__(
        self,
        module: nn.Module,
        logits_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
        min_classes: int = 1,
    ) -> None:
        super().__init__()
        self.module = module
        self.logits_fn = logits_fn
        self.min_classes = min_classes
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
                "FisherCallback(logits_fn=<a module-level function (module, batch) -> logits>)"
            )
        if logits.shape[1] < self.min_classes:
            raise FisherError(
                f"FisherCallback: {source} returned {logits.shape[1]} output per example; the "
                "categorical Fisher of a one-output model is zero. For one binary output pass "
                "FisherCallback(likelihood='bernoulli')"
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
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, Mapping)):
        return batch[0]
    raise FisherError(
        "FisherCallback cannot find the inputs in a training batch of type "
        f"{type(batch).__name__}: batches must be a tensor or (inputs, labels, ...) with a "
        "tensor (or a mapping of tensors) first; otherwise pass "
        "FisherCallback(logits_fn=<a module-level function (module, batch) -> logits>)"
    )


def fit_output(
    trainer: pl.Trainer, output: str | os.PathLike[str] | None, default: str, overwrite: bool
) -> str:
    """The file the end of fit writes: ``output``, or ``default`` in ``trainer.log_dir``.

    Raises:
        FileExistsError: (rank 0) the file exists and ``overwrite`` is off.
    """
    if output is None:
        log_dir = trainer.log_dir  # every rank must ask (Lightning broadcasts it)
        output = os.path.join(log_dir or os.getcwd(), default)
    path = os.fspath(output)
    if trainer.is_global_zero and not overwrite and os.path.exists(path):
        raise FileExistsError(
            f"FisherCallback: {path} exists; pass FisherCallback(overwrite=True) "
            "to replace it, or another output="
        )
    return path


def grad_scale_for(trainer: pl.Trainer, grad_scale: float | None) -> float:
    """``grad_scale``, or (``None``) 1024 under fp16 precision and 1 otherwise."""
    if grad_scale is not None:
        return grad_scale
    precision = str(getattr(trainer, "precision", "32-true"))
    return FP16_GRAD_SCALE if precision.startswith("16") else 1.0


class SpawnHandoff:
    """The file through which rank 0 of ``ddp_spawn``'s processes hands the embedding over.

    The parent process's own copy of the callback never sees a hook; it reads the file once.
    """

    def __init__(self) -> None:
        self.path = os.path.join(
            tempfile.gettempdir(), f"t2v-fisher-{os.getpid()}-{uuid.uuid4().hex}.safetensors"
        )

    def leave(self, trainer: pl.Trainer, embedding: TaskEmbedding) -> None:
        """Rank 0 of spawned processes: write ``embedding`` for the parent process."""
        if trainer.is_global_zero and isinstance(
            trainer.strategy.launcher, _MultiProcessingLauncher
        ):
            embedding.save(self.path, overwrite=True)

    def take(self) -> TaskEmbedding | None:
        """The parent process: the embedding left by rank 0 (then the file is gone), or ``None``."""
        if not os.path.isfile(self.path):
            return None
        try:
            return TaskEmbedding.load(self.path)
        finally:
            os.remove(self.path)


def check_loader(loader: object, hint: str) -> None:
    """Refuse training data that is not one torch ``DataLoader`` (``hint`` ends the message)."""
    if not isinstance(loader, DataLoader):
        raise ValueError(
            "FisherCallback needs a single torch DataLoader of training data; the Trainer has "
            f"{type(loader).__name__}{hint}"
        )


def check_same_network(trainer: pl.Trainer, network: nn.Module) -> None:
    """Every rank must have measured the same weights, or the sum over ranks is meaningless."""
    if int(trainer.world_size) <= 1:
        return
    checksum = torch.stack(
        [
            t.detach().to(torch.float64).sum()
            for t in network.state_dict().values()
            if t.is_floating_point()
        ]
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


@contextmanager
def rank_zero_weights(trainer: pl.Trainer, module: nn.Module) -> Iterator[None]:
    """Give every rank rank 0's parameters and buffers for the pass, then each rank its own.

    DDP keeps parameters equal, but each rank updates its batch-norm running statistics with its
    own batches; rank 0's model is the one that checkpoints keep, so it is the one measured.
    """
    if int(trainer.world_size) <= 1:
        yield
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise FisherError(
            "FisherCallback: the Trainer has several processes but torch.distributed is not "
            "initialised; call compute() inside the run (e.g. from a hook), on every rank"
        )
    tensors = [*module.parameters(), *module.buffers()]
    own = [tensor.detach().clone() for tensor in tensors]
    with torch.no_grad():
        for tensor in tensors:
            torch.distributed.broadcast(tensor.data, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, own):
                tensor.data.copy_(value)


def through_pipeline(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """Move a batch the way Lightning's training loop moves it (``training_epoch_loop``).

    The precision plugin's ``convert_input``, then ``on_before_batch_transfer``,
    ``transfer_batch_to_device`` and ``on_after_batch_transfer`` of the LightningModule or of
    the DataModule that overrides them (Lightning's own choice between the two). A module that
    is not the Trainer's gets its batch moved to its device only.
    """
    batch = trainer.precision_plugin.convert_input(batch)
    if pl_module is not trainer.lightning_module:
        return move_data_to_device(batch, pl_module.device)
    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def running_ids(loader: Iterable[Any], rank: int, world: int) -> Iterator[tuple[Any, torch.Tensor]]:
    """Iterable datasets have no indices: number each rank's examples ``k * world + rank``."""
    position = 0
    for batch in loader:
        rows = batch_rows(batch)
        ids = torch.arange(position, position + rows, dtype=torch.int64) * world + rank
        position += rows
        yield batch, ids


def check_weights_source(trainer: pl.Trainer, weights: str) -> None:
    """At setup: ``weights="best"`` needs a ``ModelCheckpoint`` to take the best model from."""
    if weights == "best" and trainer.checkpoint_callback is None:
        raise ValueError(
            "FisherCallback(weights='best') needs a ModelCheckpoint among the Trainer's "
            "callbacks (its best model is the one embedded)"
        )


@contextmanager
def first_batch_checked(trainer: pl.Trainer) -> Iterator[None]:
    """Around the one Fisher step on the fit's first batch: the training data must be one
    loader, the random number generators are left as they were, and an error says it was found
    before training."""
    check_loader(
        trainer.train_dataloader,
        " (checked before training). Pass one DataLoader, or embed later with "
        "callback.compute(trainer, module, dataloader=...)",
    )
    with isolate_rng():
        try:
            yield
        except (FisherError, UnsupportedLayerError, ProbeError) as err:
            raise type(err)(
                f"{err} (checked on the first training batch, before training)"
            ) from None


def skips_pass(trainer: pl.Trainer) -> bool:
    """``fast_dev_run`` skips the end-of-fit pass (said once, on rank 0)."""
    if not getattr(trainer, "fast_dev_run", False):
        return False
    rank_zero_info(
        "FisherCallback: fast_dev_run is on, so the Fisher pass is skipped (no embedding, no file)"
    )
    return True


@contextmanager
def where_trained(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """After ``fit``, the strategy's teardown has moved the module to the CPU: the pass runs
    where training ran and the module is left where it was found."""
    device = pl_module.device
    pl_module.to(trainer.strategy.root_device)
    try:
        yield
    finally:
        pl_module.to(device)


@contextmanager
def checkpoint_weights(
    trainer: pl.Trainer, pl_module: pl.LightningModule, weights: str
) -> Iterator[dict[str, Any]]:
    """The weights the pass measures; yields the facts to record in the artifact.

    ``"last"``: the module as it is. ``"best"``: the Trainer's ``ModelCheckpoint``'s best model,
    read with ``torch.load(weights_only=True)`` and loaded for the pass only; the module's own
    tensors are put back afterwards (bit for bit), also on error.
    """
    if weights == "last":
        yield {}
        return
    checkpoint = trainer.checkpoint_callback
    path = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    if not path:
        raise FisherError(
            "FisherCallback(weights='best'): the ModelCheckpoint saved no best model (no "
            "checkpoint was written during fit); use weights='last'"
        )
    state = check_checkpoint_path(path, "FisherCallback(weights='best') checkpoint")["state_dict"]
    own = {name: tensor.detach().clone() for name, tensor in pl_module.state_dict().items()}
    pl_module.load_state_dict(state)
    try:
        yield {"weights": "best", "checkpoint": os.fspath(path)}
    finally:
        pl_module.load_state_dict(own)


def log_summary(
    trainer: pl.Trainer, embedding: TaskEmbedding, output: str | None, seconds: float
) -> None:
    """The artifact's path and the pass's size and time, to the Trainer's loggers (rank 0)."""
    count = embedding.meta.get("num_samples", embedding.meta.get("num_batches", 0))
    summary = {
        "fisher/num_samples": float(count),
        "fisher/values": float(len(embedding)),
        "fisher/seconds": float(seconds),
    }
    where = f", written to {output}" if output is not None else ""
    rank_zero_info(
        f"FisherCallback: {len(embedding)} values from {count} examples in {seconds:.1f} s{where}"
    )
    for logger in trainer.loggers:
        logger.log_metrics(summary, step=trainer.global_step)
        if output is not None:
            logger.log_hyperparams({"fisher/output": os.path.abspath(output)})
