"""FisherCallback as a Lightning user meets it: defaults, checks before training, the batch
pipeline, the model left untouched, and Lightning's own situations (SPEC section 9).

References: the brute-force exact Fisher of the trained model (``tests/reference.py``, float64,
one example and one class at a time; relative error 1e-5 per entry, float32 round-off), or
``Task2Vec`` with the arguments that reproduce the callback (same sampled labels: 1e-6).
"""

from __future__ import annotations

import copy
import csv
import importlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from t2v_lightning import FisherCallback, Task2Vec, TaskEmbedding
from t2v_lightning.choices import FisherError, UnsupportedLayerError
from tests.test_user_project import images, make_classifier, reference, relative_error

QUIET = {
    "accelerator": "cpu",
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "logger": False,
}


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def snapshot(module: nn.Module) -> dict[str, Any]:
    """Everything the callback must leave as it was: tensors (buffers too), flags, modes."""
    return {
        "state": {name: tensor.detach().clone() for name, tensor in module.state_dict().items()},
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "grads": [p.grad for p in module.parameters()],
        "training": [m.training for m in module.modules()],
    }


def assert_unchanged(module: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(module)
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name  # bit-identical
    assert after["requires_grad"] == before["requires_grad"]
    assert after["grads"] == before["grads"]
    assert after["training"] == before["training"]


class Counting(pl.LightningModule):
    """Counts its training steps, so a test can say that fit stopped before the first one."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.steps = 0

    def forward(self, x: torch.Tensor) -> Any:
        return self.inner(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def small_net(outputs: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, outputs),
    )


def loader(n: int = 30, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(*images(n)), batch_size=8, shuffle=shuffle)


# ------------------------------------------------------------------------------ 1. the default
def test_head_alone_embeds_the_trained_model_on_its_training_data(tmp_path: Path) -> None:
    """(x, y) batches, shuffled, labels in range: the default is the end-of-fit pass."""
    model = make_classifier(pl)
    x, _ = images()
    callback = FisherCallback(head="classifier")
    pl.Trainer(max_epochs=2, callbacks=[callback], **QUIET).fit(model, loader())
    embedding = TaskEmbedding.load(tmp_path / "task_embedding.safetensors")  # trainer.log_dir
    assert embedding.meta["num_samples"] == 30 and embedding.meta["fisher_at"] == "fit_end"
    # The exact arguments that give the callback's numbers with Task2Vec (README).
    t2v = Task2Vec(
        model,
        head="classifier",
        reset_head=False,
        head_epochs=0,
        balanced_sampling=False,
        max_samples=None,
        batch_size=8,
        progress_bar=False,
        accelerator="cpu",
    ).embed(TensorDataset(*images()))
    assert list(t2v.layers) == list(embedding.layers) == ["backbone.0", "backbone.1"]
    torch.testing.assert_close(embedding.hessian, t2v.hessian, rtol=1e-6, atol=0)
    exact = FisherCallback(head="classifier", estimator="exact").compute(
        pl.Trainer(**QUIET), model, DataLoader(TensorDataset(x), batch_size=7)
    )
    assert relative_error(exact, reference(model, x, "classifier")) <= 1e-5


def test_per_batch_mode_refuses_label_batches_before_the_first_step() -> None:
    model = Counting(small_net())
    callback = FisherCallback(at="train_batch", num_examples=30)
    with pytest.raises(ValueError, match=r"repeated ids within the batch .*at='fit_end'"):
        pl.Trainer(max_epochs=1, callbacks=[callback], **QUIET).fit(model, loader())
    assert model.steps == 0
    with pytest.raises(ValueError, match="at='train_batch' needs num_examples"):
        FisherCallback(at="train_batch")
    floats = DataLoader(TensorDataset(images(8)[0], torch.arange(8.0)), batch_size=4)
    with pytest.raises(ValueError, match=r"torch\.float32 tensor"):
        pl.Trainer(
            max_epochs=1, callbacks=[FisherCallback(at="train_batch", num_examples=8)], **QUIET
        ).fit(model, floats)
    assert model.steps == 0


# ------------------------------------------------------------------------------ 2. checks
class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_net()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


@pytest.mark.parametrize(
    ("inner", "kwargs", "error", "message"),
    [
        (DictOut(), {}, FisherError, r"needs logits of shape \(8, classes\).*first training batch"),
        (small_net(outputs=1), {}, FisherError, r"one-output model is zero.*bernoulli"),
        (
            nn.Sequential(small_net(), nn.PReLU()),
            {},
            UnsupportedLayerError,
            r"'inner.1' \(PReLU\).*FisherCallback\(exclude=\['inner.1'\]\)",
        ),
        (small_net(), {"head": "fc"}, ValueError, r"head='fc'"),
        (
            small_net(),
            {"exclude": ["inner.9"]},
            ValueError,
            r"exclude pattern 'inner.9' matches no",
        ),
    ],
)
def test_problems_stop_fit_before_the_first_step(
    inner: nn.Module, kwargs: dict[str, Any], error: type, message: str
) -> None:
    model = Counting(inner)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        pl.Trainer(max_epochs=1, callbacks=[FisherCallback(**kwargs)], **QUIET).fit(model, loader())
    assert model.steps == 0
    assert_unchanged(model, before)


def test_dict_of_training_loaders_is_refused_before_training() -> None:
    model = Counting(small_net())
    model.training_step = lambda batch, batch_idx: F.cross_entropy(  # type: ignore[method-assign]
        model(batch["a"][0]), batch["a"][1]
    )
    with pytest.raises(ValueError, match="single torch DataLoader"):
        pl.Trainer(max_epochs=1, callbacks=[FisherCallback()], **QUIET).fit(
            model, {"a": loader(), "b": loader()}
        )


def test_exclude_leaves_layers_out() -> None:
    model = make_classifier(pl)
    data = DataLoader(TensorDataset(*images(12)), batch_size=6)
    both = FisherCallback(estimator="exact", head="classifier").compute(
        pl.Trainer(**QUIET), model, data
    )
    one = FisherCallback(estimator="exact", head="classifier", exclude=["backbone.1"]).compute(
        pl.Trainer(**QUIET), model, data
    )
    glob = FisherCallback(estimator="exact", exclude="*.1").compute(
        pl.Trainer(**QUIET), model, data
    )
    assert list(one.layers) == ["backbone.0"] and one.meta["exclude"] == ["backbone.1"]
    torch.testing.assert_close(one.hessian, both.hessian[:4], rtol=1e-6, atol=0)
    assert list(glob.layers) == ["backbone.0", "classifier"]


# ------------------------------------------------------------------------------ 3. pipeline
class Uint8Images(pl.LightningDataModule):
    """Images stored as uint8, converted and normalised on the device (on_after_batch_transfer)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.pixels = torch.randint(0, 256, (20, 3, 6, 6), dtype=torch.uint8, generator=generator)
        self.labels = torch.arange(20) % 3
        self.transfers = 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.pixels, self.labels), batch_size=6, shuffle=True)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        self.transfers += 1
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return normalise(x), y


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255.0 - 0.5) / 0.25


def test_batches_go_through_the_datamodule_hooks(tmp_path: Path) -> None:
    data = Uint8Images()
    model = make_classifier(pl)
    callback = FisherCallback(estimator="exact", head="classifier")
    pl.Trainer(max_epochs=1, callbacks=[callback], **QUIET).fit(model, datamodule=data)
    assert data.transfers == 4 + 4  # 4 training batches, then 4 batches of the pass
    assert callback.embedding is not None and callback.embedding.meta["num_samples"] == 20
    expected = reference(model, normalise(data.pixels), "classifier")
    assert relative_error(callback.embedding, expected) <= 1e-5


# ------------------------------------------------------------------------------ 5. untouched
def test_the_pass_leaves_the_model_bit_identical_on_success_and_on_error() -> None:
    model = make_classifier(pl)
    model.train()
    model.backbone[1].eval()
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    before = snapshot(model)
    FisherCallback(head="classifier").compute(pl.Trainer(**QUIET), model, loader(12))
    assert_unchanged(model, before)
    broken = TensorDataset(torch.full((4, 3, 6, 6), float("nan")))
    with pytest.raises(FisherError, match="non-finite"):
        FisherCallback(head="classifier").compute(pl.Trainer(**QUIET), model, DataLoader(broken))
    assert_unchanged(model, before)


def test_task2vec_on_a_compiled_model() -> None:
    """The compiled wrapper is looked through: same embedding, the user's module untouched."""
    torch.manual_seed(0)
    plain = small_net()
    plain.train()
    compiled = torch.compile(copy.deepcopy(plain))
    before = snapshot(compiled)
    data = TensorDataset(images(12)[0], torch.arange(12) % 3)
    options = {
        "head": "5",
        "head_epochs": 1,
        "balanced_sampling": False,
        "max_samples": None,
        "batch_size": 6,
        "progress_bar": False,
        "accelerator": "cpu",
    }
    expected = Task2Vec(plain, **options).embed(data)
    embedding = Task2Vec(compiled, **options).embed(data)
    assert list(embedding.layers) == list(expected.layers) == ["0", "1"]
    torch.testing.assert_close(embedding.hessian, expected.hessian, rtol=1e-6, atol=0)
    assert_unchanged(compiled, before)


def test_callback_on_a_compiled_model(tmp_path: Path) -> None:
    model = make_classifier(pl)
    twin = copy.deepcopy(model)
    callback = FisherCallback(estimator="exact", head="classifier")
    pl.Trainer(max_epochs=1, callbacks=[callback], **QUIET).fit(
        torch.compile(model), loader(shuffle=False)
    )
    pl.Trainer(max_epochs=1, **QUIET).fit(twin, loader(shuffle=False))
    assert callback.embedding is not None
    assert list(callback.embedding.layers) == ["backbone.0", "backbone.1"]
    x, _ = images()
    assert relative_error(callback.embedding, reference(twin, x, "classifier")) <= 1e-4


# ------------------------------------------------------------------------------ 6. Lightning
def test_two_callbacks_coexist_and_checkpoint(tmp_path: Path) -> None:
    model = make_classifier(pl)
    first = FisherCallback(head="classifier", output=tmp_path / "a.safetensors")
    second = FisherCallback(
        head="classifier",
        exclude=["backbone.1"],
        estimator="exact",
        output=tmp_path / "b.safetensors",
    )
    assert first.state_key != second.state_key
    options = {**QUIET, "enable_checkpointing": True, "default_root_dir": tmp_path}
    pl.Trainer(max_epochs=1, callbacks=[first, second], **options).fit(model, loader())
    a, b = (
        TaskEmbedding.load(tmp_path / "a.safetensors"),
        TaskEmbedding.load(tmp_path / "b.safetensors"),
    )
    assert list(a.layers) == ["backbone.0", "backbone.1"] and list(b.layers) == ["backbone.0"]
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert {first.state_key, second.state_key} <= set(checkpoint["callbacks"])


def test_output_under_log_dir_logged_and_never_replaced_silently(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[FisherCallback(head="classifier")], **{**QUIET, "logger": logger}
    )
    trainer.fit(make_classifier(pl), loader())
    path = Path(logger.log_dir) / "task_embedding.safetensors"
    assert path.is_file()
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    logged = {key: value for row in rows for key, value in row.items() if value}
    assert float(logged["fisher/num_samples"]) == 30 and float(logged["fisher/values"]) == 8
    assert float(logged["fisher/seconds"]) > 0
    assert str(path) in (Path(logger.log_dir) / "hparams.yaml").read_text()

    output = tmp_path / "kept.safetensors"
    output.write_bytes(b"the user's file")
    model = Counting(small_net())
    with pytest.raises(FileExistsError, match=r"overwrite=True"):
        pl.Trainer(
            max_epochs=1,
            callbacks=[FisherCallback(head="5", network="inner", output=output)],
            **QUIET,
        ).fit(model, loader())
    assert model.steps == 0 and output.read_bytes() == b"the user's file"
    pl.Trainer(
        max_epochs=1,
        callbacks=[FisherCallback(head="5", network="inner", output=output, overwrite=True)],
        **QUIET,
    ).fit(model, loader())
    assert TaskEmbedding.load(output).meta["num_samples"] == 30


class LoggedLoss(Counting):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss, on_epoch=True, on_step=False)
        return loss


def test_best_checkpoint_is_embedded_and_the_last_weights_kept(tmp_path: Path) -> None:
    model = LoggedLoss(small_net())
    # mode="max" makes the first epoch the "best", so best and last weights differ.
    checkpoint = ModelCheckpoint(tmp_path, monitor="loss", mode="max", save_top_k=1)
    callback = FisherCallback(estimator="exact", head="5", network="inner", weights="best")
    options = {**QUIET, "enable_checkpointing": True}
    trainer = pl.Trainer(max_epochs=3, callbacks=[checkpoint, callback], **options)
    trainer.fit(model, loader())
    last = snapshot(model)
    best = LoggedLoss(small_net())
    best.load_state_dict(torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"])
    assert not all(torch.equal(best.state_dict()[k], v) for k, v in last["state"].items())
    assert callback.embedding is not None and callback.embedding.meta["weights"] == "best"
    x, _ = images()
    assert relative_error(callback.embedding, reference(best.inner, x, "5")) <= 1e-5
    assert_unchanged(model, last)


def test_fast_dev_run_skips_the_pass(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    callback = FisherCallback(head="classifier")
    with caplog.at_level("INFO"):
        pl.Trainer(fast_dev_run=True, callbacks=[callback], **QUIET).fit(
            make_classifier(pl), loader()
        )
    assert callback.embedding is None and not list(tmp_path.glob("*.safetensors"))
    assert "fast_dev_run is on, so the Fisher pass is skipped" in caplog.text


def test_resumed_run_with_nothing_left_still_embeds(tmp_path: Path) -> None:
    model = make_classifier(pl)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    options = {**QUIET, "enable_checkpointing": True}
    pl.Trainer(max_epochs=1, callbacks=[checkpoint], **options).fit(model, loader())
    resumed = make_classifier(pl)
    callback = FisherCallback(estimator="exact", head="classifier")
    pl.Trainer(max_epochs=1, callbacks=[callback], **QUIET).fit(
        resumed, loader(), ckpt_path=checkpoint.last_model_path
    )
    assert callback.embedding is not None and callback.embedding.meta["num_samples"] == 30
    x, _ = images()
    assert relative_error(callback.embedding, reference(model, x, "classifier")) <= 1e-5


def test_no_training_batches_warns_and_writes_nothing(tmp_path: Path) -> None:
    callback = FisherCallback(head="classifier")
    with pytest.warns(UserWarning, match="built no training data"):
        pl.Trainer(max_epochs=1, limit_train_batches=0, callbacks=[callback], **QUIET).fit(
            make_classifier(pl), loader()
        )
    assert callback.embedding is None and not list(tmp_path.glob("*.safetensors"))


def test_old_namespace_gets_the_same_behaviour(tmp_path: Path) -> None:
    package = importlib.import_module("pytorch_lightning")
    from t2v_lightning.fisher.pl_compat import FisherCallback as OldNamespaceCallback

    model = make_classifier(package)
    callback = OldNamespaceCallback(estimator="exact", head="classifier")
    package.Trainer(max_epochs=1, callbacks=[callback], **QUIET).fit(model, loader())
    embedding = TaskEmbedding.load(tmp_path / "task_embedding.safetensors")
    x, _ = images()
    assert relative_error(embedding, reference(model, x, "classifier")) <= 1e-5
