"""``t2v diversity`` and :func:`corpus_diversity`: artifacts, resume, report, errors.

The tasks are embedded by Task2Vec with a tiny GPT-2 probe saved in a temporary folder; the
numbers reported are checked against :func:`diversity_coefficient` on the artifacts written.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from t2v_lightning import lm_diversity
from t2v_lightning.data import corpus as corpus_module
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.lm_diversity import SettingsMismatchError, corpus_diversity, task_file
from t2v_lightning.similarity.diversity import (
    bootstrap_interval,
    cross_diversity_coefficient,
    diversity_coefficient,
)
from tests.cli_runner import run_t2v
from tests.lm_corpus_helpers import documents, save_tiny_lm, write_corpus

pytest.importorskip("datasets")

SMALL = {"num_tasks": 4, "task_size": 6, "max_length": 12}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "gpt2")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl", documents(60, empty_every=11))


class CountingEmbedder:
    """Counts the tasks embedded (to see what a rerun skips)."""

    calls: ClassVar[list[int]] = []

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def embed(self, task: Any, task_name: str | None = None) -> TaskEmbedding:
        CountingEmbedder.calls.append(task.index)
        return self.inner.embed(task, task_name=task_name)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    CountingEmbedder.calls = []
    real = lm_diversity.default_embedder
    monkeypatch.setattr(
        lm_diversity,
        "default_embedder",
        lambda probe, settings, device: CountingEmbedder(real(probe, settings, device)),
    )
    return CountingEmbedder.calls


def options(lm_dir: Path, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {**SMALL, "head_epochs": 1, "cache_dir": str(tmp_path / "hf_cache"), **extra}


# ------------------------------------------------------------------------------ bootstrap
def test_bootstrap_resample_mean_matches_explicit_resampling() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(5, 5, generator=generator, dtype=torch.float64)
    matrix = (a + a.T).fill_diagonal_(0)
    low, high = bootstrap_interval(matrix, 0.9, num_resamples=4000, seed=3)
    # The same resamples drawn explicitly: tasks with replacement, pairs of different tasks.
    generator = torch.Generator().manual_seed(3)
    draws = torch.randint(0, 5, (4000, 5), generator=generator)
    means = []
    for row in draws.tolist():
        pairs = [matrix[i, j] for i, j in itertools.permutations(row, 2) if i != j]
        if pairs:
            means.append(float(torch.stack(pairs).mean()))
    expected = torch.quantile(
        torch.tensor(means, dtype=torch.float64), torch.tensor([0.05, 0.95], dtype=torch.float64)
    )
    assert (low, high) == pytest.approx(expected.tolist(), rel=1e-12)
    cross = torch.rand(3, 4, generator=generator, dtype=torch.float64)
    c_low, c_high = bootstrap_interval(cross, 0.95, 2000, seed=1, cross=True)
    assert c_low < float(cross.mean()) < c_high


# ------------------------------------------------------------------------------ Python API
def test_corpus_diversity_reports_the_artifacts_and_resumes(
    lm_dir: Path, corpus: Path, tmp_path: Path, counted: list[int]
) -> None:
    out = tmp_path / "tasks"
    result = corpus_diversity(f"lm:{lm_dir}", str(corpus), out, **options(lm_dir, tmp_path))
    assert sorted(counted) == [0, 1, 2, 3]
    files = sorted(out.glob("task_*.safetensors"))
    assert [f.name for f in files] == [f"task_{k:04d}.safetensors" for k in range(4)]
    embeddings = [TaskEmbedding.load(f) for f in files]
    expected = diversity_coefficient(embeddings, num_resamples=1000, bootstrap_seed=0)
    assert result.mean == pytest.approx(expected.mean, rel=1e-12)
    assert (result.ci_low, result.ci_high) == pytest.approx((expected.ci_low, expected.ci_high))
    assert result.bootstrap_low <= result.mean <= result.bootstrap_high
    assert result.num_tasks == 4 and result.num_pairs == 6
    assert 0.0 < result.mean < 1.0
    meta = embeddings[2].meta["diversity_task"]
    assert meta["index"] == 2 and meta["task_size"] == 6 and meta["probe"] == f"lm:{lm_dir}"
    # A rerun embeds nothing; a lost task and a damaged one are embedded again.
    bytes_before = files[0].read_bytes()
    counted.clear()
    again = corpus_diversity(f"lm:{lm_dir}", str(corpus), out, **options(lm_dir, tmp_path))
    assert counted == [] and again.mean == result.mean
    task_file(out, 1).unlink()
    task_file(out, 3).write_bytes(task_file(out, 3).read_bytes()[:100])
    corpus_diversity(f"lm:{lm_dir}", str(corpus), out, **options(lm_dir, tmp_path))
    assert sorted(counted) == [1, 3]
    assert files[0].read_bytes() == bytes_before
    assert TaskEmbedding.load(task_file(out, 1)).hessian.equal(embeddings[1].hessian)
    # More tasks reuse the first ones (a task does not depend on how many are asked for).
    counted.clear()
    corpus_diversity(f"lm:{lm_dir}", str(corpus), out, **options(lm_dir, tmp_path, num_tasks=5))
    assert counted == [4]
    # Other settings in the same folder: refused, naming the file and the difference.
    with pytest.raises(
        SettingsMismatchError,
        match=r"task_0000.safetensors was made with "
        r"other settings \(seed: 0 there, 1 here\)",
    ):
        corpus_diversity(f"lm:{lm_dir}", str(corpus), out, **options(lm_dir, tmp_path, seed=1))


def test_the_probe_is_hashed_once_per_run(
    lm_dir: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's fingerprint and each task's (embed_lm) come from one hash of the weights."""
    import t2v_lightning.lm as lm_module
    import t2v_lightning.probe as probe_module

    hashed: list[str] = []
    real = probe_module.probe_fingerprint

    def counting(model: torch.nn.Module, *args: Any, **kwargs: Any) -> str:
        hashed.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(probe_module, "probe_fingerprint", counting)
    monkeypatch.setattr(lm_module, "probe_fingerprint", counting)
    corpus_diversity(f"lm:{lm_dir}", str(corpus), tmp_path / "tasks", **options(lm_dir, tmp_path))
    assert len(hashed) == 1, hashed


def test_cross_diversity_and_bounds_from_python(lm_dir: Path, corpus: Path, tmp_path: Path) -> None:
    other = write_corpus(tmp_path / "other.csv", [d.upper() for d in documents(60, seed=5)])
    out = tmp_path / "tasks"
    cross = corpus_diversity(
        f"lm:{lm_dir}", str(corpus), out, against=str(other), **options(lm_dir, tmp_path)
    )
    mine = [TaskEmbedding.load(task_file(out, k)) for k in range(4)]
    folders = list((out / "against").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("other.csv-")
    theirs = [TaskEmbedding.load(task_file(folders[0], k)) for k in range(4)]
    assert cross.mean == pytest.approx(cross_diversity_coefficient(mine, theirs).mean)
    assert cross.num_pairs == 16
    lower = corpus_diversity(
        f"lm:{lm_dir}", str(corpus), out, bound="lower", **options(lm_dir, tmp_path)
    )
    tasks = [TaskEmbedding.load(task_file(out / "lower_bound", k)) for k in range(4)]
    assert lower.mean == pytest.approx(diversity_coefficient(tasks).mean)
    assert tasks[0].meta["diversity_task"]["corpus"] == {"synthetic": "lower_bound"}


# ------------------------------------------------------------------------------ command line
def cli_args(lm_dir: Path, corpus: Path, out: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "diversity",
        "--probe",
        f"lm:{lm_dir}",
        "--data",
        str(corpus),
        "--num_tasks",
        "4",
        "--task_size",
        "6",
        "--max_length",
        "12",
        "--head_epochs",
        "1",
        "--output",
        str(out),
        "--cache_dir",
        str(tmp_path / "hf_cache"),
        *extra,
    ]


def test_cli_writes_json_figure_and_progress(
    lm_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = write_corpus(tmp_path / "other.parquet", documents(40, seed=9))
    out, report = tmp_path / "tasks", tmp_path / "report.json"
    code, stdout, stderr = run_t2v(
        cli_args(
            lm_dir,
            corpus,
            out,
            tmp_path,
            "--against",
            str(other),
            "--bounds",
            "--json",
            str(report),
            "--seed",
            "0",
        ),
        capsys,
    )
    assert code == 0, stderr
    data = json.loads(report.read_text())
    assert set(data) == {
        "diversity",
        "cross_diversity",
        "lower_bound",
        "upper_bound",
        "settings",
        "corpus_stats",
    }
    keys = {"mean", "ci_low", "ci_high", "bootstrap_low", "bootstrap_high", "num_tasks"}
    assert set(data["diversity"]) == keys
    assert set(data["cross_diversity"]) == {str(other)}
    assert set(data["cross_diversity"][str(other)]) == keys
    assert set(data["lower_bound"]) == keys and set(data["upper_bound"]) == keys
    settings = data["settings"]
    assert (settings["num_tasks"], settings["task_size"], settings["max_length"]) == (4, 6, 12)
    assert settings["probe"] == f"lm:{lm_dir}" and settings["packing"] is False
    mine = [TaskEmbedding.load(task_file(out, k)) for k in range(4)]
    assert data["diversity"]["mean"] == pytest.approx(diversity_coefficient(mine).mean)
    assert data["diversity"]["num_tasks"] == 4
    stats = data["corpus_stats"]["diversity"]
    assert stats["sequences"] == 24 and stats["documents"] - stats["empty_documents"] == 24
    assert (out / "distance_matrix.png").stat().st_size > 1000
    # Not a terminal: one progress line per task, for each of the 4 groups of tasks.
    progress = [line for line in stderr.splitlines() if " tasks (task " in line]
    assert len(progress) == 16
    assert progress[0].startswith("corpus.jsonl: 1/4 tasks (task 0: ")
    assert "left)" in progress[0]
    assert "diversity coefficient: " in stdout and "bootstrap over tasks" in stdout
    assert "lower bound: " in stdout and f"cross-diversity with {other}" in stdout
    # A rerun resumes: every task skipped, same numbers.
    code, _, stderr = run_t2v(
        cli_args(
            lm_dir,
            corpus,
            out,
            tmp_path,
            "--against",
            str(other),
            "--bounds",
            "--json",
            str(report),
        ),
        capsys,
    )
    assert code == 0
    assert stderr.count("skipped (written before)") == 16
    assert json.loads(report.read_text())["diversity"] == data["diversity"]


def test_cli_bad_input_is_one_line_and_exit_2(
    lm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_corpus(tmp_path / "c.csv", documents(30), column="body")
    out = tmp_path / "tasks"
    code, _, stderr = run_t2v(cli_args(lm_dir, corpus, out, tmp_path), capsys)
    assert code == 2
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert errors == [
        f"t2v: error: --text_column 'text' is not a column of {corpus}; its columns: id, body"
    ]
    code, _, stderr = run_t2v(cli_args(lm_dir, tmp_path / "none.jsonl", out, tmp_path), capsys)
    assert code == 2 and "none.jsonl does not exist" in stderr
    code, _, stderr = run_t2v(cli_args(lm_dir, corpus, out, tmp_path, "--num_tasks", "0"), capsys)
    assert code == 2 and "--num_tasks must be a positive integer" in stderr
    code, _, stderr = run_t2v(
        cli_args(lm_dir, corpus, out, tmp_path, "--text_column", "body", "--num_tasks", "9"), capsys
    )
    assert code == 2 and "too small: 9 tasks x 6 sequences need 54, it has 30" in stderr
    code, _, stderr = run_t2v(["diversity", "--data", str(corpus), "--output", str(out)], capsys)
    assert code == 2 and "the following arguments are required: --probe" in stderr


def test_cli_stream_failing_part_way_keeps_tasks_and_resumes(
    lm_dir: Path,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    counted: list[int],
) -> None:
    out = tmp_path / "tasks"
    read = corpus_module.read_documents

    def failing(spec: Any, seed: int, dataset: Any = None) -> Any:
        for number, text in enumerate(read(spec, seed, dataset)):
            if number == 20:
                raise corpus_module.CorpusError(
                    f"reading --data {spec.data} failed after 20 documents: connection reset"
                )
            yield text

    with monkeypatch.context() as patch:
        patch.setattr(corpus_module, "read_documents", failing)
        code, _, stderr = run_t2v(cli_args(lm_dir, corpus, out, tmp_path), capsys)
    assert code == 2
    assert "failed after 20 documents: connection reset" in stderr
    written = sorted(p.name for p in out.glob("task_*.safetensors"))
    assert written == ["task_0000.safetensors", "task_0001.safetensors"]  # 20 docs, 2 empty
    counted.clear()
    code, _, stderr = run_t2v(cli_args(lm_dir, corpus, out, tmp_path), capsys)
    assert code == 0, stderr
    assert sorted(counted) == [2, 3]
    assert stderr.count("skipped (written before)") == 2


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    class Terminal:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress = lm_diversity.Progress("c4", 3, terminal)  # type: ignore[arg-type]
    progress.update(0, None)
    progress.update(1, 120.0)
    progress.update(2, 60.0)
    assert terminal.text.count("\n") == 1 and terminal.text.count("\r") == 3
    assert "2/3 tasks (task 1: 120.0 s; about 2 min left)" in terminal.text
    assert math.isfinite(progress.seconds)


def test_against_takes_a_hub_configuration_after_a_colon(tmp_path: Path) -> None:
    spec = lm_diversity.against_spec("Salesforce/wikitext:wikitext-103-raw-v1", split="test")
    assert (spec.data, spec.config, spec.split) == (
        "Salesforce/wikitext",
        "wikitext-103-raw-v1",
        "test",
    )
    odd = write_corpus(tmp_path / "a:b.jsonl", documents(3))
    assert lm_diversity.against_spec(str(odd)).data == str(odd)
    assert lm_diversity.against_spec("allenai/c4").config is None


def test_tasks_of_other_weights_at_the_same_path_are_not_reused(
    corpus: Path, tmp_path: Path
) -> None:
    lm_dir = save_tiny_lm(tmp_path / "lm", seed=1)
    out = tmp_path / "tasks"
    settings = options(lm_dir, tmp_path, num_tasks=2)
    corpus_diversity(f"lm:{lm_dir}", str(corpus), out, **settings)
    save_tiny_lm(lm_dir, seed=2)  # retrained in place
    with pytest.raises(
        SettingsMismatchError,
        match=r"task_0000.safetensors was made with "
        r"other settings \(probe_fingerprint: ",
    ):
        corpus_diversity(f"lm:{lm_dir}", str(corpus), out, **settings)


@pytest.mark.slow
def test_offline_example_runs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "lm_corpus_diversity.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--folder",
            str(tmp_path / "example"),
            "--num-tasks",
            "3",
            "--task-size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(script.parents[1]), os.environ.get("PYTHONPATH", "")]
            ),
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "random weights: these numbers show the pipeline" in done.stdout
    for name in (
        "varied diversity",
        "narrow diversity",
        "cross-diversity varied x narrow",
        "lower bound",
        "upper bound",
    ):
        assert name in done.stdout
    assert len(list((tmp_path / "example" / "tasks_varied").glob("task_*.safetensors"))) == 3
