r"""FisherCallback: the filter-wise diagonal Fisher of a network, measured inside a Lightning fit.

The callback decides when to measure; :class:`~t2v_lightning.fisher.accumulator.FisherSums`
holds the sums and counts (summed across ranks, never averaged, then divided), the estimators
do the math, and :mod:`~t2v_lightning.fisher.fit_end` reads the user's data. Labels are drawn
from the model, seeded by each example's id, so ranks, batches and order do not change an
example's contribution; log-probabilities are float32 and sums float64 whatever the precision.

Two ways to use it (``at=``):

* ``"fit_end"`` (the default; your own Lightning project, SPEC section 9): when ``fit`` ends,
  one extra pass over the training dataset, every example once across ranks whatever the
  sampler or ``limit_train_batches``, with the LightningModule in eval mode. Batches go the way
  training batches go (the precision plugin, then the transfer hooks of the module or the
  DataModule). The first training batch goes through one Fisher step before the first training
  step, so a forward that returns no logits, an unsupported layer or one the logits never reach
  stops ``fit`` at once. The artifact goes to ``trainer.log_dir`` (never replacing a file
  unless ``overwrite=True``) and a summary to the Trainer's loggers. ``fast_dev_run`` skips the
  pass; a run resumed with nothing left to train still embeds; under DDP every rank measures
  rank 0's weights; after ``ddp_spawn`` the parent process's :attr:`~FisherCallback.embedding`
  holds the result. :meth:`~FisherCallback.compute` runs the same pass on demand.
* ``"train_batch"`` (:class:`~t2v_lightning.Task2Vec`'s, chosen explicitly): one Fisher step
  after every training batch of ``(inputs, ids)``: distinct int64 example ids, those at or beyond
  ``num_examples`` being padding (:class:`~t2v_lightning.fisher.sharding.ShardSampler`); any
  other batch is refused before its training step. Checkpointable: :meth:`state_dict` is the
  global state (sums over ranks, ids counted anywhere), restored exactly even on another number
  of processes.

The user's module is never changed, on success or on error: mode flags, ``requires_grad``
flags, parameters and buffers (bit for bit) are as they were.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from t2v_lightning.allocator import settle_thresholds
from t2v_lightning.choices import Estimator, FisherError, Likelihood
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.fisher.accumulator import FisherSums
from t2v_lightning.fisher.checks import (
    AT_CHOICES,
    check_arguments,
    check_resume,
    network_of,
    pick_layers,
)
from t2v_lightning.fisher.estimators import Inputs, eval_filter_sums
from t2v_lightning.fisher.fit_end import (
    BatchLogits,
    SpawnHandoff,
    batch_inputs,
    check_loader,
    check_same_network,
    check_weights_source,
    checkpoint_weights,
    first_batch_checked,
    fit_output,
    grad_scale_for,
    log_summary,
    pass_batches,
    rank_zero_weights,
    skips_pass,
    through_pipeline,
    where_trained,
)
from t2v_lightning.fisher.layers.table import check_exclude, num_filters
from t2v_lightning.fisher.record import fisher_embedding
from t2v_lightning.fisher.sharding import check_id_batch
from t2v_lightning.probe import batch_rows

__all__ = ["FisherCallback", "FisherError", "At", "AT_CHOICES", "Weights", "DEFAULT_OUTPUT"]

log = logging.getLogger(__name__)

At = Literal["fit_end", "train_batch"]
Weights = Literal["last", "best"]
DEFAULT_OUTPUT = "task_embedding.safetensors"
"""File name of the ``"fit_end"`` artifact in ``trainer.log_dir`` when no ``output`` is given."""


class FisherCallback(Callback):
    """Embed ``pl_module`` (or one of its submodules) by its filter-wise Fisher.

    Args:
        estimator: ``"per_sample"`` (labels sampled from the model, per-example gradients),
            ``"exact"`` (expectation over all classes) or ``"batch"`` (the reference's squared
            mini-batch gradient).
        mc_samples: labels drawn per example by ``per_sample``.
        seed: seed of the label sampling (labels depend on it and on each example's id only).
        num_examples: ``"train_batch"`` (required there): number of distinct example ids; ids at
            or beyond it are padding. Ignored by ``"fit_end"``, which uses the dataset's length.
        head: qualified name (relative to the embedded network) of the classifier head, which
            is left out of the embedding (``None``: every layer with weights is embedded).
        network: attribute path of the submodule of the LightningModule whose layers are
            embedded (``None``: the LightningModule itself).
        output: where rank 0 writes the artifact when ``fit`` ends (``None``: with
            ``at="fit_end"``, ``task_embedding.safetensors`` in ``trainer.log_dir``; with
            ``at="train_batch"``, nowhere: the result stays in :attr:`embedding`).
            :meth:`compute` writes only to an ``output`` given here.
        overwrite: replace an existing file at ``output`` (otherwise ``fit`` stops at setup,
            before training, if the file exists).
        meta: extra JSON-serialisable facts recorded in the artifact.
        identity: JSON-serialisable facts that a checkpoint and the run resuming from it must
            share (the task, the probe, the sampling); a checkpoint made with other values is
            refused. ``None``: none beyond the callback's own settings.
        grad_scale: factor on the loss before backward (gradients are divided by it, in fp32,
            before squaring); ``None`` picks 1024 under fp16 precision and 1 otherwise.
        at: ``"fit_end"`` (one extra pass over the training data when ``fit`` ends) or
            ``"train_batch"`` (accumulate on every training batch of ``(inputs, ids)``; what
            :class:`~t2v_lightning.Task2Vec` uses).
        batch_size: examples per step of the ``"fit_end"`` pass (``None``: the training data
            loader's batch size).
        logits_fn: ``"fit_end"``: a module-level function ``(pl_module, batch) -> logits`` for
            modules whose forward does not map the batch's inputs to logits (``None``:
            ``pl_module(inputs)``). The batch is the one ``training_step`` would receive.
        likelihood: ``"categorical"`` (softmax over the logits, one class per example) or
            ``"bernoulli"`` (multi-label: an independent sigmoid per output; see
            :mod:`t2v_lightning.fisher.estimators`).
        exclude: qualified module names or globs (``"encoder.layers.*.norm1"``), relative to the
            embedded network, of layers left out of the embedding with their submodules (as the
            head is). A pattern that matches no module is an error.
        weights: ``"fit_end"``: which weights the pass measures: ``"last"`` (the module as
            ``fit`` leaves it) or ``"best"`` (the Trainer's ``ModelCheckpoint``'s best model,
            loaded for the pass only; the module's own weights are put back afterwards).

    Example:
        >>> callback = FisherCallback(head="classifier")  # trainer = Trainer(callbacks=[callback])
        >>> callback.state_key
        "FisherCallback{'estimator': 'per_sample', 'seed': 0, 'mc_samples': 1, 'head': 'classifier'}"
        >>> # after trainer.fit(model, data): callback.embedding, and the file in trainer.log_dir
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
        overwrite: bool = False,
        meta: dict[str, Any] | None = None,
        identity: dict[str, Any] | None = None,
        grad_scale: float | None = None,
        at: At = "fit_end",
        batch_size: int | None = None,
        logits_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        likelihood: Likelihood = "categorical",
        exclude: Sequence[str] | None = None,
        weights: Weights = "last",
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        check_arguments(**arguments)
        self._estimator: Estimator = estimator
        self._mc_samples = mc_samples
        self._likelihood: Likelihood = likelihood
        # A categorical over one class has zero Fisher: refuse it rather than write zeros.
        self._min_classes = 2 if likelihood == "categorical" else 1
        self._seed = seed
        self._num_examples = num_examples
        self._head = head
        self._network_path = network
        self._exclude = check_exclude(exclude)
        self._weights: Weights = weights
        self._output = output
        self._overwrite = overwrite
        self._meta = dict(meta or {})
        self._identity = dict(identity or {})
        self._grad_scale = grad_scale
        self._at: At = at
        self._batch_size = batch_size
        self._logits_fn = logits_fn
        self._layers: list[tuple[str, nn.Module]] = []
        self._sums: FisherSums | None = None
        # the checkpoint state waiting for setup()
        self._restored: dict[str, Any] | None = None
        self._strategy: Any = None
        self._rank = 0
        # The fit in progress: the file the end of fit writes, whether its first batch was
        # checked and whether it has embedded.
        self._fit_output: str | None = None
        self._checked = False
        self._embedded = False
        # ddp_spawn: rank 0 of the spawned processes leaves the result here for the parent
        # process, whose own copy of the callback never sees a hook (see `embedding`).
        self._handoff = SpawnHandoff()
        self._embedding: TaskEmbedding | None = None

    @property
    @override
    def state_key(self) -> str:
        # What makes two instances in one Trainer differ. Task2Vec's per-batch callback keeps the
        # key of earlier versions (its checkpoints resume by it).
        key = self._settings()
        if self._likelihood == "categorical":
            del key["likelihood"]
        if self._at == "fit_end":
            optional = {
                "network": self._network_path,
                "head": self._head,
                "exclude": list(self._exclude) or None,
                "weights": None if self._weights == "last" else self._weights,
                "output": None if self._output is None else os.fspath(self._output),
                "logits_fn": getattr(self._logits_fn, "__qualname__", None),
            }
            key.update({name: value for name, value in optional.items() if value is not None})
        return self._generate_state_key(**key)

    @property
    def sum_sq_grad(self) -> dict[str, torch.Tensor]:
        """Per embedded layer, this rank's float64 sums of squared gradient rows."""
        return {} if self._sums is None else self._sums.sum_sq_grad

    @property
    def num_samples(self) -> int:
        """Examples (batches for ``estimator="batch"``) this rank has summed over."""
        return 0 if self._sums is None else self._sums.num_samples

    @property
    def output(self) -> str | os.PathLike[str] | None:
        """Where rank 0 writes the artifact (``None``: see the ``output`` argument)."""
        return self._output

    @output.setter
    def output(self, value: str | os.PathLike[str] | None) -> None:
        self._output = value

    @property
    def embedding(self) -> TaskEmbedding | None:
        """The last embedding this callback made (``None`` before any).

        After a ``ddp_spawn`` fit, the parent process reads the one its rank 0 made.
        """
        if self._embedding is None:
            self._embedding = self._handoff.take()
        return self._embedding

    @embedding.setter
    def embedding(self, value: TaskEmbedding | None) -> None:
        self._embedding = value

    # ------------------------------------------------------------------ setup
    def _network(self, pl_module: nn.Module) -> nn.Module:
        return network_of(pl_module, self._network_path)

    def _start(self, trainer: pl.Trainer, network: nn.Module, num_examples: int | None) -> None:
        """Find the layers and zero the statistics (then apply a pending restore)."""
        self._layers = pick_layers(network, self._head, self._exclude)
        # Steps whose memory fits under glibc's raised trim threshold are then not given back to
        # the system and faulted in again at every step (t2v_lightning.allocator).
        settle_thresholds()
        self._sums = FisherSums(
            [(name, num_filters(module)) for name, module in self._layers], num_examples
        )
        self._strategy = trainer.strategy
        self._rank = int(trainer.global_rank)
        if self._restored is not None:
            restored, self._restored = self._restored, None
            self._sums.restore(restored, self._rank)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._checked = False
        self._embedded = False
        if self._at == "train_batch":
            self._start(trainer, self._network(pl_module), self._num_examples)
            return
        # Wrong names, unsupported layers and an existing output stop fit here, before training.
        pick_layers(self._network(pl_module), self._head, self._exclude)
        check_weights_source(trainer, self._weights)
        self._fit_output = fit_output(trainer, self._output, DEFAULT_OUTPUT, self._overwrite)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._at == "train_batch":
            check_id_batch(batch, self._num_examples)
        elif not self._checked:
            self._check_first_batch(trainer, pl_module, batch)
        self._checked = True

    def _check_first_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any
    ) -> None:
        """One Fisher step on the fit's first batch (already through Lightning's pipeline).

        Runs what the end-of-fit pass will run (forward or ``logits_fn``, logits shape, every
        embedded layer reached by the logits), and forgets the result; any problem stops ``fit``
        before its first training step. The random number generators are left as they were.
        """
        network = self._network(pl_module)
        with first_batch_checked(trainer):
            rows = batch_rows(batch)
            self._start(trainer, network, rows)
            try:
                forward = BatchLogits(pl_module, self._logits_fn, self._min_classes)
                forward.batch = batch
                inputs = batch_inputs(batch, rows, pl_module.device, self._logits_fn)
                self._accumulate(trainer, forward, network, inputs, torch.arange(rows))
            finally:
                self._start(trainer, network, None)

    # ------------------------------------------------------------------ accumulation
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        if self._at != "train_batch":
            return
        inputs, ids = batch  # checked by on_train_batch_start
        ids = torch.as_tensor(ids).to("cpu", torch.int64)
        self.accumulate(trainer, pl_module, inputs, ids)

    def accumulate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Inputs, ids: torch.Tensor
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

    def _accumulate(
        self,
        trainer: pl.Trainer,
        forward: nn.Module,
        network: nn.Module,
        inputs: Inputs,
        ids: torch.Tensor,
    ) -> None:
        assert self._sums is not None, "setup() finds the layers first"
        valid = self._sums.valid(ids)
        if not bool(valid.any()):
            return
        scale = grad_scale_for(trainer, self._grad_scale)
        context = trainer.precision_plugin.forward_context
        sums, count = eval_filter_sums(
            forward, self._layers, scale, inputs, ids, valid, context, **self._settings()
        )
        self._sums.update(sums, count, ids, valid)

    # ------------------------------------------------------------------ the "fit_end" pass
    def compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataloader: DataLoader | None = None,
    ) -> TaskEmbedding:
        """Embed ``pl_module`` on ``dataloader`` (default: the Trainer's training data) now.

        Runs the ``"fit_end"`` pass: each rank visits its share of the dataset's indices with the
        module in eval mode, the sums are reduced across ranks and rank 0 writes ``output`` if
        one was given. Under DDP, call it on every rank.

        Args:
            trainer: the Trainer whose strategy places the module and reduces across ranks.
            pl_module: the trained LightningModule to embed.
            dataloader: the examples to embed (``None``: the Trainer's training data).

        Returns:
            The task embedding (also kept as :attr:`embedding`).
        """
        loader = dataloader if dataloader is not None else trainer.train_dataloader
        output = None if self._output is None else os.fspath(self._output)
        return self._run_pass(trainer, pl_module, loader, output)

    def _run_pass(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loader: Any,
        output: str | None,
        extra: Mapping[str, Any] | None = None,
    ) -> TaskEmbedding:
        check_loader(loader, ". Call callback.compute(trainer, module, dataloader=...)")
        network = self._network(pl_module)
        started = time.perf_counter()
        with rank_zero_weights(trainer, pl_module):
            batches, num_examples = pass_batches(trainer, loader, self._batch_size)
            self._start(trainer, network, num_examples)
            forward = BatchLogits(pl_module, self._logits_fn, self._min_classes)
            device = pl_module.device
            for batch, ids in batches:
                batch = through_pipeline(trainer, pl_module, batch)
                forward.batch = batch
                inputs = batch_inputs(batch, int(ids.numel()), device, self._logits_fn)
                self._accumulate(trainer, forward, network, inputs, ids)
            forward.batch = None
            embedding = self._finish(trainer, network, output, extra)
        if trainer.is_global_zero:
            log_summary(trainer, embedding, output, time.perf_counter() - started)
        return embedding

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._at == "train_batch":
            embedding = self._finish(trainer, self._network(pl_module), self._output)
            self._handoff.leave(trainer, embedding)
        else:
            self._embed_fit(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning skips the training loop, and on_train_end with it, when a run resumes from a
        # checkpoint that already reached max_epochs / max_steps, or has no training batches.
        if self._at != "fit_end" or self._embedded:
            return
        if trainer.train_dataloader is None:
            rank_zero_warn(
                "FisherCallback: the Trainer built no training data (limit_train_batches=0, or "
                "no training_step), so nothing was embedded; call "
                "callback.compute(trainer, module, dataloader) to embed on a DataLoader"
            )
            return
        with where_trained(trainer, pl_module):
            self._embed_fit(trainer, pl_module)

    def _embed_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._embedded = True
        if skips_pass(trainer):
            return
        with checkpoint_weights(trainer, pl_module, self._weights) as facts:
            loader = trainer.train_dataloader
            embedding = self._run_pass(trainer, pl_module, loader, self._fit_output, facts)
        self._handoff.leave(trainer, embedding)

    def _finish(
        self,
        trainer: pl.Trainer,
        network: nn.Module,
        output: Any,
        extra: Mapping[str, Any] | None = None,
    ) -> TaskEmbedding:
        """Reduce, record (``extra``: facts of this pass, e.g. the checkpoint), write on rank 0."""
        check_same_network(trainer, network)
        assert self._sums is not None
        warn_missing = self._at == "train_batch" and trainer.is_global_zero
        sums, total = self._sums.totals(self._strategy, warn_missing)
        facts = {"at": self._at, "head": self._head, "exclude": self._exclude, **self._settings()}
        embedding = fisher_embedding(
            trainer, network, sums, total, self._layers, self._meta, extra or {}, **facts
        )
        self.embedding = embedding
        if output is not None and trainer.is_global_zero:
            path = embedding.save(output, overwrite=self._overwrite)
            log.info("Task embedding written to %s", path)
        return embedding

    # ------------------------------------------------------------------ checkpointing
    def _settings(self) -> dict[str, Any]:
        # What a checkpoint's Fisher state must share with the run resuming from it.
        return {
            "estimator": self._estimator,
            "seed": self._seed,
            "mc_samples": self._mc_samples,
            "likelihood": self._likelihood,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        """The global state (summed over ranks). Under DDP, every rank must call it together."""
        state: dict[str, Any] = {
            **self._settings(),
            "at": self._at,
            "identity": dict(self._identity),
        }
        if self._at != "train_batch" or self._sums is None:
            return state
        state.update(self._sums.state(self._strategy))
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resume(state_dict, self._settings(), self._identity)
        if "sum_sq_grad" not in state_dict:
            return  # a "fit_end" callback's state: nothing accumulated to restore
        # setup() runs after checkpoint loading in some entry points and before it in others.
        if self._sums is not None:
            self._sums.restore(state_dict, self._rank)
        else:
            self._restored = state_dict
