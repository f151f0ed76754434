"""Fitting the probe's classifier head on cached penultimate features (a LightningModule)."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["HeadClassifier"]


class HeadClassifier(pl.LightningModule):
    """A linear classifier trained with cross-entropy on fixed features.

    The reference's defaults (SPEC section 2.4): Adam, lr 4e-4, weight decay 1e-4.

    Args:
        in_features: size of the feature vectors.
        num_classes: number of classes of the task.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        lr: learning rate.
        weight_decay: L2 penalty of the optimizer.
        init: an existing linear head to start from (its weights are copied, not shared).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 4e-4,
        weight_decay: float = 1e-4,
        init: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"head_optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.head = nn.Linear(in_features, num_classes)
        if init is not None:
            self.head.load_state_dict(init.state_dict())
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.train_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, labels = batch
        logits = self(features)
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
