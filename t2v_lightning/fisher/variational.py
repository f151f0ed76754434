r"""The variational Fisher (the paper's method, SPEC 3.4): learn how much noise each filter tolerates.

Every convolution and linear layer after the skipped prefix (not the head) gets a per-filter
log-variance and a per-layer log prior variance (:mod:`t2v_lightning.fisher.weight_noise`: the
variances, the noisy forward through the local reparametrization trick, the KL term). Here they
are trained: :class:`VariationalFisherModule` minimises cross-entropy plus :math:`\beta` times the
KL with the probe's weights frozen and the head trained alongside, in one Lightning fit
(:func:`embed_variational`). The embedding is ``hessian = exp(-logvar)`` per filter and
``scale = exp(-loglambda2)`` of its layer.

Noise is drawn per global batch: every rank draws the noise of the whole global batch from a
generator seeded by ``(seed, epoch, step, layer)`` and keeps its own rows, so training on ``W``
processes with batch ``B`` each follows the same path as one process with batch ``W·B``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from t2v_lightning.choices import FisherError, check_non_negative, check_positive
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.fisher.layers.table import excluded_modules
from t2v_lightning.fisher.weight_noise import (
    INPUT_NOISE_FLOOR,
    VARIANCE_INIT_SCALE,
    FilterVariance,
    GlobalBatchNoise,
    NoiseRun,
    NoiseSampler,
    VariationalLayers,
    add_weight_noise,
    kl_divergence,
    output_variance,
    receptive_field_sums,
    standard_noise,
    variational_layers,
)
from t2v_lightning.prepare import PreparedTask, artifact_meta
from t2v_lightning.probe import ProbeError
from t2v_lightning.safety import is_int

__all__ = [
    "INPUT_NOISE_FLOOR",
    "VARIANCE_INIT_SCALE",
    "FilterVariance",
    "GlobalBatchNoise",
    "VariationalLayers",
    "VariationalFisherModule",
    "NoiseRun",
    "NoiseSampler",
    "VariationalSettings",
    "check_variational_probe",
    "embed_variational",
    "kl_divergence",
    "output_variance",
    "receptive_field_sums",
    "standard_noise",
    "add_weight_noise",
    "variational_layers",
]

log = logging.getLogger(__name__)


class _LabelledInputs(Dataset):
    """``(input, label)`` pairs from a dataset of ``(input, position)`` and a label tensor."""

    def __init__(self, data: Dataset, labels: torch.Tensor) -> None:
        self.data = data
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, index = self.data[position]
        return inputs, self.labels[int(index)]


class VariationalFisherModule(pl.LightningModule):
    r"""Trains the variances of :class:`VariationalLayers` (and the head) of a frozen network.

    Loss: mean cross-entropy of the noisy network on the task's labels plus ``beta`` × KL. Adam
    (betas 0.9, 0.999) with ``lr`` on every ``logvar`` and ``loglambda2`` and ``head_lr`` on the
    head; every other weight of the network is frozen and the network stays in eval mode (frozen
    batch-norm statistics, no dropout). Under DDP the variances are ordinary trainable
    parameters, so their gradients are averaged across ranks like any model's.

    Data: each rank reads ``rank, rank + W, …`` of a permutation seeded by ``seed + epoch``
    (:class:`~torch.utils.data.DistributedSampler`), ``batch_size`` examples per step.

    Args:
        network: the frozen network (inputs to logits); its head is made trainable.
        head: qualified name of the head in ``network``.
        data: a dataset of ``(input, position)``.
        labels: ``labels[position]`` is the class of the example at ``position``.
        batch_size: examples per step on each rank.
        num_workers: data-loading worker processes.
        lr: Adam learning rate of the log-variances and log prior variances.
        head_lr: Adam learning rate of the head.
        beta: weight of the KL term.
        seed: seed of the shuffling and of the noise.
        exclude: qualified names of modules left out of the embedding with their submodules.
    """

    def __init__(
        self,
        network: nn.Module,
        head: str,
        data: Dataset,
        labels: torch.Tensor,
        batch_size: int = 100,
        num_workers: int = 0,
        lr: float = 1e-2,
        head_lr: float = 5e-4,
        beta: float = 1e-7,
        seed: int = 0,
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.network = network
        self.variational = VariationalLayers(network, head, exclude)
        self._head_params = list(network.get_submodule(head).parameters())
        for param in self._head_params:
            param.requires_grad_(True)
        self._data = data
        self._labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        self._batch_size = batch_size
        self._num_workers = num_workers
        self._lr = lr
        self._head_lr = head_lr
        self._beta = beta
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of the noisy network (with noise from the global generator)."""
        with self.variational.noisy(self.network) as run:
            logits = self.network(inputs)
        run.check_all_called()
        return logits

    @override
    def on_train_epoch_start(self) -> None:
        self.network.eval()

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        inputs, labels = batch
        noise = GlobalBatchNoise(
            self._seed,
            self.current_epoch,
            batch_idx,
            self.global_rank,
            self.trainer.world_size,
            self._generators,
        )
        with self.variational.noisy(self.network, noise) as run:
            logits = self.network(inputs)
        run.check_all_called()
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise FisherError("the network must return logits of shape (batch, classes)")
        cross_entropy = F.cross_entropy(logits.float(), labels)
        kl = self.variational.kl()
        loss = cross_entropy + self._beta * kl
        if not torch.isfinite(loss):
            raise FisherError(
                f"the variational loss is not finite (cross-entropy {float(cross_entropy)}, KL "
                f"{float(kl)}) at epoch {self.current_epoch}, step {batch_idx}"
            )
        accuracy = (logits.detach().argmax(-1) == labels).float().mean()
        log_options: dict[str, Any] = {"on_step": False, "on_epoch": True, "sync_dist": True}
        self.log("variational/loss", loss.detach(), prog_bar=True, **log_options)
        self.log("variational/cross_entropy", cross_entropy.detach(), **log_options)
        self.log("variational/kl", kl.detach(), **log_options)
        self.log("variational/accuracy", accuracy, prog_bar=True, **log_options)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = [
            {"params": list(self.variational.parameters()), "lr": self._lr}
        ]
        if self._head_params:
            groups.append({"params": self._head_params, "lr": self._head_lr})
        return torch.optim.Adam(groups, lr=self._lr, betas=(0.9, 0.999))

    def train_dataloader(self) -> DataLoader:
        dataset = _LabelledInputs(self._data, self._labels)
        sampler: DistributedSampler[int] = DistributedSampler(
            dataset,
            num_replicas=self.trainer.world_size,
            rank=self.global_rank,
            shuffle=True,
            seed=self._seed,
            drop_last=False,
        )
        return DataLoader(
            dataset,
            batch_size=self._batch_size,
            sampler=sampler,
            num_workers=self._num_workers,
            persistent_workers=False,
        )


@dataclass(frozen=True)
class VariationalSettings:
    """The options of the variational method (SPEC 3.4).

    Args:
        epochs: epochs of variance training.
        lr: Adam learning rate of the per-filter log-variances and per-layer log prior
            variances.
        head_lr: Adam learning rate of the head while the variances train.
        beta: weight of the KL term.
    """

    epochs: int = 2
    lr: float = 1e-2
    head_lr: float = 5e-4
    beta: float = 1e-7

    def __post_init__(self) -> None:
        if not is_int(self.epochs) or self.epochs < 1:
            raise ValueError(f"variational_epochs must be a positive integer, got {self.epochs!r}")
        check_positive("variational_lr", self.lr)
        check_non_negative("variational_head_lr", self.head_lr)
        check_non_negative("variational_beta", self.beta)


def check_variational_probe(probe: nn.Module, head: str, skip_layers: int) -> None:
    """Fail on an unsupported layer before any data is read (the probe is only inspected).

    Raises:
        UnsupportedLayerError: a layer after the prefix has no variational form.
        ProbeError: no convolution or linear layer after the prefix besides the head.
    """
    skipped = [name for name, _ in probe.named_children()][:skip_layers]
    if not variational_layers(probe, head, exclude=skipped):
        raise ProbeError(
            "nothing to embed: no convolution or linear layer after the skipped prefix (besides "
            "the head)"
        )


def embed_variational(
    prepared: PreparedTask, trainer: pl.Trainer, settings: VariationalSettings
) -> TaskEmbedding:
    """The variational embedding of a prepared task (SPEC 3.4).

    Trains the variances of every conv / linear layer after the prefix for ``settings.epochs``
    epochs in ``trainer``.

    Args:
        prepared: the task (network with its head, inputs, labels, meta).
        trainer: a Trainer of ``settings.epochs`` epochs
            (:meth:`~t2v_lightning.trainers.TrainerSpec.build`).
        settings: the method's options.

    Returns:
        A :class:`TaskEmbedding` with ``hessian = exp(-logvar)`` per filter, ``scale =
        exp(-loglambda2)`` of its layer, ``layers`` the conv and linear layers only, and ``meta``
        the task's facts plus ``method="variational"`` and its settings.
    """
    task = prepared.settings
    module = VariationalFisherModule(
        prepared.network,
        task.head,
        prepared.inputs,
        prepared.labels,
        batch_size=task.batch_size,
        num_workers=task.num_workers,
        lr=settings.lr,
        head_lr=settings.head_lr,
        beta=settings.beta,
        seed=task.seed,
        exclude=excluded_modules(prepared.network, task.exclude),
    )
    trainer.fit(module)
    hessian, scale, offsets = module.variational.embedding_values()
    metrics = trainer.callback_metrics
    losses = {}
    for key in ("cross_entropy", "kl", "accuracy"):
        value = metrics.get(f"variational/{key}")
        losses[f"variational_{key}"] = None if value is None else float(value)
    meta = artifact_meta(
        prepared.meta,
        "variational",
        variational_epochs=settings.epochs,
        variational_lr=settings.lr,
        variational_head_lr=settings.head_lr,
        variational_beta=settings.beta,
        variance_init_scale=VARIANCE_INIT_SCALE,
        input_noise_floor=INPUT_NOISE_FLOOR,
        seed=task.seed,
        num_samples=len(prepared.labels),
        world_size=trainer.world_size,
        precision=str(trainer.precision),
        **losses,
    )
    return TaskEmbedding(hessian, scale, offsets, meta)
