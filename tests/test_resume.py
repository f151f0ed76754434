"""Resuming a Fisher pass from its Lightning checkpoint gives the uninterrupted embedding.

The pass is stopped by an exception after some batches (what a killed job leaves behind is the
last checkpoint, written under a temporary name and renamed), then a new Task2Vec resumes from
the checkpoint. Every example counts once either way (the checkpoint records which ids are in
its sums), so the result equals the uninterrupted run up to float32 summation order (measured:
identical). Tolerance: relative error 1e-5 per entry. Resuming a two-process checkpoint in one
process is in ``test_ddp.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from t2v_lightning import FisherCallback, Task2Vec, TaskEmbedding
from tests.conftest import TinyConvNet, ToyImages, randomise_batchnorm

RTOL = 1e-5
NUM_EXAMPLES = 40
BATCH = 6  # 7 batches, the last one short
STATE_KEY = "FisherCallback{'estimator': '%s', 'seed': 0, 'mc_samples': 1}"


class Interrupted(RuntimeError):
    """Stands for the job being killed."""


def options(estimator: str = "per_sample", **extra: Any) -> dict[str, Any]:
    return {
        "estimator": estimator,
        "max_samples": NUM_EXAMPLES,
        "batch_size": BATCH,
        "head_epochs": 1,
        "accelerator": "cpu",
        "progress_bar": False,
        **extra,
    }


@pytest.fixture(scope="module")
def task() -> tuple[torch.nn.Module, ToyImages]:
    torch.manual_seed(0)
    return randomise_batchnorm(TinyConvNet()).eval(), ToyImages(n=NUM_EXAMPLES, size=8)


@pytest.fixture(scope="module")
def uninterrupted(task: tuple[torch.nn.Module, ToyImages]) -> dict[str, TaskEmbedding]:
    probe, data = task
    return {e: Task2Vec(probe, **options(e)).embed(data) for e in ("per_sample", "exact")}


def relative_error(a: TaskEmbedding, b: TaskEmbedding) -> float:
    assert a.layers == b.layers
    return float(((a.hessian.double() - b.hessian.double()).abs() / b.hessian.double()).max())


def interrupted_run(
    monkeypatch: pytest.MonkeyPatch,
    probe: torch.nn.Module,
    data: Any,
    folder: Path,
    stop_at_batch: int,
    estimator: str = "per_sample",
) -> None:
    """Run a Fisher pass that dies while processing batch ``stop_at_batch`` (0-based)."""
    accumulate = FisherCallback.accumulate
    calls = {"count": 0}

    def dying(self: FisherCallback, *args: Any) -> None:
        if calls["count"] == stop_at_batch:
            raise Interrupted("killed")
        calls["count"] += 1
        accumulate(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(FisherCallback, "accumulate", dying)
        t2v = Task2Vec(
            probe, checkpoint_dir=str(folder), checkpoint_every_n_steps=2, **options(estimator)
        )
        with pytest.raises(Interrupted):
            t2v.embed(data)


@pytest.mark.parametrize("estimator", ["per_sample", "exact"])
def test_killed_pass_resumes_to_the_uninterrupted_embedding(
    estimator: str,
    task: tuple[torch.nn.Module, ToyImages],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    uninterrupted: dict[str, TaskEmbedding],
) -> None:
    probe, data = task
    reference = uninterrupted[estimator]
    interrupted_run(monkeypatch, probe, data, tmp_path, stop_at_batch=5, estimator=estimator)
    checkpoint = tmp_path / "fisher-pass.ckpt"
    assert checkpoint.is_file() and not list(tmp_path.glob(".*.tmp"))
    resumed = Task2Vec(
        probe,
        checkpoint_dir=str(tmp_path),
        checkpoint_every_n_steps=2,
        resume_from="last",
        **options(estimator),
    ).embed(data)
    assert resumed.meta["num_samples"] == reference.meta["num_samples"] == NUM_EXAMPLES
    assert relative_error(resumed, reference) <= RTOL
    assert not checkpoint.exists()  # the completed pass removes its checkpoint


def test_checkpoint_is_a_lightning_checkpoint_with_the_callback_state(
    task: tuple[torch.nn.Module, ToyImages], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe, data = task
    interrupted_run(monkeypatch, probe, data, tmp_path, stop_at_batch=5)
    checkpoint = torch.load(tmp_path / "fisher-pass.ckpt", map_location="cpu", weights_only=True)
    assert "pytorch-lightning_version" in checkpoint and "loops" in checkpoint
    assert any(name.startswith("network.") for name in checkpoint["state_dict"])
    state = checkpoint["callbacks"][STATE_KEY % "per_sample"]
    # Checkpoints every 2 batches; the pass died in batch 5: batches 0-3 are in it.
    assert state["num_samples"] == int(state["seen"].sum()) == 4 * BATCH
    assert bool(state["seen"][: 4 * BATCH].all())
    assert all(value.dtype == torch.float64 for value in state["sum_sq_grad"].values())
    assert state["identity"]["dataset_size"] == NUM_EXAMPLES


def test_resume_refuses_a_checkpoint_of_another_run(
    task: tuple[torch.nn.Module, ToyImages], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe, data = task
    interrupted_run(monkeypatch, probe, data, tmp_path, stop_at_batch=3)
    resume = {"checkpoint_dir": str(tmp_path), "resume_from": "last"}
    with pytest.raises(ValueError, match=r"cannot resume.*seed"):
        Task2Vec(probe, **options(seed=1), **resume).embed(data)
    with pytest.raises(ValueError, match=r"cannot resume.*FisherCallback"):
        Task2Vec(probe, **options("exact"), **resume).embed(data)
    other = ToyImages(n=NUM_EXAMPLES, size=8, seed=1)
    other.labels = other.labels.roll(1)
    with pytest.raises(ValueError, match=r"cannot resume.*labels_fingerprint"):
        Task2Vec(probe, **options(), **resume).embed(other)
    with pytest.raises(FileNotFoundError):
        Task2Vec(probe, resume_from=str(tmp_path / "nothing.ckpt"), **options()).embed(data)


def test_a_left_checkpoint_is_never_written_over_without_resuming(
    task: tuple[torch.nn.Module, ToyImages], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe, data = task
    interrupted_run(monkeypatch, probe, data, tmp_path, stop_at_batch=3)
    (left,) = tmp_path.glob("*.ckpt")
    before = left.read_bytes()
    with pytest.raises(FileExistsError, match=r"checkpoint_dir: .*resume_from='last'"):
        Task2Vec(probe, checkpoint_dir=str(tmp_path), **options()).embed(data)
    assert left.read_bytes() == before


def test_resume_last_without_a_checkpoint_starts_afresh(
    task: tuple[torch.nn.Module, ToyImages],
    tmp_path: Path,
    uninterrupted: dict[str, TaskEmbedding],
) -> None:
    probe, data = task
    reference = uninterrupted["per_sample"]
    fresh = Task2Vec(probe, checkpoint_dir=str(tmp_path), resume_from="last", **options()).embed(
        data
    )
    assert relative_error(fresh, reference) == 0.0


class _IdsClassifier(pl.LightningModule):
    """A user's module trained on ``(inputs, ids)`` batches (the callback's "train_batch" mode)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = randomise_batchnorm(TinyConvNet())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, _ = batch
        return self.net(inputs).sum() * 0.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path: Path, max_epochs: int, ckpt_path: str | None = None) -> FisherCallback:
    data = ToyImages(n=24, size=8)
    loader = DataLoader(TensorDataset(data.images, torch.arange(24)), batch_size=8, shuffle=True)
    callback = FisherCallback(
        at="train_batch", estimator="exact", num_examples=24, head="fc", network="net"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(_IdsClassifier(), loader, ckpt_path=ckpt_path)
    return callback


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
def test_lightning_ckpt_path_restores_the_callback_state(tmp_path: Path) -> None:
    """Lightning's own resume hands the checkpointed state back to ``load_state_dict``.

    The first fit ends with an epoch checkpoint; the second continues it for one more epoch, in
    which every id was already counted: the sums must be exactly the restored ones.
    """
    first = _fit(tmp_path, max_epochs=1)
    assert first.embedding is not None and first.embedding.meta["num_samples"] == 24
    resumed = _fit(tmp_path, max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.embedding is not None and resumed.embedding.meta["num_samples"] == 24
    assert relative_error(resumed.embedding, first.embedding) == 0.0
