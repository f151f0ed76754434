"""Fitting the probe's classifier head on cached penultimate features (a LightningModule)."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy

__all__ = ["HeadClassifier"]


class HeadClassifier(pl.LightningModule):
    r"""A linear classifier trained with cross-entropy on fixed features.

    The reference's defaults (SPEC section 2.4): Adam, lr 4e-4, weight decay 1e-4. With
    ``likelihood="bernoulli"`` (multi-label tasks) the labels are 0/1 vectors of
    ``num_classes`` outputs and the loss is the binary cross-entropy of each output's sigmoid,
    :math:`-\sum_k y_k \log \sigma(z_k) + (1 - y_k) \log \sigma(-z_k)`, averaged over
    outputs and examples; the accuracy is the fraction of correct outputs.

    Args:
        in_features: size of the feature vectors.
        num_classes: number of classes of the task.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        lr: learning rate.
        weight_decay: L2 penalty of the optimizer.
        init: an existing linear head to start from (its weights are copied, not shared).
        likelihood: ``"categorical"`` (integer labels, softmax cross-entropy) or
            ``"bernoulli"`` (float 0/1 label vectors, binary cross-entropy with logits).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 4e-4,
        weight_decay: float = 1e-4,
        init: nn.Linear | None = None,
        likelihood: Literal["categorical", "bernoulli"] = "categorical",
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"head_optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if likelihood not in ("categorical", "bernoulli"):
            raise ValueError(f"likelihood must be 'categorical' or 'bernoulli', got {likelihood!r}")
        self.head = nn.Linear(in_features, num_classes)
        if init is not None:
            self.head.load_state_dict(init.state_dict())
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.likelihood = likelihood
        self.train_accuracy: MulticlassAccuracy | MultilabelAccuracy
        if likelihood == "bernoulli":
            self.train_accuracy = MultilabelAccuracy(num_labels=num_classes, average="micro")
        else:
            self.train_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        features, labels = batch
        logits = self(features)
        if self.likelihood == "bernoulli":
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            self.train_accuracy(logits.detach(), labels.to(torch.int64))
        else:
            loss = F.cross_entropy(logits.float(), labels)
            self.train_accuracy(logits.detach(), labels)
        self.log("head/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("head/accuracy", self.train_accuracy, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay
            )
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
