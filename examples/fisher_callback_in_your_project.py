"""The Task2Vec embedding of your own Lightning model, from inside your own Trainer.

Trains a small CNN on scikit-learn's bundled 8x8 digits (no download), with
``FisherCallback(at="fit_end")`` among the Trainer's callbacks: when ``fit`` ends, the callback
runs one extra pass over the training data (model in eval mode, every example once, whatever
the number of processes) and writes the task embedding of the trained model. Then the same
callback is asked (``compute``) for the embeddings of two sub-tasks, and their distance is
printed.

    python examples/fisher_callback_in_your_project.py
    python examples/fisher_callback_in_your_project.py --devices 2 --strategy ddp  # 2 CPU processes

What the callback needs from the module: ``module(inputs)`` returns logits of shape
(batch, classes), where ``inputs`` is the batch (a tensor) or its first element
(``(inputs, labels)``); otherwise pass ``logits_fn=lambda module, batch: ...``. Labels of the
batch are not used (the Fisher samples labels from the model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from t2v_lightning import FisherCallback, TaskEmbedding, task_distance


class DigitsClassifier(pl.LightningModule):
    """Your LightningModule: a backbone and a linear ``classifier`` head."""

    def __init__(self, num_classes: int = 10, lr: float = 1e-2) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(16, num_classes)
        self.lr = lr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images))  # logits: what the callback needs

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits(classes: list[int] | None = None) -> TensorDataset:
    """scikit-learn's 1,797 digits as (1 x 8 x 8 image in [0, 1], label)."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(classes))
        images, labels = images[keep], labels[keep]
    return TensorDataset(images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--output", default="digits.safetensors")
    args = parser.parse_args()

    pl.seed_everything(0)
    model = DigitsClassifier()
    fisher = FisherCallback(
        estimator="per_sample",  # labels sampled from the model, per-example gradients
        at="fit_end",  # one extra pass over the training data when fit ends
        head="classifier",  # left out of the embedding, as in Task2Vec
        output=args.output,  # rank 0 writes the artifact (safetensors + JSON)
        meta={"task_name": "digits"},
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=args.strategy, max_epochs=args.epochs,
        callbacks=[fisher], logger=False, enable_checkpointing=False,
    )
    train = DataLoader(digits(), batch_size=64, shuffle=True)
    trainer.fit(model, train)

    if trainer.is_global_zero:
        embedding = TaskEmbedding.load(args.output)
        print(f"\nwrote {Path(args.output).resolve()}: {len(embedding)} values over "
              f"{list(embedding.layers)}, {embedding.meta['num_samples']} examples, "
              f"{embedding.meta['world_size']} process(es)")

    # "When asked": the embedding of the same model on other data. Under DDP call it on every
    # rank, while the process group is up (not after a ddp_spawn fit, whose workers are gone).
    if args.strategy == "ddp_spawn":
        return
    on_demand = FisherCallback(estimator="per_sample", head="classifier")  # no file written
    low = on_demand.compute(trainer, model, DataLoader(digits([0, 1, 2, 3, 4]), batch_size=64))
    high = on_demand.compute(trainer, model, DataLoader(digits([5, 6, 7, 8, 9]), batch_size=64))
    everything = TaskEmbedding.load(args.output)
    if trainer.is_global_zero:
        print(f"cosine distance, digits 0-4 vs 5-9: {task_distance(low, high):.4f}; "
              f"0-4 vs all digits: {task_distance(low, everything):.4f}")

if __name__ == "__main__":
    main()
