"""A hostile or careless user: remote and malicious checkpoints, races, full disks, odd outputs.

Each test backs a row of docs/reliability.md ("What happens when…"). Security: no checkpoint,
local or remote, reaches Lightning without ``torch.load(weights_only=True)``, and refusals take
one line. Data loss: two runs writing the same file, a distance matrix written over an artifact,
a damaged artifact counted as done, a device node replaced. Clear errors: a full disk (a real
tmpfs), Ctrl-C, Trainer options Lightning refuses, file names too long for their temporary,
absurd labels and seeds, inputs of the wrong shape, an all-zero embedding. And the artifact's
bytes do not depend on the process that wrote them.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import http.server
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("timm")

import t2v_lightning.embedding as embedding_module
from t2v_lightning import Task2Vec
from t2v_lightning.data.datamodule import TaskDataModule, sample_indices
from t2v_lightning.embedding import EmbeddingFileError, TaskEmbedding
from t2v_lightning.features import DatasetError
from t2v_lightning.fisher.callback import FisherCallback
from t2v_lightning.similarity.distance import pdist
from t2v_lightning.similarity.diversity import embed_batches
from tests.conftest import TinyConvNet, ToyImages, randomise_batchnorm
from tests.test_reliability_cli import DIGITS, PROBE, one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "HF_HUB_OFFLINE": "1",
    "MPLBACKEND": "Agg",
    "PYTHONWARNINGS": "ignore",
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # lightning_logs/ lands here
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # downloads stay here
    return tmp_path


def small_embedding(seed: int = 0, name: str | None = None) -> TaskEmbedding:
    generator = torch.Generator().manual_seed(seed)
    return TaskEmbedding(
        torch.rand(6, generator=generator) + 0.1,
        torch.ones(6),
        {"conv": (0, 4), "bn": (4, 6)},
        {
            "probe": "p",
            "probe_fingerprint": "abc",
            "task_name": name or f"t{seed}",
            "estimator": "per_sample",
            "method": "montecarlo",
            "seed": seed,
        },
    )


def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any embedding fail the test: the error must come before the work."""

    def embed(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the embedding ran although the command is invalid")

    monkeypatch.setattr("t2v_lightning.task2vec.Task2Vec.embed", embed)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


class _OpenMarker:
    """Unpickling this creates a marker file: proof that the pickle's code ran."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


class _System:
    """Unpickling this runs a shell command (the classic os.system payload)."""

    command = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


# ============================================================================================
# 1, 2. Checkpoints: remote ones are refused, malicious ones get one line everywhere
# ============================================================================================


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server over ``folder``: (base URL, paths requested)."""
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            requested.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("command", ["fit", "validate", "embed"])
def test_remote_checkpoints_are_refused_before_lightning_loads_them(
    workdir: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    served = workdir / "served"
    served.mkdir()
    _OpenMarker.marker = str(workdir / "code-ran")
    torch.save({"state_dict": {}, "hyper_parameters": _OpenMarker()}, served / "evil.ckpt")
    with serve(served) as (url, requested):
        for location in (
            f"{url}/evil.ckpt",
            f"file://{served / 'evil.ckpt'}",
            "s3://bucket/evil.ckpt",
        ):
            code, err = run_cli([command, *PROBE, *DIGITS, "--ckpt_path", location], capsys)
            assert code == 2, err
            line = one_line_error(err)
            assert location in line and "local files only" in line
        assert requested == []  # not even downloaded
    assert not (workdir / "code-ran").exists()


@pytest.mark.parametrize("command", ["fit", "validate", "embed"])
def test_malicious_checkpoints_are_refused_in_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    marker = workdir / "code-ran"
    _System.command = f"touch {marker}"
    torch.save({"state_dict": {}, "hyper_parameters": _System()}, workdir / "evil.ckpt")
    (workdir / "evil.pkl").write_bytes(pickle.dumps({"state_dict": _System()}, protocol=4))
    for name in ("evil.ckpt", "evil.pkl"):
        code, err = run_cli([command, *PROBE, *DIGITS, "--ckpt_path", name], capsys)
        assert code == 2, err
        assert f"'{name}' cannot be read safely" in one_line_error(err)
        assert "Weights only load failed" not in err and "torch.load to learn more" not in err
    assert not marker.exists()


def _small_task2vec(**options: Any) -> Task2Vec:
    """Task2Vec on a seeded tiny network: 8 examples in batches of 4, no head fitting, CPU."""
    torch.manual_seed(0)
    settings: dict[str, Any] = {"max_samples": 8, "batch_size": 4, "head_epochs": 0}
    probe = randomise_batchnorm(TinyConvNet()).eval()
    return Task2Vec(probe, progress_bar=False, accelerator="cpu", **{**settings, **options})


def test_malicious_resume_checkpoint_is_refused_with_the_same_words(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    _System.command = f"touch {marker}"
    torch.save({"callbacks": _System()}, tmp_path / "evil.ckpt")
    t2v = _small_task2vec(resume_from=str(tmp_path / "evil.ckpt"))
    with pytest.raises(ValueError, match=r"evil.ckpt' cannot be read safely") as caught:
        t2v.embed(ToyImages(n=12))
    assert "\n" not in str(caught.value)
    assert not marker.exists()


# ============================================================================================
# 3. A version-2 artifact cannot pass as version 1
# ============================================================================================


def test_version_1_cannot_switch_the_checksum_off(tmp_path: Path) -> None:
    raw = small_embedding().save(tmp_path / "a.safetensors").read_bytes()
    edited = raw.replace(b'\\"task_name\\": \\"t0\\"', b'\\"task_name\\": \\"t9\\"')
    assert edited != raw
    for version_field in (b'"format_version":"2"', b'"format_version": "2"'):
        edited = edited.replace(version_field, version_field.replace(b"2", b"1"))
    edited = edited.replace(b'"checksum"', b'"checksuX"')
    assert edited.count(b"checksuX") == 1 and edited.count(b'"1"') >= 1
    (tmp_path / "edited.safetensors").write_bytes(edited)
    with pytest.raises(EmbeddingFileError, match="version 1 but carries fields of a later"):
        TaskEmbedding.load(tmp_path / "edited.safetensors")


# ============================================================================================
# 4. Two runs writing the same --output: one wins, the other says so
# ============================================================================================

_RACER = textwrap.dedent(
    """
    import os, sys, time
    barrier, me = sys.argv[1], sys.argv[2]
    from t2v_lightning import task2vec
    from t2v_lightning.cli import main

    original = task2vec.Task2Vec.embed

    def embed(self, *args, **kwargs):
        # Both runs have checked that the output does not exist; both finish before either writes.
        result = original(self, *args, **kwargs)
        open(os.path.join(barrier, "ready-" + me), "w").close()
        deadline = time.monotonic() + 300
        while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        return result

    task2vec.Task2Vec.embed = embed
    main(sys.argv[3:])
    """
)


def test_two_runs_writing_the_same_output_never_lose_a_result_silently(workdir: Path) -> None:
    (workdir / "racer.py").write_text(_RACER)
    (workdir / "barrier").mkdir()
    args = ["embed", *PROBE, *DIGITS, "--output", "same.safetensors"]
    runs = [
        subprocess.Popen(
            [sys.executable, "racer.py", "barrier", str(i), *args],
            cwd=workdir,
            env=SUBPROCESS_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [(run.wait(timeout=600), run.communicate()[1]) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser
    assert "'same.safetensors' already exists" in one_line_error(loser)
    TaskEmbedding.load(workdir / "same.safetensors")
    assert hidden(workdir) == []


def test_without_hard_links_the_destination_is_reserved_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """File systems without hard links: an exclusive create, then the rename."""

    def no_links(source: Any, destination: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = small_embedding(1).save(tmp_path / "a.safetensors", overwrite=False)
    assert TaskEmbedding.load(path).name == "t1"
    real_write = embedding_module._write_safetensors

    def write_then_race(tensors: Any, filename: str, metadata: Any) -> None:
        real_write(tensors, filename, metadata)
        (tmp_path / "b.safetensors").write_bytes(b"written by another run")

    monkeypatch.setattr(embedding_module, "_write_safetensors", write_then_race)
    with pytest.raises(FileExistsError, match="appeared while this one was being made"):
        small_embedding(2).save(tmp_path / "b.safetensors", overwrite=False)
    assert (tmp_path / "b.safetensors").read_bytes() == b"written by another run"
    assert hidden(tmp_path) == []


# ============================================================================================
# 5. t2v distance never writes over its inputs or an existing file, and writes atomically
# ============================================================================================


@pytest.fixture
def artifacts(workdir: Path) -> list[Path]:
    (workdir / "dd").mkdir()
    return [
        small_embedding(i).save(workdir / "dd" / f"{c}.safetensors") for i, c in enumerate("abc")
    ]


def test_distance_outputs_never_replace_inputs_or_existing_files(
    workdir: Path, capsys: pytest.CaptureFixture[str], artifacts: list[Path]
) -> None:
    before = {p: p.read_bytes() for p in artifacts}
    files = [str(p.relative_to(workdir)) for p in artifacts]
    code, err = run_cli(["distance", "--csv", *files], capsys)  # the CSV's name forgotten
    assert code == 2 and "--csv 'dd/a.safetensors'" in one_line_error(err)
    code, err = run_cli(["distance", "--csv", files[0], *files, "--overwrite"], capsys)
    assert code == 2 and "is one of the input files" in one_line_error(err)
    code, err = run_cli(["distance", *files, "--out", "m.png", "--csv", "m.png"], capsys)
    assert code == 2 and "name the same file" in one_line_error(err)
    assert {p: p.read_bytes() for p in artifacts} == before

    code, err = run_cli(["distance", *files, "--csv", "m.csv"], capsys)
    assert code == 0, err
    first = (workdir / "m.csv").read_bytes()
    code, err = run_cli(["distance", *files[:2], "--csv", "m.csv"], capsys)
    assert code == 2 and "'m.csv' already exists; pass --overwrite" in one_line_error(err)
    assert (workdir / "m.csv").read_bytes() == first
    code, err = run_cli(["distance", *files[:2], "--csv", "m.csv", "--overwrite"], capsys)
    assert code == 0, err
    assert len(list(csv.reader((workdir / "m.csv").open()))) == 3
    assert hidden(workdir) == []


def test_distance_csv_is_written_atomically(
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    artifacts: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (workdir / "m.csv").write_text("previous matrix\n")
    real_writer = csv.writer

    def failing_writer(handle: Any) -> Any:
        writer = real_writer(handle)

        class Failing:
            rows = 0

            def writerow(self, row: list[Any]) -> Any:
                self.rows += 1
                if self.rows == 2:
                    handle.flush()
                    raise OSError(errno.ENOSPC, "No space left on device")
                return writer.writerow(row)

        return Failing()

    monkeypatch.setattr(csv, "writer", failing_writer)
    files = [str(p) for p in artifacts]
    code, err = run_cli(["distance", *files, "--csv", "m.csv", "--overwrite"], capsys)
    assert code == 2 and "No space left on device" in one_line_error(err)
    assert (workdir / "m.csv").read_text() == "previous matrix\n"
    assert hidden(workdir) == []


# ============================================================================================
# 6. A sweep redoes damaged artifacts instead of counting them as done
# ============================================================================================


def test_a_sweep_redoes_empty_and_truncated_artifacts(
    workdir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = workdir / "out"
    out.mkdir()
    (out / "digits.safetensors").write_bytes(b"")
    whole = small_embedding().save(workdir / "whole.safetensors").read_bytes()
    (out / "digits_0_4.safetensors").write_bytes(whole[: len(whole) // 2])
    with caplog.at_level("INFO"):
        code, err = run_cli(
            [
                "embed",
                *PROBE,
                *DIGITS,
                "--datasets",
                "digits",
                "digits_0_4",
                "--output",
                "out/{dataset}.safetensors",
            ],
            capsys,
        )
    assert code == 0, err
    assert "out/digits.safetensors is damaged" in caplog.text
    assert "out/digits_0_4.safetensors is damaged" in caplog.text
    assert "embedding 2 task(s) (0 already done)" in caplog.text
    assert TaskEmbedding.load(out / "digits.safetensors").meta["dataset"] == "digits"
    assert TaskEmbedding.load(out / "digits_0_4.safetensors").meta["dataset"] == "digits_0_4"


# ============================================================================================
# 7. Outputs that are not regular files
# ============================================================================================


def test_outputs_that_are_not_regular_files_are_refused(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    os.mkfifo(workdir / "fifo")
    special = {"fifo": "a FIFO (named pipe)"}
    try:  # the device node of /dev/full, made here: needs root (CAP_MKNOD)
        os.mknod(workdir / "full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        special["full"] = "a character device"
    except (PermissionError, OSError):
        pass
    no_work(monkeypatch)
    for name, kind in special.items():
        code, err = run_cli(["embed", *PROBE, *DIGITS, "--output", name, "--overwrite"], capsys)
        assert code == 2 and f"'{name}' is {kind}, not a regular file" in one_line_error(err)
        with pytest.raises(ValueError, match="not a regular file"):
            small_embedding().save(workdir / name)
    assert stat.S_ISFIFO(os.stat(workdir / "fifo").st_mode)
    if "full" in special:
        assert stat.S_ISCHR(os.stat(workdir / "full").st_mode)
    assert hidden(workdir) == []


# ============================================================================================
# 8. A full disk: a real, tiny tmpfs
# ============================================================================================


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs filled to the last byte (needs root or CAP_SYS_ADMIN)."""
    mount = shutil.which("mount")
    folder = tmp_path / "full"
    folder.mkdir()
    if mount is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and the mount command")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        with contextlib.suppress(OSError), open(folder / "filler", "wb", buffering=0) as handle:
            while True:
                handle.write(b"\0" * 512)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_is_one_line_and_leaves_nothing(
    full_disk: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(OSError, match="No space left on device") as caught:
        small_embedding().save(full_disk / "api.safetensors")
    assert caught.value.errno == errno.ENOSPC and "api.safetensors" in str(caught.value)
    output = full_disk / "out.safetensors"
    code, err = run_cli(["embed", *PROBE, *DIGITS, "--output", str(output)], capsys)
    assert code == 2, err
    line = one_line_error(err)
    assert "No space left on device" in line and str(output) in line
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


# ============================================================================================
# 9. Ctrl-C
# ============================================================================================


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Python's own SIGINT handler, as under a terminal: a shell that starts pytest in the
    background ignores SIGINT, and Python then installs no handler (Ctrl-C would do nothing)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _press_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT to this process after the first Fisher-pass batch (Lightning catches it)."""

    def interrupt(self: Any, *args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(FisherCallback, "on_train_batch_end", interrupt)


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_during_embed_exits_130_and_writes_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _press_ctrl_c(monkeypatch)
    code, err = run_cli(["embed", *PROBE, *DIGITS, "--output", "out.safetensors"], capsys)
    assert code == 130, err
    assert "t2v: interrupted" in err and "Traceback" not in err
    assert not (workdir / "out.safetensors").exists() and hidden(workdir) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_in_the_api_raises_keyboard_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    _press_ctrl_c(monkeypatch)
    t2v = _small_task2vec()
    with pytest.raises(KeyboardInterrupt):
        t2v.embed(ToyImages(n=12))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ============================================================================================
# 10. Options Lightning refuses, and checkpoints that are not checkpoints
# ============================================================================================

_CASES = [
    (["fit", "--trainer.max_epochs", "-3"], "max_epochs"),
    (["embed", "--trainer.max_epochs", "-3"], "max_epochs"),
    (["embed", "--trainer.devices", "abc"], "devices"),
    (["fit", "--trainer.devices", "0"], "devices"),
    (["embed", "--trainer.accelerator", "gpu"], "gpu"),
    (["embed", "--data.input_size", "100000"], "input_size=100000 is too large"),
    (["fit", "--ckpt_path", "state.pt"], "'state.pt' is not a Lightning checkpoint"),
    (["validate", "--ckpt_path", "state.pt"], "'state.pt' is not a Lightning checkpoint"),
    (["fit", "--ckpt_path", "garbage.ckpt"], "'garbage.ckpt' is not a PyTorch file"),
    (["embed", "--ckpt_path", "garbage.ckpt"], "'garbage.ckpt' is not a PyTorch file"),
]


@pytest.mark.parametrize(("args", "expected"), _CASES, ids=[" ".join(a) for a, _ in _CASES])
def test_bad_options_and_checkpoints_fail_in_one_line(
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    expected: str,
) -> None:
    if "gpu" in args and torch.cuda.is_available():
        pytest.skip("a GPU is available here")
    torch.save(
        {"conv_stem.weight": torch.zeros(2), "classifier.bias": torch.zeros(2)},
        workdir / "state.pt",
    )
    (workdir / "garbage.ckpt").write_bytes(bytes(range(256)) * 4)
    no_work(monkeypatch)
    code, err = run_cli([args[0], *PROBE, *DIGITS, *args[1:]], capsys)
    assert code == 2, err
    assert expected in one_line_error(err)


# ============================================================================================
# 11. An output name too long for its temporary
# ============================================================================================


def test_an_output_name_too_long_for_its_temporary_fails_before_any_work(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "a" * (242 - len(".safetensors")) + ".safetensors"
    (workdir / name).write_bytes(b"")  # a valid name: the file system takes it
    (workdir / name).unlink()
    no_work(monkeypatch)
    code, err = run_cli(["embed", *PROBE, *DIGITS, "--output", name], capsys)
    assert code == 2, err
    line = one_line_error(err)
    assert "242 characters long" in line and "temporary" in line and ".tmp" not in line
    with pytest.raises(ValueError, match="242 characters long"):
        small_embedding().save(workdir / name)
    assert not (workdir / name).exists() and hidden(workdir) == []


# ============================================================================================
# 12. Absurd labels, seeds and inputs
# ============================================================================================


class _Relabelled(ToyImages):
    """ToyImages whose two classes are labelled 0 and 2**40."""

    def __init__(self) -> None:
        super().__init__(n=16, classes=2)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = super().__getitem__(index)
        return image, label * 2**40


def test_huge_label_values_are_counted_by_class_not_by_value() -> None:
    t2v = _small_task2vec(head_epochs=1)
    embedding = t2v.embed(_Relabelled())
    assert embedding.meta["num_classes"] == 2 and torch.isfinite(embedding.hessian).all()
    drawn = sample_indices([0, 2**40] * 4, max_samples=6, balanced=True, seed=0)
    assert len(drawn) == 6 and all(0 <= i < 8 for i in drawn)


def test_seeds_beyond_64_bits_are_refused_by_name(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"seed=1180591620717411303424 is out of range"):
        Task2Vec(TinyConvNet(), seed=2**70)
    with pytest.raises(ValueError, match=r"seed=18446744073709551616 is out of range"):
        TaskDataModule("digits", seed=2**64)
    with pytest.raises(ValueError, match=r"seed=-9223372036854775809 is out of range"):
        embed_batches(
            Task2Vec(TinyConvNet()), ToyImages(n=8), batch_size=4, num_batches=1, seed=-(2**63) - 1
        )
    no_work(monkeypatch)
    for option in ("--data.seed", "--model.seed"):
        code, err = run_cli(["embed", *PROBE, *DIGITS, option, str(2**70)], capsys)
        assert code == 2 and "seed=1180591620717411303424 is out of range" in one_line_error(err)


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: list[torch.Tensor]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], index % 2


def _every_input_task2vec() -> Task2Vec:
    """A Task2Vec that reads every input in order (no class balancing, no sample cap)."""
    return Task2Vec(
        TinyConvNet(),
        max_samples=None,
        balanced_sampling=False,
        batch_size=4,
        head_epochs=0,
        progress_bar=False,
        accelerator="cpu",
    )


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (
            torch.rand(1, 8, 8),
            r"shape \(1, 8, 8\).*first layer 'conv1' \(Conv2d\) takes examples "
            r"of shape \(3, H, W\)",
        ),
        (torch.rand(8, 8), r"shape \(8, 8\).*takes examples of shape \(3, H, W\)"),
        (
            (torch.rand(3, 8, 8) * 255).to(torch.uint8),
            r"dtype torch.uint8\) is not a float tensor; the probe takes "
            r"float inputs of shape \(3, H, W\)",
        ),
    ],
    ids=["one_channel", "two_dimensional", "uint8"],
)
def test_inputs_of_the_wrong_shape_name_the_index_and_the_expected_shape(
    image: torch.Tensor, expected: str
) -> None:
    t2v = _every_input_task2vec()
    with pytest.raises(DatasetError, match="dataset index 0: the input " + "(.|\n)*" + expected):
        t2v.embed(_Images([image.clone() for _ in range(8)]))


def test_integer_inputs_of_a_probe_that_starts_with_a_lookup_table_are_accepted() -> None:
    """Token ids are integers: only a convolution or linear layer that receives them refuses."""

    class TokenIds(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.tensor([index % 10, (3 * index) % 10, 1]), index % 2

    torch.manual_seed(0)
    probe = torch.nn.Sequential(
        torch.nn.Embedding(10, 4),
        torch.nn.Flatten(),
        torch.nn.Linear(12, 5),
        torch.nn.ReLU(),
        torch.nn.Linear(5, 2),
    )
    embedding = Task2Vec(
        probe,
        max_samples=None,
        balanced_sampling=False,
        batch_size=4,
        head_epochs=0,
        skip_layers=1,
        progress_bar=False,
        accelerator="cpu",
    ).embed(TokenIds())
    assert list(embedding.layers) == ["2"]


def test_one_input_of_another_shape_is_named() -> None:
    images = [torch.rand(3, 8, 8) for _ in range(8)]
    images[5] = torch.rand(3, 6, 6)
    t2v = _every_input_task2vec()
    with pytest.raises(DatasetError, match=r"dataset index 5: the input has shape \(3, 6, 6\)"):
        t2v.embed(_Images(images))


# ============================================================================================
# 13. An all-zero embedding
# ============================================================================================


def test_an_all_zero_embedding_is_refused_by_name(
    workdir: Path, capsys: pytest.CaptureFixture[str], artifacts: list[Path]
) -> None:
    zero = small_embedding(7, name="dead")
    zero.hessian.zero_()
    with pytest.raises(ValueError, match=r"'dead'\) is zero everywhere"):
        pdist([zero, small_embedding(1)])
    zero.save(workdir / "dd" / "zero.safetensors")
    code, err = run_cli(
        ["distance", "dd/zero.safetensors", str(artifacts[0]), "--csv", "m.csv"], capsys
    )
    assert code == 2 and "dd/zero.safetensors is zero everywhere" in one_line_error(err)
    assert not (workdir / "m.csv").exists()


# ============================================================================================
# The artifact's bytes depend only on the embedding
# ============================================================================================


def test_artifact_bytes_are_the_same_from_separate_processes(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, torch
        from tests.test_hostile import small_embedding
        small_embedding(3).save(sys.argv[1])
        """
    )
    outputs = [tmp_path / f"run{i}.safetensors" for i in range(3)]
    for output in outputs:
        subprocess.run(
            [sys.executable, "-c", script, str(output)],
            check=True,
            cwd=REPO,
            env=SUBPROCESS_ENV,
            timeout=300,
        )
    contents = {output.read_bytes() for output in outputs}
    assert len(contents) == 1
    from safetensors import safe_open

    with safe_open(str(outputs[0]), framework="pt") as handle:  # still a safetensors file
        assert json.loads(handle.metadata()["meta"])["task_name"] == "t3"
        assert torch.equal(handle.get_tensor("hessian"), small_embedding(3).hessian)
