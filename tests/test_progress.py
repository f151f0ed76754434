"""Progress that people read: bars on a terminal, one line per phase in logs (CI, SLURM, tee)."""

from __future__ import annotations

import io
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from t2v_lightning import Task2Vec
from t2v_lightning.trainers import PhaseProgressBar, PhaseProgressLog, phase_progress


def tiny_probe() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def ten_batches() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(100, 3, 8, 8, generator=generator), torch.arange(100) % 3)


def embed_with_progress() -> None:
    t2v = Task2Vec(
        tiny_probe(),
        max_samples=100,
        batch_size=10,
        head_epochs=3,
        balanced_sampling=False,
        accelerator="cpu",
        progress_bar=True,
    )
    t2v.embed(ten_batches())


def test_off_a_terminal_each_phase_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert not sys.stdout.isatty()
    assert isinstance(phase_progress("Fisher pass"), PhaseProgressLog)
    embed_with_progress()
    out = capsys.readouterr().out
    assert "\r" not in out  # no redrawn frames
    lines = [line for line in out.splitlines() if line.strip()]
    fitting = [line for line in lines if line.startswith("head fitting")]
    fisher = [line for line in lines if line.startswith("Fisher pass")]
    assert len(fitting) == 1 and len(fisher) == 1, out
    assert fitting[0].startswith("head fitting: 3 epochs of 10 batches in ")
    assert "head/loss" in fitting[0]
    assert fisher[0].startswith("Fisher pass: 10 batches in ") and fisher[0].endswith(" s")


def test_on_a_terminal_the_bars_stay(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert isinstance(phase_progress("Fisher pass"), PhaseProgressBar)
    embed_with_progress()
    out = capsys.readouterr().out
    assert "\r" in out  # the bar redraws in place
    assert "Fisher pass" in out and "10/10" in out and "head fitting 3/3" in out
    assert "Fisher pass: 10 batches in" not in out


class _Steps(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_long_phase_adds_a_line_every_interval() -> None:
    now = [0.0]

    def clock() -> float:  # every reading is 7 s later: 10 batches take about 77 s
        now[0] += 7.0
        return now[0]

    stream = io.StringIO()
    progress = PhaseProgressLog("Fisher pass", interval=30.0, stream=stream, clock=clock)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[progress],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    data = DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=1)
    trainer.fit(_Steps(), data)
    lines = stream.getvalue().splitlines()
    # the phase starts at the reading 7; after batch k the reading is 7 + 7k: a line once 30 s
    # have passed since the last one (batches 5 and 10), and the end line at the reading 84
    assert lines[:-1] == ["Fisher pass: 5/10 batches, 35 s", "Fisher pass: 10/10 batches, 70 s"]
    assert lines[-1].startswith("Fisher pass: 10 batches in 77.0 s")
    with pytest.raises(ValueError, match="interval"):
        PhaseProgressLog("x", interval=0)


def test_progress_lines_are_written_on_rank_zero_only() -> None:
    stream = io.StringIO()
    progress = PhaseProgressLog("Fisher pass", stream=stream)
    progress.disable()  # what Lightning does on the other ranks
    progress._write("a line")
    progress.enable()
    progress._write("another")
    assert stream.getvalue() == "another\n"
