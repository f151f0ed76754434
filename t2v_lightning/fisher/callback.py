r"""FisherCallback: accumulates the filter-wise diagonal Fisher of a network during ``fit``.

The callback owns the statistics; :mod:`t2v_lightning.fisher.estimators` does the math. Like a
torchmetrics ``MeanMetric``, the state is a sum and a count: per embedded layer, the sum over
examples of the squared per-example gradient rows (``sum_sq_grad``, float64), and the number of
examples (``num_samples``). At the end of training both are summed across ranks (never averaged)
and divided, so the result does not depend on the number of processes:

.. math::

    \text{hessian}[o] = \frac{\sum_\text{ranks} \sum_n \lVert g_n[o, :] \rVert^2}
                             {\sum_\text{ranks} N_\text{rank} \cdot \text{row size}}.

Hooks used: ``setup`` (find the layers), ``on_train_batch_end`` (one Fisher step on the batch,
after the LightningModule's own step), ``on_train_end`` (reduce across ranks, build the
:class:`~t2v_lightning.embedding.TaskEmbedding`, rank 0 writes it atomically), ``state_dict`` /
``load_state_dict`` (resume from a Lightning checkpoint).

Batches must be ``(inputs, ids)``: ``ids`` are int64 example ids in ``[0, num_examples)``; ids
outside that range are padding and ids already seen (before a resume) are skipped, so every
example counts exactly once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.fisher.estimators import (
    ESTIMATORS,
    Estimator,
    LayerFisherTaps,
    batch_filter_sums,
    embedded_layers,
    filter_values,
    num_filters,
)

__all__ = ["FisherCallback"]

log = logging.getLogger(__name__)


class FisherCallback(Callback):
    """Accumulate the filter-wise Fisher of ``pl_module`` (or one of its submodules) while fitting.

    Args:
        estimator: ``"per_sample"`` (labels sampled from the model, per-example gradients),
            ``"exact"`` (expectation over all classes) or ``"batch"`` (the reference's squared
            mini-batch gradient).
        mc_samples: labels drawn per example by ``per_sample``.
        seed: seed of the label sampling (labels depend on it and on each example's id only).
        num_examples: number of distinct example ids; ids at or beyond it are padding.
        head: qualified name (relative to the embedded network) of the classifier head, which
            is left out of the embedding.
        network: attribute path of the submodule of the LightningModule that maps inputs to
            logits (``None``: the LightningModule itself).
        output: where rank 0 writes the artifact at the end (``None``: keep it in memory only).
        overwrite: replace an existing file at ``output``.
        meta: extra JSON-serialisable facts recorded in the artifact.
        grad_scale: factor on the loss before backward (gradients are divided by it, in fp32,
            before squaring); ``None`` picks 1024 under fp16 precision and 1 otherwise.

    Example:
        >>> callback = FisherCallback(estimator="exact", num_examples=100, head="fc")
        >>> callback.state_key
        "FisherCallback{'estimator': 'exact', 'seed': 0, 'mc_samples': 1}"
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
        grad_scale: float | None = None,
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if num_examples is not None and (not isinstance(num_examples, int) or num_examples < 1):
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
        if grad_scale is not None and not grad_scale > 0:
            raise ValueError(f"grad_scale must be positive, got {grad_scale!r}")
        self._estimator: Estimator = estimator
        self._mc_samples = mc_samples
        self._seed = seed
        self._num_examples = num_examples
        self._head = head
        self._network_path = network
        self._output = output
        self._overwrite = overwrite
        self._meta = dict(meta or {})
        self._grad_scale = grad_scale
        self._layers: list[tuple[str, nn.Module]] = []
        self.sum_sq_grad: dict[str, torch.Tensor] = {}
        self.num_samples = 0
        self._seen: torch.Tensor | None = None
        self._restored: dict[str, Any] | None = None
        self.embedding: TaskEmbedding | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            estimator=self._estimator, seed=self._seed, mc_samples=self._mc_samples
        )

    # ------------------------------------------------------------------ setup
    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        if self._network_path is None:
            return pl_module
        try:
            return pl_module.get_submodule(self._network_path)
        except AttributeError as err:
            raise ValueError(
                f"FisherCallback(network={self._network_path!r}): the LightningModule has no such "
                "submodule"
            ) from err

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        network = self._network(pl_module)
        if self._head is not None:
            network.get_submodule(self._head)  # raises a clear AttributeError when missing
        self._layers = embedded_layers(network, self._head)
        if not self._layers:
            raise ValueError("FisherCallback: the network has no layer with weights to embed")
        self.sum_sq_grad = {
            name: torch.zeros(num_filters(module), dtype=torch.float64)
            for name, module in self._layers
        }
        self.num_samples = 0
        self._seen = (
            torch.zeros(self._num_examples, dtype=torch.bool)
            if self._num_examples is not None
            else None
        )
        self.embedding = None
        if self._restored is not None:
            self._apply_restored(self._restored)
            self._restored = None

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
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                "FisherCallback expects training batches of (inputs, ids); got "
                f"{type(batch).__name__}"
            )
        inputs, ids = batch
        ids = torch.as_tensor(ids).to("cpu", torch.int64)
        self.accumulate(trainer, pl_module, inputs, ids)

    def accumulate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: torch.Tensor, ids: torch.Tensor
    ) -> None:
        """One Fisher step on a batch of inputs with their example ids."""
        valid = ids >= 0
        if self._seen is not None:
            in_range = valid & (ids < self._seen.numel())
            valid = in_range.clone()
            valid[in_range] = ~self._seen[ids[in_range]]
        if not bool(valid.any()):
            return
        network = self._network(pl_module)
        was_training = network.training
        network.eval()  # frozen batch-norm statistics, no dropout (SPEC section 7)
        try:
            with torch.enable_grad(), LayerFisherTaps(
                network, self._layers, self._scale_for(trainer)
            ) as taps:
                sums, count = batch_filter_sums(
                    network,
                    taps,
                    inputs,
                    ids,
                    valid,
                    self._estimator,
                    self._seed,
                    self._mc_samples,
                    forward_context=trainer.precision_plugin.forward_context,
                )
        finally:
            network.train(was_training)
        for name, value in sums.items():
            self.sum_sq_grad[name] += value.detach().to("cpu", torch.float64)
        self.num_samples += count
        if self._seen is not None:
            self._seen[ids[valid]] = True

    # ------------------------------------------------------------------ end of the pass
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = [name for name, _ in self._layers]
        flat = torch.cat([self.sum_sq_grad[name] for name in names] + [
            torch.tensor([float(self.num_samples)], dtype=torch.float64)
        ])
        device = trainer.strategy.root_device
        reduced = trainer.strategy.reduce(flat.to(device), reduce_op="sum")
        reduced = torch.as_tensor(reduced).to("cpu", torch.float64)
        total = int(round(float(reduced[-1])))
        sums: dict[str, torch.Tensor] = {}
        position = 0
        for name in names:
            size = self.sum_sq_grad[name].numel()
            sums[name] = reduced[position : position + size]
            position += size
        hessian, offsets = filter_values(sums, total, self._layers)
        meta = dict(self._meta)
        meta.update(
            estimator=self._estimator,
            mc_samples=self._mc_samples if self._estimator == "per_sample" else None,
            seed=self._seed,
            world_size=trainer.world_size,
            precision=str(trainer.precision),
        )
        if self._estimator == "batch":
            meta["num_batches"] = total
        else:
            meta["num_samples"] = total
        self.embedding = TaskEmbedding(hessian, torch.ones_like(hessian), offsets, meta)
        if self._output is not None and trainer.is_global_zero:
            path = self.embedding.save(self._output, overwrite=self._overwrite)
            rank_zero_info(f"Task embedding written to {path}")

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "sum_sq_grad": {name: value.clone() for name, value in self.sum_sq_grad.items()},
            "num_samples": self.num_samples,
            "seen": None if self._seen is None else self._seen.clone(),
            "estimator": self._estimator,
            "seed": self._seed,
            "mc_samples": self._mc_samples,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("estimator", "seed", "mc_samples"):
            if state_dict.get(key) != getattr(self, f"_{key}"):
                raise ValueError(
                    f"cannot resume: the checkpoint's Fisher state has {key}={state_dict.get(key)!r}"
                    f" but this FisherCallback has {getattr(self, f'_{key}')!r}"
                )
        # setup() runs after checkpoint loading in some entry points and before it in others.
        if self.sum_sq_grad:
            self._apply_restored(state_dict)
        else:
            self._restored = state_dict

    def _apply_restored(self, state: dict[str, Any]) -> None:
        stored = state["sum_sq_grad"]
        if set(stored) != set(self.sum_sq_grad) or any(
            stored[name].shape != self.sum_sq_grad[name].shape for name in stored
        ):
            raise ValueError("cannot resume: the checkpoint's Fisher state is for other layers")
        self.sum_sq_grad = {name: value.to(torch.float64).clone() for name, value in stored.items()}
        self.num_samples = int(state["num_samples"])
        if state.get("seen") is not None:
            self._seen = state["seen"].clone()
