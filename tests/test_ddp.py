"""Two CPU processes under Lightning's DDP give the one-process embedding.

Each distributed run is a fresh Python process started with a clean environment (no inherited
MASTER_PORT or rank variables, a free port, CPU only), running this file as a script: Lightning's
``ddp`` launcher re-runs the script for rank 1, ``ddp_spawn`` spawns both ranks. Rank 0 writes
the artifacts; the tests compare them with the same computation in one process.

Tolerance: relative error 1e-5 per entry. What differs between the runs is only the grouping of
examples into batches (so float32 summation order, ~1e-7) and the float64 sum over ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from t2v_lightning import FisherCallback, Task2Vec, TaskEmbedding

# Two-process runs take tens of seconds each: `make test-all` (-m "slow or not slow") runs them.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-5
NUM_EXAMPLES = 40  # per rank: 20, i.e. 5 batches of 4 (the user-project data has 41: padding)
TIMEOUT_S = 240
ESTIMATORS = ("per_sample", "exact")
# Each ddp_spawn pass starts two fresh interpreters: one estimator keeps the test short.
STRATEGY_ESTIMATORS = {"ddp": ESTIMATORS, "ddp_spawn": ("per_sample",)}


def build_task() -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
    from tests.conftest import TinyConvNet, ToyImages, randomise_batchnorm

    torch.manual_seed(0)
    return randomise_batchnorm(TinyConvNet()).eval(), ToyImages(n=NUM_EXAMPLES, size=8)


def task2vec_options(estimator: str) -> dict[str, Any]:
    return {
        "estimator": estimator,
        "max_samples": NUM_EXAMPLES,
        "batch_size": 4,
        "head_epochs": 2,
        "accelerator": "cpu",
        "progress_bar": False,
    }


class Classifier(pl.LightningModule):
    """A user's own small classifier (``BoringModel``-style, with batch norm)."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def build_user_project() -> tuple[Classifier, DataLoader]:
    """A user's classifier and its training loader (41 examples: DistributedSampler pads)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(41, 3, 6, 6, generator=generator)
    y = torch.arange(41) % 3
    torch.manual_seed(0)
    return Classifier(), DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


def user_trainer(devices: int, strategy: str, callbacks: list[Any]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def user_callback(output: Path | None = None) -> FisherCallback:
    return FisherCallback(estimator="exact", at="fit_end", head="classifier", output=output)


def user_logits(module: nn.Module, batch: Any) -> torch.Tensor:
    """A ``logits_fn`` at module level: ``ddp_spawn`` pickles the callback, lambdas included."""
    return module(batch[0])


def run_user_project(out: Path, strategy: str) -> None:
    """Train the user's classifier on 2 processes; rank 0 also keeps the model it ended with."""
    model, loader = build_user_project()
    callback = FisherCallback(
        estimator="exact",
        head="classifier",
        output=out / "user.safetensors",
        logits_fn=user_logits if strategy == "ddp_spawn" else None,
    )
    trainer = user_trainer(2, strategy, [callback])
    trainer.fit(model, loader)
    # (Under ddp_spawn, Lightning has copied rank 0's weights back into this process's model,
    # and this process's callback, which saw no hook, reads rank 0's result.)
    if trainer.is_global_zero:
        torch.save(model.state_dict(), out / "user_model.pt")
        if strategy == "ddp_spawn":
            assert callback.embedding is not None
            callback.embedding.save(out / "user_parent.safetensors")


# ----------------------------------------------------------------------------------------------
# The script that each distributed run executes
# ----------------------------------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _embed_all(out: Path, strategy: str) -> None:
    probe, data = build_task()
    for estimator in STRATEGY_ESTIMATORS[strategy]:
        options = task2vec_options(estimator)
        embedding = Task2Vec(probe, devices=2, strategy=strategy, **options).embed(data)
        # Under ddp every rank returns the embedding (each with the head it measured).
        (out / f"{estimator}.rank{_rank()}.json").write_text(json.dumps(embedding.meta))
        if _rank() == 0:
            embedding.save(out / f"{estimator}.safetensors")
    run_user_project(out, strategy)


def _fail(out: Path, checkpoint_dir: Path) -> None:
    accumulate = FisherCallback.accumulate
    calls = {"count": 0}

    def failing(self: FisherCallback, trainer: Any, *args: Any) -> None:
        calls["count"] += 1
        if trainer.global_rank == 1 and calls["count"] == 3:
            raise RuntimeError("injected failure on rank 1")
        accumulate(self, trainer, *args)

    FisherCallback.accumulate = failing  # type: ignore[method-assign]
    probe, data = build_task()
    options = task2vec_options("per_sample")
    t2v = Task2Vec(
        probe,
        devices=2,
        strategy="ddp",
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_every_n_steps=1,
        **options,
    )
    embedding = t2v.embed(data)
    if _rank() == 0:
        embedding.save(out / "per_sample.safetensors")


def _main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "fail":
        _fail(out, Path(sys.argv[3]))
    else:
        _embed_all(out, mode)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This process's environment without anything that ties a run to another process group."""
    drop = (
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "GROUP_RANK",
        "LOCAL_WORLD_SIZE",
        "PL_GLOBAL_SEED",
        "PL_TRAINER_",
        "SLURM_",
        "TORCHELASTIC_",
        "LT_",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env=clean_env(),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def relative_error(a: TaskEmbedding, b: TaskEmbedding) -> float:
    assert a.layers == b.layers
    return float(((a.hessian.double() - b.hessian.double()).abs() / b.hessian.double().abs()).max())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The one-process artifacts of Task2Vec, for each estimator."""
    folder = tmp_path_factory.mktemp("one_process")
    probe, data = build_task()
    paths = {}
    for estimator in ESTIMATORS:
        embedding = Task2Vec(probe, devices=1, **task2vec_options(estimator)).embed(data)
        paths[estimator] = embedding.save(folder / f"{estimator}.safetensors")
    return paths


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_processes_match_one(
    strategy: str, one_process: dict[str, Path], tmp_path: Path
) -> None:
    result = run_script(strategy, str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    for estimator in STRATEGY_ESTIMATORS[strategy]:
        reference = TaskEmbedding.load(one_process[estimator])
        distributed = TaskEmbedding.load(tmp_path / f"{estimator}.safetensors")
        assert distributed.meta["world_size"] == 2 and reference.meta["world_size"] == 1
        assert distributed.meta["num_samples"] == reference.meta["num_samples"] == NUM_EXAMPLES
        assert relative_error(distributed, reference) <= RTOL, estimator
        # The head was fitted alike on every rank, and matches the one-process head.
        assert distributed.meta["head_fingerprint"] == reference.meta["head_fingerprint"]
        ranks = sorted(tmp_path.glob(f"{estimator}.rank*.json"))
        if strategy == "ddp":
            assert len(ranks) == 2
        fingerprints = {json.loads(p.read_text())["head_fingerprint"] for p in ranks}
        assert fingerprints == {reference.meta["head_fingerprint"]}
    # The user's own Trainer with a DistributedSampler (41 examples: one padding duplicate,
    # and batch-norm statistics that each rank updates with its own batches): the embedding of
    # the model that rank 0 ended with, over every example once, computed here in one process.
    model, loader = build_user_project()
    model.load_state_dict(torch.load(tmp_path / "user_model.pt", weights_only=True))
    user_reference = user_callback().compute(user_trainer(1, "auto", []), model, loader)
    user = TaskEmbedding.load(tmp_path / "user.safetensors")
    assert user.meta["num_samples"] == user_reference.meta["num_samples"] == 41
    assert relative_error(user, user_reference) <= RTOL
    if strategy == "ddp_spawn":  # the parent process's callback holds rank 0's result
        parent = TaskEmbedding.load(tmp_path / "user_parent.safetensors")
        assert torch.equal(parent.hessian, user.hessian) and parent.meta == user.meta
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_failing_rank_fails_the_run_then_resume_in_one_process(
    one_process: dict[str, Path], tmp_path: Path
) -> None:
    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    out.mkdir()
    result = run_script("fail", str(out), str(checkpoints))
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert not (out / "per_sample.safetensors").exists()
    assert list(out.iterdir()) == []
    # The last complete checkpoint: 2 batches of 4 on each of the 2 ranks.
    checkpoint = checkpoints / "fisher-pass.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    (fisher_state,) = [v for k, v in state["callbacks"].items() if k.startswith("FisherCallback")]
    assert fisher_state["num_samples"] == int(fisher_state["seen"].sum()) == 16
    # Resume the two-process pass in one process: the same embedding as an uninterrupted run.
    probe, data = build_task()
    resumed = Task2Vec(
        probe,
        devices=1,
        checkpoint_dir=str(checkpoints),
        resume_from="last",
        **task2vec_options("per_sample"),
    ).embed(data)
    reference = TaskEmbedding.load(one_process["per_sample"])
    assert resumed.meta["num_samples"] == NUM_EXAMPLES
    assert relative_error(resumed, reference) <= RTOL
    assert not checkpoint.exists()  # removed once the pass completed


if __name__ == "__main__":
    _main()
