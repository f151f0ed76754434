"""Mixed precision: the embedding stays within a small cosine distance of the float32 one.

Whatever the Trainer's precision, log-probabilities are computed in float32, gradients are
read in float32 (divided by the loss scale under fp16) and sums are kept in float64; only the
forward and backward through the network run in low precision.

Tolerance: the SPEC's ``cosine`` distance (each entry normalised by the pair's sum) at most
1e-3. Measured on CPU with bf16-mixed: 1.5e-5 (per_sample) and 2.7e-5 (exact), with up to 2 %
error on single entries.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from t2v_lightning import FisherCallback, Task2Vec
from tests.conftest import TinyConvNet, ToyImages, randomise_batchnorm

COSINE_TOL = 1e-3
# bf16 keeps 8 bits of mantissa: some entry must move by more than this, or the low-precision
# path was not taken at all.
BF16_MIN_CHANGE = 1e-4


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """SPEC section 4 ``cosine``: entries normalised by the pair's sum, then 1 - cos."""
    a, b = a.double(), b.double()
    na, nb = a / (a + b + 1e-8), b / (a + b + 1e-8)
    return float(1 - torch.nn.functional.cosine_similarity(na, nb, dim=0))


def options(estimator: str, **extra: Any) -> dict[str, Any]:
    return {
        "estimator": estimator,
        "max_samples": 40,
        "batch_size": 8,
        "head_epochs": 2,
        "progress_bar": False,
        **extra,
    }


@pytest.fixture(scope="module")
def task() -> tuple[torch.nn.Module, ToyImages]:
    torch.manual_seed(0)
    return randomise_batchnorm(TinyConvNet()).eval(), ToyImages(n=40, size=8)


@pytest.mark.parametrize("estimator", ["per_sample", "exact"])
def test_bf16_mixed_close_to_float32(
    estimator: str, task: tuple[torch.nn.Module, ToyImages]
) -> None:
    probe, data = task
    full = Task2Vec(probe, accelerator="cpu", **options(estimator)).embed(data)
    mixed = Task2Vec(probe, accelerator="cpu", precision="bf16-mixed", **options(estimator)).embed(
        data
    )
    assert mixed.meta["precision"] == "bf16-mixed"
    assert cosine_distance(mixed.hessian, full.hessian) <= COSINE_TOL
    assert float(((mixed.hessian - full.hessian).abs() / full.hessian).max()) > BF16_MIN_CHANGE


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = randomise_batchnorm(TinyConvNet())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_accumulators_stay_float64_under_bf16() -> None:
    torch.manual_seed(0)
    model = _Classifier()
    data = ToyImages(n=12, size=8)
    loader = DataLoader(TensorDataset(data.images, data.labels), batch_size=4)
    callback = FisherCallback(estimator="exact", head="net.fc")
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    embedding = callback.compute(trainer, model, loader)
    assert all(value.dtype == torch.float64 for value in callback.sum_sq_grad.values())
    assert embedding.meta["num_samples"] == 12
    assert torch.isfinite(embedding.hessian).all() and (embedding.hessian > 0).all()


def test_loss_scale_is_undone_before_squaring() -> None:
    """The fp16 loss scale (here forced on in float32) must not change the result."""
    torch.manual_seed(0)
    model = _Classifier()
    data = ToyImages(n=12, size=8)
    loader = DataLoader(TensorDataset(data.images, data.labels), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    plain = FisherCallback(estimator="exact", head="net.fc").compute(trainer, model, loader)
    scaled = FisherCallback(estimator="exact", head="net.fc", grad_scale=1024.0).compute(
        trainer, model, loader
    )
    torch.testing.assert_close(scaled.hessian, plain.hessian, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ["per_sample", "exact"])
def test_fp16_mixed_on_gpu_close_to_float32(
    estimator: str, task: tuple[torch.nn.Module, ToyImages]
) -> None:
    probe, data = task
    full = Task2Vec(probe, accelerator="gpu", **options(estimator)).embed(data)
    mixed = Task2Vec(probe, accelerator="gpu", precision="16-mixed", **options(estimator)).embed(
        data
    )
    assert mixed.meta["precision"] == "16-mixed"
    assert cosine_distance(mixed.hessian, full.hessian) <= COSINE_TOL
    assert float(((mixed.hessian - full.hessian).abs() / full.hessian).max()) > 0  # fp16 ran
