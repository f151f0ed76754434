"""The Task2Vec embedding of your own Lightning model, from inside your own Trainer.

Trains a small CNN on scikit-learn's bundled 8x8 digits (no download) three ways, each with
``FisherCallback(head="classifier")`` among the Trainer's callbacks: when ``fit`` ends, the
callback runs one extra pass over the training data (model in eval mode, every example once,
whatever the number of processes) and writes the task embedding of the trained model to
``trainer.log_dir``.

1. ``(x, y)`` batches from a DataLoader: nothing but ``head=`` is needed.
2. Dict batches and a forward that returns a dict: ``logits_fn=`` is a module-level function
   (``ddp_spawn`` pickles the callback to start its processes; a lambda cannot be pickled).
3. A DataModule that keeps the images as uint8 and converts and normalises them on the device in
   ``on_after_batch_transfer``: the pass goes through the same hooks, so it embeds what the model
   saw.

Then the callback is asked (``compute``) for the embeddings of two sub-tasks, and their distance
is printed.

    python examples/fisher_callback_in_your_project.py
    python examples/fisher_callback_in_your_project.py --devices 2 --strategy ddp_spawn  # 2 CPU processes
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from t2v_lightning import FisherCallback, task_distance


class DigitsClassifier(pl.LightningModule):
    """Your LightningModule: a backbone and a linear ``classifier`` head."""

    def __init__(self, num_classes: int = 10, lr: float = 1e-2, dict_output: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(16, num_classes)
        self.lr = lr
        self.dict_output = dict_output

    def forward(self, images: torch.Tensor) -> Any:
        logits = self.classifier(self.backbone(images))
        return {"logits": logits} if self.dict_output else logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        out = self(images)
        loss = F.cross_entropy(out["logits"] if isinstance(out, dict) else out, labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digit_logits(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a dict batch: a module-level function, so that the callback can be pickled."""
    return module(batch["image"])["logits"]


def digits(classes: list[int] | None = None) -> TensorDataset:
    """scikit-learn's 1,797 digits as (1 x 8 x 8 image in [0, 1], label)."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(classes))
        images, labels = images[keep], labels[keep]
    return TensorDataset(images, labels)


class DictDigits(Dataset):
    """The digits as ``{"image": ..., "label": ...}`` items."""

    def __init__(self) -> None:
        self.data = digits()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.data[index]
        return {"image": image, "label": label}


class Uint8Digits(pl.LightningDataModule):
    """Digits stored as uint8 (0-16), converted and normalised on the device."""

    def train_dataloader(self) -> DataLoader:
        data = load_digits()
        pixels = torch.tensor(data.images, dtype=torch.uint8).unsqueeze(1)
        labels = torch.tensor(data.target, dtype=torch.int64)
        return DataLoader(TensorDataset(pixels, labels), batch_size=64, shuffle=True)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        pixels, labels = batch
        return (pixels.float() / 16.0 - 0.3) / 0.4, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--logs", default=None, help="log folder (default: a temporary one)")
    args = parser.parse_args()
    logs = args.logs or tempfile.mkdtemp(prefix="t2v-example-")

    def trainer(callback: FisherCallback, name: str) -> pl.Trainer:
        return pl.Trainer(
            accelerator="cpu",
            devices=args.devices,
            strategy=args.strategy,
            max_epochs=args.epochs,
            callbacks=[callback],
            logger=CSVLogger(logs, name=name),
            enable_checkpointing=False,
            enable_progress_bar=False,
        )

    pl.seed_everything(0)
    runs = {
        "xy": (
            DigitsClassifier(),
            {"train_dataloaders": DataLoader(digits(), 64, shuffle=True)},
            FisherCallback(head="classifier"),
        ),
        "dict": (
            DigitsClassifier(dict_output=True),
            {"train_dataloaders": DataLoader(DictDigits(), 64, shuffle=True)},
            FisherCallback(head="classifier", logits_fn=digit_logits),
        ),
        "datamodule": (
            DigitsClassifier(),
            {"datamodule": Uint8Digits()},
            FisherCallback(head="classifier"),
        ),
    }
    for name, (model, data, callback) in runs.items():
        fit = trainer(callback, name)
        fit.fit(model, **data)
        embedding = callback.embedding  # also in the parent process after ddp_spawn
        if fit.is_global_zero and embedding is not None:
            print(
                f"{name}: {len(embedding)} values over {list(embedding.layers)}, "
                f"{embedding.meta['num_samples']} examples, {embedding.meta['world_size']} "
                f"process(es), written under {fit.log_dir}"
            )

    # "When asked": the embedding of the same model on other data. Under DDP call it on every
    # rank, while the process group is up (not after a ddp_spawn fit, whose workers are gone).
    if args.strategy == "ddp_spawn":
        return
    model, _, fitted = runs["xy"]
    on_demand = FisherCallback(head="classifier")
    plain = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    low = on_demand.compute(plain, model, DataLoader(digits([0, 1, 2, 3, 4]), batch_size=64))
    high = on_demand.compute(plain, model, DataLoader(digits([5, 6, 7, 8, 9]), batch_size=64))
    assert fitted.embedding is not None
    print(
        f"cosine distance, digits 0-4 vs 5-9: {task_distance(low, high):.4f}; "
        f"0-4 vs all digits: {task_distance(low, fitted.embedding):.4f}"
    )


if __name__ == "__main__":
    main()
