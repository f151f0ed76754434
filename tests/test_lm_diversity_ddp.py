"""``t2v diversity`` under Lightning DDP: two CPU processes (gloo) share the tasks, and every
task's artifact is byte-identical to the one-process run's.

Each run is ``python -m t2v_lightning.cli diversity ...`` in a fresh process with a clean
environment (``tests.test_ddp.clean_env``); Lightning's ``ddp`` launcher starts rank 1 by
running the same command again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from t2v_lightning.embedding import TaskEmbedding
from tests.lm_corpus_helpers import documents, save_tiny_lm, write_corpus
from tests.test_ddp import REPO, TIMEOUT_S, clean_env

pytestmark = pytest.mark.slow

pytest.importorskip("datasets")

NUM_TASKS = 5  # odd: rank 0 embeds 3 tasks, rank 1 embeds 2


def run_diversity(
    lm_dir: Path, corpus: Path, out: Path, cache: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "t2v_lightning.cli",
        "diversity",
        "--probe",
        f"lm:{lm_dir}",
        "--data",
        str(corpus),
        "--num_tasks",
        str(NUM_TASKS),
        "--task_size",
        "4",
        "--max_length",
        "10",
        "--head_epochs",
        "1",
        "--output",
        str(out),
        "--bounds",
        "--json",
        str(out / "report.json"),
        "--cache_dir",
        str(cache),
        "--trainer.accelerator",
        "cpu",
        *extra,
    ]
    return subprocess.run(
        command, env=clean_env(), cwd=str(REPO), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def test_two_processes_write_the_one_process_artifacts(tmp_path: Path) -> None:
    lm_dir = save_tiny_lm(tmp_path / "lm")
    corpus = write_corpus(tmp_path / "corpus.jsonl", documents(40, empty_every=9))
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_diversity(lm_dir, corpus, one, tmp_path / "cache")
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_diversity(
        lm_dir,
        corpus,
        two,
        tmp_path / "cache",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    )
    assert double.returncode == 0, double.stderr[-3000:]
    groups = ["", "lower_bound/", "upper_bound/"]
    for group in groups:
        for k in range(NUM_TASKS):
            name = f"{group}task_{k:04d}.safetensors"
            assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert TaskEmbedding.load(one / "task_0000.safetensors").meta["world_size"] == 1
    report_one = json.loads((one / "report.json").read_text())
    report_two = json.loads((two / "report.json").read_text())
    assert report_two["settings"]["world_size"] == 2
    for key in ("diversity", "lower_bound", "upper_bound"):
        assert report_two[key] == report_one[key]
    # Rank 0 reports its share of the tasks (3 of 5), for each of the 3 groups.
    assert double.stderr.count("(rank 0 of 2):") == 9
    assert "(rank 1 of 2)" not in double.stderr
    assert double.stdout.count("diversity coefficient: ") == 1


def test_a_rank_failing_stops_every_rank_with_status_2(tmp_path: Path) -> None:
    lm_dir = save_tiny_lm(tmp_path / "lm")
    corpus = write_corpus(tmp_path / "corpus.jsonl", documents(40), column="body")
    done = run_diversity(
        lm_dir,
        corpus,
        tmp_path / "out",
        tmp_path / "cache",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("t2v: error:")]
    assert (
        errors
        == [f"t2v: error: --text_column 'text' is not a column of {corpus}; its columns: id, body"]
        * 2
    )
