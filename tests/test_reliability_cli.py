"""User mistakes on the command line: one clear line on stderr, exit status 2, no traceback.

Bugs keep their traceback. Driven in this process through ``t2v_lightning.cli.main`` (what the
``t2v`` console script calls), as ``tests/test_cli.py`` does; the probe is timm's tiny
``test_efficientnet``. Unknown options and config keys are covered by
``test_cli.py::test_a_typo_in_a_config_key_fails_with_one_clear_line``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("timm")

from lightning.pytorch.utilities.exceptions import SIGTERMException

from t2v_lightning.cli import EmbeddingTrainer, main
from t2v_lightning.fisher.estimators import FisherError
from tests.cli_runner import run_t2v

PROBE = ["--model.probe", "timm:test_efficientnet"]
DIGITS = [
    "--data.name",
    "digits",
    "--data.max_samples",
    "8",
    "--data.input_size",
    "16",
    "--trainer.max_epochs",
    "0",
    "--trainer.enable_progress_bar",
    "false",
]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``t2v ARGS`` in this process: (exit status, stderr)."""
    code, _, err = run_t2v(args, capsys)
    return code, err


def one_line_error(err: str) -> str:
    """The error line of a user mistake: ``t2v...: error: ...`` and at most a hint after it."""
    lines = [line for line in err.strip().splitlines() if "error:" in line or line.startswith("(")]
    assert "Traceback" not in err, err
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    assert lines[-1].startswith("(see:") or lines[-1].startswith("(set T2V_DEBUG"), err
    return errors[0]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # lightning_logs/ lands here
    return tmp_path


def test_wrong_types_and_values_fail_in_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["embed", *PROBE, "--model.skip_layers", "abc"], capsys)
    assert code == 2
    assert "model.skip_layers\": Expected a <class 'int'>. Got value: abc" in one_line_error(err)
    (workdir / "bad.yaml").write_text("data:\n  max_samples: many\n")
    code, err = run_cli(["embed", *PROBE, "--config", "bad.yaml"], capsys)
    assert code == 2 and "data.max_samples" in one_line_error(err)
    code, err = run_cli(["embed", *PROBE, "--data.batch_size", "-3"], capsys)
    assert code == 2 and "batch_size must be a positive int, got -3" in one_line_error(err)


def test_missing_data_root_fails_in_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["embed", *PROBE, "--data.name", "mnist", "--data.root", "nowhere"], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "not found" in line and "nowhere" in line and "download=True" in line
    code, err = run_cli(
        ["embed", *PROBE, "--data.name", "cub", "--data.task_id", "0", "--data.root", "nowhere"],
        capsys,
    )
    assert code == 2 and "data root nowhere does not exist" in one_line_error(err)


def test_task_ids_out_of_range_fail_in_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["embed", *PROBE, "--data.name", "split_mnist", "--tasks", "3-7"], capsys)
    assert code == 2
    assert "task ids [5, 6, 7] are out of range (the dataset has 5 tasks: 0-4)" in one_line_error(
        err
    )
    code, err = run_cli(
        ["embed", *PROBE, "--data.name", "split_mnist", "--data.task_id", "9"], capsys
    )
    assert code == 2 and "task_id=9 is out of range" in one_line_error(err)


def test_unwritable_output_fails_before_any_work(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_embedding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the embedding ran although its output cannot be written")

    monkeypatch.setattr("t2v_lightning.task2vec.Task2Vec.embed", no_embedding)
    (workdir / "a_file").write_text("not a folder")
    code, err = run_cli(
        ["embed", *PROBE, *DIGITS, "--output", "a_file/sub/out.safetensors"], capsys
    )
    assert code == 2
    assert "cannot write a_file/sub/out.safetensors" in one_line_error(err)
    assert "is a file, not a folder" in err
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = workdir / "locked"
        locked.mkdir(mode=0o500)
        code, err = run_cli(
            ["embed", *PROBE, *DIGITS, "--output", "locked/out.safetensors"], capsys
        )
        assert code == 2 and "is not writable" in one_line_error(err)


class _Payload:
    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_weights_and_checkpoints_needing_unpickling_fail_in_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _Payload.marker = str(workdir / "code-ran")
    torch.save({"state_dict": {}, "hyper_parameters": _Payload()}, workdir / "evil.ckpt")
    code, err = run_cli(["embed", *PROBE, *DIGITS, "--model.weights", "evil.ckpt"], capsys)
    assert code == 2 and "'evil.ckpt' cannot be read safely" in one_line_error(err)
    code, err = run_cli(["embed", *PROBE, *DIGITS, "--ckpt_path", "evil.ckpt"], capsys)
    assert code == 2 and "'evil.ckpt' cannot be read safely" in one_line_error(err)
    assert not (workdir / "code-ran").exists()


def test_distance_over_bad_artifacts_fails_in_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "broken.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all")
    code, err = run_cli(["distance", "broken.safetensors", "broken.safetensors"], capsys)
    assert code == 2 and "broken.safetensors is not a t2v-lightning embedding" in one_line_error(
        err
    )
    code, err = run_cli(["distance", "missing.safetensors", "broken.safetensors"], capsys)
    assert code == 2 and "missing.safetensors does not exist" in one_line_error(err)


@pytest.mark.parametrize(
    ("raised", "status", "expected"),
    [
        (
            FisherError("non-finite logits at layer 'fc' [dataset indices [3]]"),
            2,
            "t2v: error: non-finite logits at layer 'fc' [dataset indices [3]]",
        ),
        (OSError(28, "No space left on device"), 2, "No space left on device"),
        (SIGTERMException(), 128 + signal.SIGTERM, "terminated (SIGTERM)"),
    ],
)
def test_faults_during_embed_end_with_a_line_and_a_status(
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    raised: BaseException,
    status: int,
    expected: str,
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise raised

    monkeypatch.setattr(EmbeddingTrainer, "embed", fail)
    code, err = run_cli(["embed", *PROBE, *DIGITS], capsys)
    assert code == status and expected in err and "Traceback" not in err


def test_bugs_keep_their_traceback(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(EmbeddingTrainer, "embed", bug)
    monkeypatch.setattr(sys, "argv", ["t2v"])
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["embed", *PROBE, *DIGITS])
    monkeypatch.setenv("T2V_DEBUG", "1")  # and user errors show theirs on request
    with pytest.raises(ValueError, match="batch_size"):
        main(["embed", *PROBE, "--data.batch_size", "-3"])
