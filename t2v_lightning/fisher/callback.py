r"""FisherCallback: the filter-wise diagonal Fisher of a network, measured inside a Lightning fit.

The callback owns the statistics; :mod:`t2v_lightning.fisher.estimators` does the math. Like a
torchmetrics ``MeanMetric``, the state is a sum and a count: per embedded layer, the sum over
examples of the squared per-example gradient rows (``sum_sq_grad``, float64), and the number of
examples (``num_samples``). At the end both are summed across ranks (never averaged) and
divided, so the result does not depend on the number of processes:

.. math::

    \text{hessian}[o] = \frac{\sum_\text{ranks} \sum_n \lVert g_n[o, :] \rVert^2}
                             {\sum_\text{ranks} N_\text{rank} \cdot \text{row size}}.

Labels are drawn from the model's own predictive distribution, seeded by each example's id
(:func:`~t2v_lightning.fisher.estimators.sample_labels`), so which rank sees an example, in
which batch, does not change its contribution. Log-probabilities are computed in float32 and
sums kept in float64 whatever the Trainer's precision; under ``"16-*"`` precision the loss is
multiplied by ``grad_scale`` (1024) before backward and the gradients divided by it in float32
before they are squared.

Two ways to use it (``at=``):

* ``"train_batch"`` (what :class:`~t2v_lightning.Task2Vec` does): accumulate after every training
  batch. Batches must be ``(inputs, ids)`` with int64 example ids in ``[0, num_examples)``; ids
  outside that range are padding (see :class:`~t2v_lightning.fisher.sharding.ShardSampler`) and
  ids already counted are skipped, so every example counts once. Ids must not repeat across
  ranks (``DistributedSampler``'s padding does; the end of the pass raises if it happened).
* ``"fit_end"`` (inside your own Lightning project): when ``fit`` ends, run one extra pass over
  the Trainer's training data with your LightningModule in eval mode, and embed it. Each rank
  visits its share of the dataset's indices (every index once across ranks, whatever the
  Trainer's sampler); :meth:`FisherCallback.compute` does the same pass on demand. Under DDP
  every rank first takes rank 0's parameters and buffers (each rank has updated its own
  batch-norm statistics), so the embedding is that of the model rank 0 checkpoints.

Hooks used: ``setup`` (find the layers, ``"train_batch"``), ``on_train_batch_end`` (one Fisher
step on the batch, after the LightningModule's own step, ``"train_batch"``), ``on_train_end``
(``"fit_end"``: the extra pass; both: reduce across ranks, build the
:class:`~t2v_lightning.embedding.TaskEmbedding`, rank 0 writes it), ``state_dict`` /
``load_state_dict`` (resume from a Lightning checkpoint).

What it needs from the LightningModule: the network to embed (the module itself, or the
submodule named by ``network``) must be reachable by ``pl_module(inputs)`` returning logits of
shape (batch, classes), where ``inputs`` is the batch itself when it is a tensor, else its first
element (``(inputs, labels)``); otherwise pass ``logits_fn(pl_module, batch) -> logits``. The
batch's labels are never used: the Fisher samples labels from the model. A module whose output
is not a (batch, classes) tensor stops the pass with a :class:`FisherError` saying so.

Checkpoints and DDP: Lightning saves callback state from rank 0 only, so :meth:`state_dict`
(called on every rank while a checkpoint is made) returns the *global* state: sums and counts
summed over ranks, the ids counted on any rank. After a restore, rank 0 alone holds the
restored sums and count (the other ranks start from zero) and every rank skips the ids already
counted, so the final sum over ranks is exact, even with a different number of processes.
Before summing, the ranks check that they measured identical weights (a :class:`FisherError`
otherwise).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from t2v_lightning.allocator import settle_thresholds
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.fisher.estimators import (
    ESTIMATORS,
    LIKELIHOODS,
    Estimator,
    FisherError,
    LayerFisherTaps,
    Likelihood,
    batch_filter_sums,
    embedded_layers,
    filter_values,
    num_filters,
)
from t2v_lightning.fisher.sharding import CollateWithIds, IdsDataset, ShardSampler
from t2v_lightning.probe import batch_rows, call_probe, probe_fingerprint
from t2v_lightning.safety import is_int

__all__ = ["FisherCallback", "FisherError", "At", "AT_CHOICES"]

log = logging.getLogger(__name__)

At = Literal["train_batch", "fit_end"]
AT_CHOICES: tuple[str, ...] = ("train_batch", "fit_end")

class _BatchLogits(nn.Module):
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


class FisherCallback(Callback):
    """Accumulate the filter-wise Fisher of ``pl_module`` (or one of its submodules).

    Args:
        estimator: ``"per_sample"`` (labels sampled from the model, per-example gradients),
            ``"exact"`` (expectation over all classes) or ``"batch"`` (the reference's squared
            mini-batch gradient).
        mc_samples: labels drawn per example by ``per_sample``.
        seed: seed of the label sampling (labels depend on it and on each example's id only).
        num_examples: ``"train_batch"``: number of distinct example ids; ids at or beyond it are
            padding (``None``: no range check and no duplicate check). Ignored by ``"fit_end"``,
            which uses the dataset's length.
        head: qualified name (relative to the embedded network) of the classifier head, which
            is left out of the embedding (``None``: every layer with weights is embedded).
        network: attribute path of the submodule of the LightningModule whose layers are
            embedded (``None``: the LightningModule itself).
        output: where rank 0 writes the artifact at the end (``None``: keep it in memory only,
            as :attr:`embedding`).
        overwrite: replace an existing file at ``output``.
        meta: extra JSON-serialisable facts recorded in the artifact.
        identity: JSON-serialisable facts that a checkpoint and the run resuming from it must
            share (the task, the probe, the sampling); a checkpoint made with other values is
            refused. ``None``: none beyond the callback's own settings.
        grad_scale: factor on the loss before backward (gradients are divided by it, in fp32,
            before squaring); ``None`` picks 1024 under fp16 precision and 1 otherwise.
        at: ``"train_batch"`` (accumulate on every training batch of ``(inputs, ids)``) or
            ``"fit_end"`` (one extra pass over the training data when ``fit`` ends).
        batch_size: examples per step of the ``"fit_end"`` pass (``None``: the training data
            loader's batch size).
        logits_fn: ``"fit_end"``: a function ``(pl_module, batch) -> logits`` for modules whose
            forward does not map the batch's inputs to logits (``None``: ``pl_module(inputs)``).
        likelihood: ``"categorical"`` (softmax over the logits, one class per example) or
            ``"bernoulli"`` (multi-label: an independent sigmoid per output; see
            :mod:`t2v_lightning.fisher.estimators`).

    Example:
        >>> callback = FisherCallback(estimator="exact", num_examples=100, head="fc")
        >>> callback.state_key
        "FisherCallback{'estimator': 'exact', 'seed': 0, 'mc_samples': 1}"
        >>> # in your own project: trainer = Trainer(callbacks=[FisherCallback(at="fit_end",
        >>> #     head="classifier", output="task.safetensors")])
    """

    def __init__(
        self,
        estimator: Estimator = "per_sample",
        mc_samples: int = 1,
        seed: int = 0,
        num_examples: int | None = None,
        head: str | None = None,
        network: str | None = None,
        output: str | os.PathLike[str] | None = None,
        overwrite: bool = True,
        meta: dict[str, Any] | None = None,
        identity: dict[str, Any] | None = None,
        grad_scale: float | None = None,
        at: At = "train_batch",
        batch_size: int | None = None,
        logits_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        likelihood: Likelihood = "categorical",
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not is_int(mc_samples) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if not is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if num_examples is not None and (
            not is_int(num_examples) or num_examples < 1
        ):
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
        if grad_scale is not None and not grad_scale > 0:
            raise ValueError(f"grad_scale must be positive, got {grad_scale!r}")
        if at not in AT_CHOICES:
            raise ValueError(f"at must be one of {AT_CHOICES}, got {at!r}")
        if batch_size is not None and (
            not is_int(batch_size) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}")
        if head is not None and (not isinstance(head, str) or not head):
            raise ValueError(f"head must be a qualified module name, got {head!r}")
        if network is not None and (not isinstance(network, str) or not network):
            raise ValueError(f"network must be a submodule path, got {network!r}")
        self._estimator: Estimator = estimator
        self._mc_samples = mc_samples
        self._likelihood: Likelihood = likelihood
        self._seed = seed
        self._num_examples = num_examples
        self._head = head
        self._network_path = network
        self._output = output
        self._overwrite = overwrite
        self._meta = dict(meta or {})
        self._identity = dict(identity or {})
        self._grad_scale = grad_scale
        self._at: At = at
        self._batch_size = batch_size
        self._logits_fn = logits_fn
        self._layers: list[tuple[str, nn.Module]] = []
        self.sum_sq_grad: dict[str, torch.Tensor] = {}
        self.num_samples = 0
        # ids counted by this rank since the start (or the restore); ids counted before a
        # restore, on any rank; the checkpoint state waiting for setup().
        self._seen: torch.Tensor | None = None
        self._skip: torch.Tensor | None = None
        self._restored: dict[str, Any] | None = None
        self._strategy: Any = None
        self._rank = 0
        self.embedding: TaskEmbedding | None = None

    @property
    @override
    def state_key(self) -> str:
        if self._likelihood != "categorical":
            return self._generate_state_key(
                estimator=self._estimator,
                seed=self._seed,
                mc_samples=self._mc_samples,
                likelihood=self._likelihood,
            )
        return self._generate_state_key(
            estimator=self._estimator, seed=self._seed, mc_samples=self._mc_samples
        )

    @property
    def output(self) -> str | os.PathLike[str] | None:
        """Where rank 0 writes the artifact (``None``: nowhere)."""
        return self._output

    @output.setter
    def output(self, value: str | os.PathLike[str] | None) -> None:
        self._output = value

    # ------------------------------------------------------------------ setup
    def _network(self, pl_module: nn.Module) -> nn.Module:
        if self._network_path is None:
            return pl_module
        try:
            return pl_module.get_submodule(self._network_path)
        except AttributeError as err:
            raise ValueError(
                f"FisherCallback(network={self._network_path!r}): the LightningModule has no such "
                "submodule"
            ) from err

    def _start(self, trainer: pl.Trainer, network: nn.Module, num_examples: int | None) -> None:
        """Find the layers and zero the statistics (then apply a pending restore)."""
        if self._head is not None:
            try:
                network.get_submodule(self._head)
            except AttributeError as err:
                names = [name for name, _ in network.named_modules() if name][:20]
                raise ValueError(
                    f"FisherCallback(head={self._head!r}): the network has no such module; some "
                    f"of its modules: {names}"
                ) from err
        self._layers = embedded_layers(network, self._head)
        if not self._layers:
            raise ValueError("FisherCallback: the network has no layer with weights to embed")
        # Steps whose memory fits under glibc's raised trim threshold are then not given back to
        # the system and faulted in again at every step (t2v_lightning.allocator).
        settle_thresholds()
        self.sum_sq_grad = {
            name: torch.zeros(num_filters(module), dtype=torch.float64)
            for name, module in self._layers
        }
        self.num_samples = 0
        self._seen = torch.zeros(num_examples, dtype=torch.bool) if num_examples else None
        self._skip = None
        self._strategy = trainer.strategy
        self._rank = int(trainer.global_rank)
        self.embedding = None
        if self._restored is not None:
            restored, self._restored = self._restored, None
            self._apply_restored(restored)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._at != "train_batch":
            return
        self._start(trainer, self._network(pl_module), self._num_examples)

    def _scale_for(self, trainer: pl.Trainer) -> float:
        if self._grad_scale is not None:
            return self._grad_scale
        precision = str(getattr(trainer, "precision", "32-true"))
        return 1024.0 if precision.startswith("16") else 1.0

    # ------------------------------------------------------------------ accumulation
    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._at != "train_batch":
            return
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                "FisherCallback(at='train_batch') expects training batches of (inputs, ids); got "
                f"{type(batch).__name__} (use at='fit_end' for batches of (inputs, labels))"
            )
        inputs, ids = batch
        ids = torch.as_tensor(ids).to("cpu", torch.int64)
        self.accumulate(trainer, pl_module, inputs, ids)

    def accumulate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        inputs: torch.Tensor | Mapping[str, torch.Tensor],
        ids: torch.Tensor,
    ) -> None:
        """One Fisher step on a batch of inputs with their example ids.

        Args:
            trainer: the Trainer running the pass (its strategy places and reduces).
            pl_module: the LightningModule whose ``network`` is embedded.
            inputs: the batch's inputs (a tensor, or a mapping of tensors for text probes).
            ids: the dataset index of each row of ``inputs`` (int64); labels are sampled by id.
        """
        network = self._network(pl_module)
        self._accumulate(trainer, network, network, inputs, ids)

    def _valid(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows that count: in range, not counted before, first occurrence within the batch."""
        valid = ids >= 0
        if self._seen is None:
            return valid
        in_range = valid & (ids < self._seen.numel())
        rows = in_range.nonzero().flatten()
        batch_ids = ids[rows]
        fresh = ~self._seen[batch_ids]
        if self._skip is not None:
            fresh &= ~self._skip[batch_ids]
        unique, inverse = torch.unique(batch_ids, return_inverse=True)
        first = torch.full((unique.numel(),), batch_ids.numel(), dtype=torch.int64)
        first = first.scatter_reduce(0, inverse, torch.arange(batch_ids.numel()), reduce="amin")
        is_first = torch.zeros(batch_ids.numel(), dtype=torch.bool)
        is_first[first] = True
        valid = torch.zeros_like(valid)
        valid[rows] = fresh & is_first
        return valid

    def _accumulate(
        self,
        trainer: pl.Trainer,
        forward: nn.Module,
        network: nn.Module,
        inputs: torch.Tensor | Mapping[str, torch.Tensor],
        ids: torch.Tensor,
    ) -> None:
        valid = self._valid(ids)
        if not bool(valid.any()):
            return
        # Frozen batch-norm statistics, no dropout (SPEC section 7); each module's own mode is
        # put back afterwards (a user's module may keep parts of itself in eval mode).
        modes = [(module, module.training) for module in forward.modules()]
        forward.eval()
        try:
            with torch.enable_grad(), LayerFisherTaps(
                forward, self._layers, self._scale_for(trainer)
            ) as taps:
                sums, count = batch_filter_sums(
                    forward,
                    taps,
                    inputs,
                    ids,
                    valid,
                    self._estimator,
                    self._seed,
                    self._mc_samples,
                    forward_context=trainer.precision_plugin.forward_context,
                    likelihood=self._likelihood,
                )
        finally:
            for module, training in modes:
                module.training = training
        for name, value in sums.items():
            self.sum_sq_grad[name] += value.detach().to("cpu", torch.float64)
        self.num_samples += count
        if self._seen is not None:
            self._seen[ids[valid]] = True

    # ------------------------------------------------------------------ the "fit_end" pass
    def compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataloader: DataLoader | None = None,
    ) -> TaskEmbedding:
        """Embed ``pl_module`` on ``dataloader`` (default: the Trainer's training data) now.

        Runs the ``"fit_end"`` pass: each rank visits its share of the dataset's indices with the
        module in eval mode, the sums are reduced across ranks and rank 0 writes ``output``.
        Under DDP, call it on every rank.

        Args:
            trainer: the Trainer whose strategy places the module and reduces across ranks.
            pl_module: the trained LightningModule to embed.
            dataloader: the examples to embed (``None``: the Trainer's training data).

        Returns:
            The task embedding (also kept as :attr:`embedding`).
        """
        loader = dataloader if dataloader is not None else trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "FisherCallback needs a single torch DataLoader of training data; the Trainer has "
                f"{type(loader).__name__}. Call callback.compute(trainer, module, dataloader=...)"
            )
        network = self._network(pl_module)
        _broadcast_from_rank_zero(trainer, pl_module)
        batches, num_examples = self._pass_batches(trainer, loader)
        self._start(trainer, network, num_examples)
        forward = _BatchLogits(pl_module, self._logits_fn)
        device = pl_module.device
        for batch, ids in batches:
            batch = move_data_to_device(batch, device)
            forward.batch = batch
            inputs = self._inputs_of(batch, int(ids.numel()), device)
            self._accumulate(trainer, forward, network, inputs, ids)
        forward.batch = None
        return self._finish(trainer, network)

    def _pass_batches(
        self, trainer: pl.Trainer, loader: DataLoader
    ) -> tuple[Iterable[tuple[Any, torch.Tensor]], int | None]:
        """``(batch, ids)`` pairs of this rank, and the number of distinct ids (if known)."""
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        dataset = loader.dataset
        batch_size = self._batch_size or loader.batch_size
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
        return _running_ids(loader, rank, world), None

    def _inputs_of(
        self, batch: Any, rows: int, device: torch.device
    ) -> torch.Tensor | Mapping[str, torch.Tensor]:
        if self._logits_fn is not None:
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

    # ------------------------------------------------------------------ end of the pass
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._at == "fit_end":
            self.compute(trainer, pl_module)
        else:
            self._finish(trainer, self._network(pl_module))

    def _flat_state(self) -> torch.Tensor:
        parts = [self.sum_sq_grad[name] for name, _ in self._layers]
        parts.append(torch.tensor([float(self.num_samples)], dtype=torch.float64))
        if self._seen is not None:
            parts.append(self._seen.to(torch.float64))
        return torch.cat(parts)

    def _reduced(self) -> tuple[dict[str, torch.Tensor], int, torch.Tensor | None]:
        """Sums, count and per-id counts, summed over ranks (float64 all-reduce, op sum)."""
        flat = self._flat_state()
        strategy = self._strategy
        if strategy is not None and int(getattr(strategy, "world_size", 1)) > 1:
            flat = strategy.reduce(flat.to(strategy.root_device), reduce_op="sum")
            flat = torch.as_tensor(flat).to("cpu", torch.float64)
        sums: dict[str, torch.Tensor] = {}
        position = 0
        for name, _ in self._layers:
            size = self.sum_sq_grad[name].numel()
            sums[name] = flat[position : position + size].clone()
            position += size
        total = int(round(float(flat[position])))
        counts = None if self._seen is None else flat[position + 1 :].clone()
        return sums, total, counts

    def _check_same_network(self, trainer: pl.Trainer, network: nn.Module) -> None:
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

    def _finish(self, trainer: pl.Trainer, network: nn.Module) -> TaskEmbedding:
        self._check_same_network(trainer, network)
        sums, total, counts = self._reduced()
        if counts is not None and bool((counts > 1).any()):
            repeated = (counts > 1).nonzero().flatten()
            raise FisherError(
                f"{repeated.numel()} example ids (e.g. {repeated[:5].tolist()}) were counted on more "
                "than one rank, so the sums count them twice; a DistributedSampler pads ranks with "
                "repeated examples. Give the Fisher pass unique ids per rank (ShardSampler and "
                "Trainer(use_distributed_sampler=False)) or use FisherCallback(at='fit_end')"
            )
        if counts is not None and self._at == "train_batch" and trainer.is_global_zero:
            counted = counts > 0
            if self._skip is not None:
                counted |= self._skip
            missing = int((~counted).sum())
            if missing:
                warnings.warn(
                    f"FisherCallback: {missing} of {counted.numel()} example ids were never "
                    "counted; the Fisher covers the others only (a run resumed mid-epoch with "
                    "Trainer.fit(ckpt_path=...) restarts the data at its beginning and stops "
                    "early; Task2Vec(resume_from=...) resumes a Fisher pass exactly)",
                    stacklevel=2,
                )
        hessian, offsets = filter_values(sums, total, self._layers)
        meta = dict(self._meta)
        if self._at == "fit_end":
            meta.setdefault("probe_class", type(network).__name__)
            meta.setdefault("probe_fingerprint", probe_fingerprint(network, exclude=self._head))
            meta.setdefault("head", self._head)
            meta["method"] = "montecarlo"
        meta.update(
            estimator=self._estimator,
            mc_samples=self._mc_samples if self._estimator == "per_sample" else None,
            likelihood=self._likelihood,
            seed=self._seed,
            world_size=int(trainer.world_size),
            precision=str(trainer.precision),
            fisher_at=self._at,
        )
        if self._head is not None:
            meta["head_fingerprint"] = probe_fingerprint(network.get_submodule(self._head))
        if self._estimator == "batch":
            meta["num_batches"] = total
        else:
            meta["num_samples"] = total
        self.embedding = TaskEmbedding(hessian, torch.ones_like(hessian), offsets, meta)
        if self._output is not None and trainer.is_global_zero:
            path = self.embedding.save(self._output, overwrite=self._overwrite)
            log.info("Task embedding written to %s", path)
        return self.embedding

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        """The global state (summed over ranks). Under DDP, every rank must call it together."""
        state: dict[str, Any] = {
            "estimator": self._estimator,
            "seed": self._seed,
            "mc_samples": self._mc_samples,
            "likelihood": self._likelihood,
            "at": self._at,
            "identity": dict(self._identity),
        }
        if self._at != "train_batch" or not self._layers:
            return state
        sums, total, counts = self._reduced()
        seen = None
        if counts is not None:
            seen = counts > 0
            if self._skip is not None:
                seen |= self._skip
        state.update(sum_sq_grad=sums, num_samples=total, seen=seen)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("likelihood", "categorical") != self._likelihood:
            raise ValueError(
                "cannot resume: the checkpoint's Fisher state has "
                f"likelihood={state_dict.get('likelihood', 'categorical')!r} but this "
                f"FisherCallback has {self._likelihood!r}"
            )
        for key in ("estimator", "seed", "mc_samples"):
            if state_dict.get(key) != getattr(self, f"_{key}"):
                raise ValueError(
                    f"cannot resume: the checkpoint's Fisher state has {key}={state_dict.get(key)!r}"
                    f" but this FisherCallback has {getattr(self, f'_{key}')!r}"
                )
        # Checkpoints of earlier versions keep the identity under "meta".
        stored = state_dict.get("identity", state_dict.get("meta")) or {}
        for key, value in self._identity.items():
            if key in stored and stored[key] != value:
                raise ValueError(
                    f"cannot resume: the checkpoint was made for {key}={stored[key]!r}, this "
                    f"run has {key}={value!r} (another task, probe or setting)"
                )
        if "sum_sq_grad" not in state_dict:
            return  # a "fit_end" callback's state: nothing accumulated to restore
        # setup() runs after checkpoint loading in some entry points and before it in others.
        if self._layers:
            self._apply_restored(state_dict)
        else:
            self._restored = state_dict

    def _apply_restored(self, state: dict[str, Any]) -> None:
        stored = state["sum_sq_grad"]
        if set(stored) != set(self.sum_sq_grad) or any(
            stored[name].shape != self.sum_sq_grad[name].shape for name in stored
        ):
            raise ValueError("cannot resume: the checkpoint's Fisher state is for other layers")
        seen = state.get("seen")
        if seen is not None and (self._seen is None or seen.shape != self._seen.shape):
            raise ValueError(
                f"cannot resume: the checkpoint counted {tuple(seen.shape)} example ids, this run "
                f"has {None if self._seen is None else tuple(self._seen.shape)}"
            )
        # Rank 0 alone carries the restored sums, so that the sum over ranks counts them once.
        if self._rank == 0:
            self.sum_sq_grad = {
                name: value.to(torch.float64).clone() for name, value in stored.items()
            }
            self.num_samples = int(state["num_samples"])
        else:
            self.sum_sq_grad = {name: torch.zeros_like(value) for name, value in self.sum_sq_grad.items()}
            self.num_samples = 0
        if self._seen is not None:
            self._seen.zero_()
        self._skip = None if seen is None else torch.as_tensor(seen, dtype=torch.bool).clone()


def _broadcast_from_rank_zero(trainer: pl.Trainer, module: nn.Module) -> None:
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


def _running_ids(loader: Iterable[Any], rank: int, world: int) -> Iterator[tuple[Any, torch.Tensor]]:
    """Iterable datasets have no indices: number each rank's examples ``k * world + rank``."""
    position = 0
    for batch in loader:
        rows = batch_rows(batch)
        ids = torch.arange(position, position + rows, dtype=torch.int64) * world + rank
        position += rows
        yield batch, ids
