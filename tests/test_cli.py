"""The ``t2v`` command line, driven as a user drives it (argv in, files and messages out).

Tasks are tiny: timm's ``test_efficientnet`` probe (0.36 M parameters), 32x32 images, a few
dozen examples; a toy three-task dataset is registered in memory for the multi-task runs.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

from t2v_lightning.cli import embedding_jobs, parse_task_ids
from t2v_lightning.data.registry import register_dataset
from t2v_lightning.data.task import ImageTensorDataset, ImageTransform, Task
from t2v_lightning.embedding import TaskEmbedding
from tests.cli_runner import run_t2v as run_cli

PROBE = ["--model.probe", "timm:test_efficientnet"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TOY = "toy_cli_tasks"


@register_dataset(TOY, max_tasks=3, replace=True, summary="three toy tasks (tests)")
def _toy_tasks(
    root: str,
    task_id: int | None,
    train: bool,
    input_size: int | None,
    download: bool,
    normalize: str,
) -> Task:
    """Task t: 2 + t classes of 16x16 images with class- and task-dependent means."""
    assert task_id is not None
    classes = 2 + task_id
    generator = torch.Generator().manual_seed(100 * task_id + int(train))
    labels = torch.arange(24) % classes
    means = torch.rand(classes, 3, 1, 1, generator=generator)
    images = (means[labels] + 0.1 * torch.rand(24, 3, 16, 16, generator=generator)).clamp(0, 1)
    data = ImageTensorDataset(images, labels, ImageTransform(input_size, normalize))  # type: ignore[arg-type]
    return Task(
        data,
        classes,
        f"Toy task {task_id}",
        {"dataset": TOY, "task_id": task_id, "class_names": [str(c) for c in range(classes)]},
    )


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # lightning_logs/ and embeddings/ land here
    return tmp_path


# ------------------------------------------------------------------------------ help and config
def test_embed_help_lists_the_typed_documented_options() -> None:
    # through the repository's cli.py shim, as in the README
    shim = Path(__file__).resolve().parents[1] / "cli.py"
    result = subprocess.run(
        [sys.executable, str(shim), "embed", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for expected in (
        "--model.skip_layers SKIP_LAYERS",
        "top-level children of the probe",  # from ProbeClassifier's Google docstring
        "(type: int, default: 0)",
        "--model.method {montecarlo,variational}",
        "--model.estimator {per_sample,batch,exact}",
        "--data.max_samples",
        "--output OUTPUT",
        "--ckpt_path",
        "--overwrite",
        "--tasks TASKS",
        "--shard_index",
        "data.num_classes --> model.num_classes",
        "--print_config",
    ):
        assert expected in text, expected


def test_print_config_shows_the_merged_configuration(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = workdir / "run.yaml"
    config.write_text("model:\n  skip_layers: 2\ndata:\n  name: digits\n  max_samples: 7\n")
    code, out, err = run_cli(
        ["embed", "--config", str(config), "--data.input_size", "32", "--print_config"], capsys
    )
    assert code == 0, err
    assert "skip_layers: 2" in out and "max_samples: 7" in out and "input_size: 32" in out
    assert "output: embeddings/{task}.safetensors" in out


def test_a_typo_in_a_config_key_fails_with_one_clear_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = workdir / "typo.yaml"
    config.write_text("model:\n  skip_layer: 3\n")
    code, _, err = run_cli(["embed", "--config", str(config)], capsys)
    assert code == 2
    assert "skip_layer" in err and "does not accept" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    # an abbreviation of a real option is a typo too, not a match
    code, _, err = run_cli(["embed", "--model.skip_layer", "3"], capsys)
    assert code == 2 and "--model.skip_layer" in err


def test_an_unknown_dataset_fails_with_the_known_names(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["embed", "--data.name", "mnsit", *PROBE], capsys)
    assert code == 2
    assert "unknown dataset 'mnsit'" in err and "digits" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ fit, then embed
def test_fit_then_embed_from_the_checkpoint_writes_the_fitted_heads_embedding(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = [
        "--data.name",
        "digits",
        "--data.input_size",
        "32",
        "--data.max_samples",
        "40",
        "--data.batch_size",
        "20",
    ]
    code, _, err = run_cli(
        [
            "fit",
            *PROBE,
            *data,
            *QUIET,
            "--model.head_lr",
            "0.05",
            "--trainer.max_epochs",
            "2",
            "--trainer.limit_val_batches",
            "1",
        ],
        capsys,
    )
    assert code == 0, err
    checkpoints = sorted(workdir.glob("lightning_logs/**/checkpoints/*.ckpt"))
    assert len(checkpoints) == 1
    checkpoint = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    # only the head is stored (the probe is rebuilt and checked by fingerprint)
    assert set(checkpoint["state_dict"]) == {"network.classifier.weight", "network.classifier.bias"}
    assert isinstance(checkpoint["probe_fingerprint"], str)

    output = workdir / "out" / "digits.safetensors"
    code, _, err = run_cli(
        [
            "embed",
            *data,
            *QUIET,
            "--model.skip_layers",
            "2",
            "--ckpt_path",
            str(checkpoints[0]),
            "--output",
            str(output),
        ],
        capsys,
    )
    assert code == 0, err
    embedding = TaskEmbedding.load(output)
    assert embedding.meta["reset_head"] is False and embedding.meta["head_epochs"] == 0
    assert embedding.meta["dataset"] == "digits" and embedding.meta["max_samples"] == 40
    assert embedding.meta["checkpoint"] == str(checkpoints[0])
    assert embedding.name == "Digits"

    # Reference: the same embedding through the Python API, with the head read from the file.
    from t2v_lightning.data.datamodule import TaskDataModule
    from t2v_lightning.probe_classifier import ProbeClassifier
    from t2v_lightning.task2vec import Task2Vec

    datamodule = TaskDataModule("digits", input_size=32, max_samples=40, batch_size=20)
    datamodule.setup("fit")
    model = ProbeClassifier("timm:test_efficientnet", num_classes=10)
    fresh_head = model.network.classifier.weight.clone()
    model.load_head(checkpoints[0])
    assert not torch.allclose(model.network.classifier.weight, fresh_head)  # fit moved it
    reference = Task2Vec(
        model.network,
        max_samples=None,
        balanced_sampling=False,
        skip_layers=2,
        batch_size=20,
        reset_head=False,
        head_epochs=0,
        progress_bar=False,
    ).embed(datamodule.train_dataset)
    assert embedding.layers == reference.layers
    torch.testing.assert_close(embedding.hessian, reference.hessian, rtol=1e-5, atol=0.0)

    # the artifact is never overwritten silently
    code, _, err = run_cli(
        ["embed", *data, *QUIET, "--ckpt_path", str(checkpoints[0]), "--output", str(output)],
        capsys,
    )
    assert code == 2 and "already exists" in err and "--overwrite" in err
    # a head fitted on one task (10 classes) does not describe another (5 classes)
    code, _, err = run_cli(
        [
            "embed",
            *QUIET,
            "--data.name",
            "digits_0_4",
            "--data.input_size",
            "32",
            "--ckpt_path",
            str(checkpoints[0]),
            "--output",
            str(workdir / "other.safetensors"),
        ],
        capsys,
    )
    assert code == 2 and "fitted on --data.name='digits'" in err and "'digits_0_4'" in err


# ------------------------------------------------------------------------------ many tasks
def test_embed_over_a_task_range_skips_what_exists_and_shards(
    workdir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    common = [
        "embed",
        *PROBE,
        *QUIET,
        "--data.name",
        TOY,
        "--data.input_size",
        "32",
        "--data.max_samples",
        "12",
        "--data.batch_size",
        "12",
        "--trainer.max_epochs",
        "1",
        "--model.skip_layers",
        "3",
        "--output",
        "sweep/task_{task_id}.safetensors",
    ]
    code, _, err = run_cli([*common, "--tasks", "0-2"], capsys)
    assert code == 0, err
    files = [workdir / "sweep" / f"task_{t}.safetensors" for t in range(3)]
    embeddings = [TaskEmbedding.load(f) for f in files]
    assert [e.meta["task_id"] for e in embeddings] == [0, 1, 2]
    assert [e.meta["num_classes"] for e in embeddings] == [2, 3, 4]
    assert not torch.equal(embeddings[0].hessian, embeddings[1].hessian)

    # a killed sweep resumes: only the missing artifact is computed again
    stamps = {f: f.stat().st_mtime_ns for f in files}
    files[1].unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        code, _, err = run_cli([*common, "--tasks", "0-2"], capsys)
    assert code == 0, err
    assert (
        "skipping toy_cli_tasks_000" in caplog.text and "skipping toy_cli_tasks_002" in caplog.text
    )
    assert "embedding 1 task(s) (2 already done)" in caplog.text
    assert files[1].exists()
    assert all(files[t].stat().st_mtime_ns == stamps[files[t]] for t in (0, 2))
    torch.testing.assert_close(
        TaskEmbedding.load(files[1]).hessian, embeddings[1].hessian, rtol=1e-6, atol=0.0
    )

    # shard 1 of 2 takes tasks 1, 3, ... of the list
    code, _, err = run_cli(
        [
            *common,
            "--tasks",
            "0-2",
            "--shard_index",
            "1",
            "--num_shards",
            "2",
            "--output",
            "shard/{task}.safetensors",
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(p.name for p in (workdir / "shard").iterdir()) == [
        "toy_cli_tasks_001.safetensors"
    ]

    # a checkpoint's head belongs to one task
    torch.save({"state_dict": {}}, workdir / "head.ckpt")
    code, _, err = run_cli([*common, "--tasks", "0-1", "--ckpt_path", "head.ckpt"], capsys)
    assert code == 2 and "one task" in err


def test_parse_task_ids_and_output_templates(tmp_path: Path) -> None:
    assert parse_task_ids("0-3,7, 2") == [0, 1, 2, 3, 7]
    assert parse_task_ids("all", count=3) == [0, 1, 2]
    for bad, message in (("3-1", "empty"), ("a", "not a task id"), ("0-5", "out of range")):
        with pytest.raises(ValueError, match=message):
            parse_task_ids(bad, count=4)
    jobs = embedding_jobs([TOY], "data", "0-2", None, str(tmp_path) + "/")
    assert [j.output.name for j in jobs] == [f"{TOY}_00{t}.safetensors" for t in range(3)]
    with pytest.raises(ValueError, match="the same file"):
        embedding_jobs([TOY], "data", "0-2", None, "one.safetensors")
    with pytest.raises(ValueError, match="several tasks"):
        embedding_jobs([TOY], "data", None, None, "x.safetensors")
    with pytest.raises(ValueError, match="single task"):
        embedding_jobs(["digits"], "data", "0-1", None, "{task_id}.safetensors")
    with pytest.raises(ValueError, match="shard_index"):
        embedding_jobs([TOY], "data", "0-2", None, "{task}", shard_index=2, num_shards=2)


# ------------------------------------------------------------------------------ distance
def test_distance_writes_the_matrix_the_figure_and_the_nearest_tasks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from t2v_lightning.similarity.distance import pdist

    generator = torch.Generator().manual_seed(0)
    base = torch.rand(12, generator=generator) + 0.1
    hessians = {
        "a": base,
        "b": base * (1 + 0.05 * torch.rand(12, generator=generator)),
        "c": torch.rand(12, generator=generator) + 0.1,
    }
    files = []
    for name, hessian in hessians.items():
        embedding = TaskEmbedding(
            hessian,
            torch.ones(12),
            {"fc": (0, 12)},
            {"task_name": f"task {name}", "probe_fingerprint": "fp"},
        )
        files.append(str(embedding.save(tmp_path / f"{name}.safetensors")))
    figure, table = tmp_path / "fig" / "m.png", tmp_path / "m.csv"
    code, out, err = run_cli(
        ["distance", *files, "--distance", "cosine", "--out", str(figure), "--csv", str(table)],
        capsys,
    )
    assert code == 0, err
    assert figure.stat().st_size > 1000
    rows = list(csv.reader(table.open()))
    assert rows[0] == ["task", "task a", "task b", "task c"]
    matrix = torch.tensor([[float(v) for v in row[1:]] for row in rows[1:]], dtype=torch.float64)
    expected = pdist([TaskEmbedding.load(f) for f in files], "cosine")
    torch.testing.assert_close(matrix, expected, rtol=1e-5, atol=1e-9)
    assert "task a  ->  task b" in out and "task b  ->  task a" in out

    code, _, err = run_cli(["distance", str(tmp_path / "missing.safetensors")], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
