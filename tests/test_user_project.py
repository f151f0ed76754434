"""FisherCallback inside a user's own Lightning project (``lightning`` and ``pytorch_lightning``).

The user's Trainer fits the user's LightningModule; ``FisherCallback(at="fit_end")`` then embeds
the fitted model on the training data and writes the artifact. The reference is the brute-force
exact Fisher of the same model (one example and one class at a time, float64 accumulation, from
``test_estimators``), so the tolerance is float32 round-off: relative error 1e-5 per entry.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from t2v_lightning import TaskEmbedding
from t2v_lightning.fisher.estimators import FisherError, embedded_layers
from tests.reference import as_vector, brute_force_fisher

RTOL = 1e-5
NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainers without a logger write their default artifact in the working folder."""
    monkeypatch.chdir(tmp_path)


def namespace(name: str) -> tuple[ModuleType, type]:
    """The Lightning package and the FisherCallback class that goes with it."""
    package = importlib.import_module(name)
    if name == "pytorch_lightning":
        from t2v_lightning.fisher.pl_compat import FisherCallback
    else:
        from t2v_lightning import FisherCallback
    return package, FisherCallback


def make_classifier(package: ModuleType, returns: str = "logits") -> Any:
    """A user's classifier: conv + batch norm backbone, a linear ``classifier`` head."""

    class Classifier(package.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.classifier = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> Any:
            logits = self.classifier(self.backbone(x))
            return {"logits": logits} if returns == "dict" else logits

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if isinstance(batch, dict):
                x, y = batch["image"], batch["label"]
            else:
                x, y = batch
            out = self(x)
            logits = out["logits"] if isinstance(out, dict) else out
            return F.cross_entropy(logits, y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    return Classifier()


def images(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 6, 6, generator=generator), torch.arange(n) % 3


def trainer_for(package: ModuleType, callbacks: list[Any], **extra: Any) -> Any:
    options = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **extra,
    }
    return package.Trainer(callbacks=callbacks, **options)


def reference(model: nn.Module, inputs: torch.Tensor, head: str | None) -> torch.Tensor:
    model.eval()
    values = brute_force_fisher(model, inputs, head)
    return as_vector(values, embedded_layers(model, head))


def relative_error(embedding: TaskEmbedding, expected: torch.Tensor) -> float:
    return float(((embedding.hessian.double() - expected).abs() / expected).max())


@pytest.mark.parametrize("name", NAMESPACES)
def test_fit_end_embeds_the_fitted_model(name: str, tmp_path: Path) -> None:
    package, FisherCallback = namespace(name)
    model = make_classifier(package)
    x, y = images()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    output = tmp_path / "task.safetensors"
    callback = FisherCallback(estimator="exact", at="fit_end", head="classifier", output=output)
    assert isinstance(callback, package.Callback)
    trainer_for(package, [callback]).fit(model, loader)
    embedding = TaskEmbedding.load(output)
    assert list(embedding.layers) == ["backbone.0", "backbone.1"]  # the head is left out
    assert embedding.meta["num_samples"] == 30 and embedding.meta["fisher_at"] == "fit_end"
    assert embedding.meta["probe_class"] == "Classifier"
    assert relative_error(embedding, reference(model, x, "classifier")) <= RTOL


@pytest.mark.parametrize("name", NAMESPACES)
def test_boring_model(name: str, tmp_path: Path) -> None:
    """Lightning's own BoringModel: tensor batches, forward returns (batch, 2) outputs."""
    package, FisherCallback = namespace(name)
    boring = importlib.import_module(f"{name}.demos.boring_classes")
    torch.manual_seed(0)
    model = boring.BoringModel()
    output = tmp_path / "boring.safetensors"
    callback = FisherCallback(estimator="exact", at="fit_end", output=output)
    trainer = trainer_for(package, [callback], limit_train_batches=4)
    trainer.fit(model)
    embedding = TaskEmbedding.load(output)
    inputs = trainer.train_dataloader.dataset.data  # (BoringModel draws new data on each call)
    assert embedding.meta["num_samples"] == 64  # the whole dataset, not the 4 training batches
    assert relative_error(embedding, reference(model, inputs, None)) <= RTOL


def test_compute_when_asked_keeps_module_modes() -> None:
    package, FisherCallback = namespace("lightning.pytorch")
    model = make_classifier(package)
    model.train()
    model.backbone[1].eval()  # the user keeps this batch norm frozen
    x, y = images(12)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    callback = FisherCallback(estimator="exact", head="classifier")
    embedding = callback.compute(trainer_for(package, []), model, loader)
    assert model.training and model.classifier.training and not model.backbone[1].training
    assert callback.embedding is embedding and embedding.meta["num_samples"] == 12
    assert relative_error(embedding, reference(model, x, "classifier")) <= RTOL


class DictImages(Dataset):
    def __init__(self) -> None:
        self.x, self.y = images(12)

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.x[index], "label": self.y[index]}


def test_module_without_logits_needs_logits_fn() -> None:
    package, FisherCallback = namespace("lightning.pytorch")
    model = make_classifier(package, returns="dict")
    loader = DataLoader(DictImages(), batch_size=4)
    callback = FisherCallback(estimator="exact", at="fit_end", head="classifier")
    with pytest.raises(FisherError, match=r"cannot find the inputs.*logits_fn"):
        trainer_for(package, [callback]).fit(model, loader)
    tensors = DataLoader(TensorDataset(*images(12)), batch_size=4)
    with pytest.raises(FisherError, match=r"needs logits of shape \(4, classes\).*logits_fn"):
        callback.compute(trainer_for(package, []), model, tensors)


def test_logits_fn() -> None:
    package, FisherCallback = namespace("lightning.pytorch")
    model = make_classifier(package, returns="dict")
    callback = FisherCallback(
        estimator="exact",
        at="fit_end",
        head="classifier",
        logits_fn=lambda module, batch: module(batch["image"])["logits"],
    )
    trainer_for(package, [callback]).fit(model, DataLoader(DictImages(), batch_size=4))
    assert callback.embedding is not None
    x, _ = images(12)
    model.eval()
    plain = make_classifier(package)
    plain.load_state_dict(model.state_dict())
    assert relative_error(callback.embedding, reference(plain, x, "classifier")) <= RTOL


def test_bad_arguments_are_named() -> None:
    _, FisherCallback = namespace("lightning.pytorch")
    with pytest.raises(ValueError, match="at must be one of"):
        FisherCallback(at="epoch_end")
    with pytest.raises(ValueError, match="batch_size"):
        FisherCallback(at="fit_end", batch_size=0)
    with pytest.raises(TypeError, match="logits_fn"):
        FisherCallback(logits_fn="logits")
    package, _ = namespace("lightning.pytorch")
    model = make_classifier(package)
    loader = DataLoader(TensorDataset(*images(6)), batch_size=3)
    with pytest.raises(ValueError, match="head='fc'"):
        FisherCallback(head="fc").compute(trainer_for(package, []), model, loader)
