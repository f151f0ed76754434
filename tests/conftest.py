"""Shared fixtures: tiny networks and datasets built in memory; the missing-extras guard."""

from __future__ import annotations

import os
import re
from collections.abc import Generator
from typing import Any

import pytest
import torch
from torch import nn

from t2v_lightning.embedding import TaskEmbedding

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# ``pytest.importorskip``'s reason: "could not import 'transformers': No module named ...".
_MISSING_MODULE = re.compile(r"could not import '[^']+'")


def _fail_skip_for_missing_module(report: Any) -> None:
    """Turn a skip for a missing optional module into a failure when ``T2V_REQUIRE_EXTRAS=1``.

    ``make test`` installs every extra that has tests and sets the variable, so a test that
    would silently skip there (an extra left out of the install, a module renamed) fails and
    names the module. A plain ``pytest`` in a smaller environment still skips politely; skips
    for other reasons (no CUDA device, not root) are left alone.
    """
    if os.environ.get("T2V_REQUIRE_EXTRAS") != "1" or not report.skipped:
        return
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if _MISSING_MODULE.search(message):
        report.outcome = "failed"
        report.longrepr = (
            f"{message.removeprefix('Skipped: ')}\nT2V_REQUIRE_EXTRAS=1: every optional module "
            "with tests must be installed here (make test installs the extras of setup.cfg)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    outcome = yield
    _fail_skip_for_missing_module(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[Any]:
    outcome = yield
    _fail_skip_for_missing_module(outcome.get_result())


class TinyConvNet(nn.Module):
    """Conv + BatchNorm (in-place ReLU after BN, a residual add, a grouped conv) + linear head."""

    def __init__(self, num_classes: int = 3, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        y += x[:, :, ::2, ::2]
        y = self.relu(y)
        return self.fc(self.flatten(self.pool(y)))


def randomise_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial running statistics and affine weights."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return module


@pytest.fixture
def tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorm(TinyConvNet()).eval()


@pytest.fixture
def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)
    ).eval()


class ToyImages(torch.utils.data.Dataset):
    """Class-dependent random images: (3 × size × size float tensor, int label)."""

    def __init__(self, n: int = 60, classes: int = 3, size: int = 8, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % classes
        means = torch.randn(classes, 3, 1, 1, generator=generator)
        self.images = means[self.labels] + 0.5 * torch.randn(n, 3, size, size, generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@pytest.fixture
def toy_images() -> ToyImages:
    return ToyImages()


TOY_PROBE_META = {"probe": "toy", "probe_fingerprint": "fp"}
"""The probe facts of hand-made embeddings compared with one another."""


def toy_embedding(values: list[float], name: str) -> TaskEmbedding:
    """A one-layer embedding of ``values`` (scale 1) named ``name``, of the toy probe."""
    return TaskEmbedding(
        torch.tensor(values),
        torch.ones(len(values)),
        {"l": (0, len(values))},
        {**TOY_PROBE_META, "task_name": name},
    )
