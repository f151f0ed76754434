"""Hostile input, corrupt files, interrupted runs and numerical faults.

Each test here backs one row of docs/reliability.md ("What happens when…"): a bad file, a bad
weights file, a killed run or a NaN gives a clear error that names what is wrong (the file, the
layer, the example), executes nothing, and leaves no partial artifact behind.

* Artifact loading is fuzzed with ``hypothesis`` (a bounded number of examples) and checked
  exhaustively against every truncation and every single-byte change of a small artifact: each
  load either raises :class:`EmbeddingFileError` or returns the original embedding.
* The kill tests run one driver process that imports the library once and forks a child per
  run; the child is stopped at a marked point (after the first Fisher-pass batch, or halfway
  through writing the temporary file) and sent SIGTERM or SIGKILL. Forking a process that has
  only imported (never computed, one thread) is safe and saves an import per run.
* Numerical faults are provoked with tiny networks whose faults are placed on purpose (a NaN
  weight, a head that overflows, an operation whose backward overflows for marked examples,
  float16 autocast on CPU at the estimator level).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import t2v_lightning.embedding as embedding_module
from t2v_lightning import Task2Vec
from t2v_lightning.embedding import FORMAT_NAME, EmbeddingFileError, TaskEmbedding
from t2v_lightning.features import DatasetError
from t2v_lightning.fisher.estimators import (
    FisherError,
    LayerFisherTaps,
    batch_filter_sums,
    embedded_layers,
    filter_values,
)
from t2v_lightning.labels import select_examples
from t2v_lightning.outputs import host_name
from t2v_lightning.probe import ProbeError, get_probe, read_state_dict
from tests.conftest import TinyConvNet, ToyImages, randomise_batchnorm
from tests.reference import brute_force_fisher

REPO = Path(__file__).resolve().parents[1]
# Closed forms against the float32 per-example loop (as in test_estimators).
EXACT_RTOL = 1e-5
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def small_embedding(seed: int = 0) -> TaskEmbedding:
    generator = torch.Generator().manual_seed(seed)
    return TaskEmbedding(
        torch.rand(6, generator=generator) + 0.1,
        torch.ones(6),
        {"conv": (0, 4), "bn": (4, 6)},
        {"probe": "p", "probe_fingerprint": "abc", "task_name": f"t{seed}"},
    )


def same_embedding(a: TaskEmbedding, b: TaskEmbedding) -> bool:
    return (
        torch.equal(a.hessian, b.hessian)
        and torch.equal(a.scale, b.scale)
        and a.layers == b.layers
        and a.meta == b.meta
    )


def load_outcome(path: Path) -> TaskEmbedding | None:
    """The loaded embedding, or None when the loader refused the file with EmbeddingFileError.

    Any other exception escapes and fails the test.
    """
    try:
        return TaskEmbedding.load(path)
    except EmbeddingFileError:
        return None


# ============================================================================================
# Artifact loading
# ============================================================================================


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = small_embedding().save(tmp_path_factory.mktemp("artifact") / "a.safetensors")
    return path.read_bytes()


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    assert load_outcome(path) is None


_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
_JSON = st.recursive(
    _LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_SIZES = st.lists(st.integers(-3, 2**62), max_size=3)
_TENSOR_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8"]) | _JSON,
        "shape": _SIZES | _JSON,
        "data_offsets": _SIZES | _JSON,
    }
)
_METADATA = st.fixed_dictionaries(
    {"format": st.just(FORMAT_NAME) | _JSON},
    optional={
        "format_version": st.sampled_from(["1", "2", "0", "-1", "1.0", ""]) | _JSON,
        "layers": st.sampled_from(['[["a", [0, 2]]]', "[]", "{}", "[[[", '[["a", [0]]]']) | _JSON,
        "meta": st.sampled_from(["{}", "[]", '{"task_name": "x"}', "nul"]) | _JSON,
        "checksum": st.text(max_size=12) | _JSON,
    },
)
_HEADER = st.fixed_dictionaries(
    {},
    optional={"__metadata__": _METADATA | _JSON, "hessian": _TENSOR_ENTRY, "scale": _TENSOR_ENTRY},
)


@FUZZ
@given(
    header=_HEADER, payload=st.binary(max_size=64), claimed=st.none() | st.integers(0, 2**64 - 1)
)
def test_fuzzed_headers_give_an_embedding_file_error(
    tmp_path: Path, header: dict[str, Any], payload: bytes, claimed: int | None
) -> None:
    """Any header (absurd sizes and offsets, wrong types, bad versions): a clear error or a load."""
    raw = json.dumps(header).encode()
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + payload)
    loaded = load_outcome(path)
    assert loaded is None or isinstance(loaded, TaskEmbedding)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 10**6),
)
def test_damaged_artifacts_are_refused_or_unchanged(
    tmp_path: Path, artifact: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    """Overwritten bytes anywhere (and a cut): refused, or read back exactly as written."""
    damaged = bytearray(artifact)
    for position, value in edits:
        damaged[position % len(damaged)] = value
    if cut is not None:
        damaged = damaged[: cut % len(damaged)]
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(damaged))
    loaded = load_outcome(path)
    assert loaded is None or same_embedding(loaded, small_embedding())


def test_every_truncation_is_refused(tmp_path: Path, artifact: bytes) -> None:
    path = tmp_path / "cut.safetensors"
    for size in range(len(artifact)):
        path.write_bytes(artifact[:size])
        assert load_outcome(path) is None, f"a file cut to {size} of {len(artifact)} bytes loaded"


def test_every_single_byte_change_is_refused(tmp_path: Path, artifact: bytes) -> None:
    """Flip each byte in turn: refused (checksum, sizes, JSON, a required key renamed)."""
    path = tmp_path / "flipped.safetensors"
    harmless = 0
    for position in range(len(artifact)):
        damaged = bytearray(artifact)
        damaged[position] ^= 0x01
        path.write_bytes(bytes(damaged))
        loaded = load_outcome(path)
        if loaded is not None:
            assert same_embedding(loaded, small_embedding()), (
                f"byte {position} changed the embedding"
            )
            harmless += 1
    assert harmless == 0  # padding spaces would flip to "!", and every key is required


def test_checksum_catches_an_edited_value(tmp_path: Path, artifact: bytes) -> None:
    """A digit changed inside the meta JSON keeps the JSON valid; the checksum still refuses it."""
    edited = artifact.replace(b'task_name\\": \\"t0', b'task_name\\": \\"t9')
    assert edited != artifact
    path = tmp_path / "edited.safetensors"
    path.write_bytes(edited)
    with pytest.raises(EmbeddingFileError, match="checksum"):
        TaskEmbedding.load(path)


def test_version_1_artifacts_without_checksum_still_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    embedding = small_embedding()
    header = {
        "format": FORMAT_NAME,
        "layers": json.dumps([[k, list(v)] for k, v in embedding.layers.items()]),
        "meta": json.dumps(embedding.meta, sort_keys=True),
    }
    tensors = {"hessian": embedding.hessian, "scale": embedding.scale}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={**header, "format_version": "1"})
    assert same_embedding(TaskEmbedding.load(tmp_path / "v1.safetensors"), embedding)
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata={**header, "format_version": "2"})
    with pytest.raises(EmbeddingFileError, match="no checksum"):
        TaskEmbedding.load(tmp_path / "v2.safetensors")


def test_absurd_sizes_are_refused_without_allocating(tmp_path: Path) -> None:
    meta = {
        "format": FORMAT_NAME,
        "format_version": "1",
        "layers": "[]",
        "meta": "{}",
    }  # no checksum
    cases = {
        "header_beyond_file": struct.pack("<Q", 2**63) + b"{}",
        "header_over_cap": struct.pack("<Q", 64 * 1024 * 1024 + 1) + b"{" * 100,
        "tensor_of_a_trillion_entries": _file(
            {
                "__metadata__": meta,
                "hessian": _entry([10**12], [0, 4 * 10**12]),
                "scale": _entry([1], [0, 4]),
            },
            b"\0" * 8,
        ),
        "negative_shape": _file(
            {"__metadata__": meta, "hessian": _entry([-1], [0, 0]), "scale": _entry([0], [0, 0])}
        ),
        "reversed_offsets": _file(
            {"__metadata__": meta, "hessian": _entry([1], [4, 0]), "scale": _entry([1], [0, 4])},
            b"\0" * 8,
        ),
        "two_dimensional": _file(
            {"__metadata__": meta, "hessian": _entry([1, 1], [0, 4]), "scale": _entry([1], [4, 8])},
            b"\0" * 8,
        ),
        "deeply_nested_header": struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000,
        "deeply_nested_layers": _file({"__metadata__": {**meta, "layers": "[" * 100_000}}),
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(EmbeddingFileError):
            TaskEmbedding.load(path)


def _entry(shape: list[int], offsets: list[int]) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


def _file(header: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_files_of_other_formats_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.save({"weight": torch.zeros(2)}, tmp_path / "state.pt")
    save_file({"hessian": torch.ones(2), "scale": torch.ones(2)}, str(tmp_path / "plain.st"))
    others = {
        "empty": b"",
        "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        "json": b'{"hessian": [1, 2], "scale": [1, 1]}',
        "gzip": zlib.compress(b"x" * 100),
        "torch_zip": (tmp_path / "state.pt").read_bytes(),
        "safetensors_without_our_tag": (tmp_path / "plain.st").read_bytes(),
    }
    for name, content in others.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(EmbeddingFileError):
            TaskEmbedding.load(path)
    with pytest.raises(EmbeddingFileError, match="not a regular file"):
        TaskEmbedding.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        TaskEmbedding.load(tmp_path / "missing.safetensors")


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_pickles_renamed_to_our_extension_execute_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    _Payload.marker = str(marker)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"pickle{protocol}.safetensors"
        path.write_bytes(pickle.dumps({"hessian": _Payload()}, protocol=protocol))
        with pytest.raises(EmbeddingFileError):
            TaskEmbedding.load(path)
    torch.save({"hessian": _Payload()}, tmp_path / "torch.safetensors")
    with pytest.raises(EmbeddingFileError):
        TaskEmbedding.load(tmp_path / "torch.safetensors")
    assert not marker.exists()


def test_artifact_of_a_newer_format_version_asks_for_an_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedding_module, "FORMAT_VERSION", embedding_module.FORMAT_VERSION + 1)
    path = small_embedding().save(tmp_path / "newer.safetensors")
    monkeypatch.undo()
    with pytest.raises(EmbeddingFileError, match=r"newer t2v-lightning.*upgrade"):
        TaskEmbedding.load(path)


# ============================================================================================
# Probe weights
# ============================================================================================


def test_weights_needing_unpickling_are_refused_and_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    _Payload.marker = str(marker)
    checkpoint = {"state_dict": {"fc.weight": torch.zeros(2, 2)}, "hyper_parameters": _Payload()}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(ProbeError, match=r"cannot be read safely.*unpickle.*weights_only=True"):
        get_probe("resnet18", weights=tmp_path / "evil.ckpt")
    from t2v_lightning.probe_classifier import ProbeClassifier

    model = ProbeClassifier("resnet18", num_classes=2)
    with pytest.raises(ValueError, match="cannot be read safely"):
        model.load_head(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_weights_files_that_are_not_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "random.pt").write_bytes(bytes(range(256)))
    (tmp_path / "broken.safetensors").write_bytes(b"\0" * 100)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ProbeError, match="not a PyTorch file"):
        read_state_dict(tmp_path / "random.pt")
    with pytest.raises(ProbeError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "broken.safetensors")
    with pytest.raises(ProbeError, match="does not hold a state dict of tensors"):
        read_state_dict(tmp_path / "list.pt")


# ============================================================================================
# Atomic writes
# ============================================================================================


def test_save_refuses_non_finite_values_and_leaves_nothing(tmp_path: Path) -> None:
    embedding = small_embedding()
    embedding.hessian[5] = float("nan")
    with pytest.raises(ValueError, match=r"hessian holds 1 non-finite.*index 5 \(layer 'bn'\)"):
        embedding.save(tmp_path / "nan.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_keeps_the_umask_mode_and_cleans_stale_temporaries(tmp_path: Path) -> None:
    """Temporary files of dead writers of this host go; a live writer's and others' stay."""
    name = "a.safetensors"
    host = host_name()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f".{name}.t2v-{host}-{int(dead.stdout)}-0123abcd.tmp"
    live = tmp_path / f".{name}.t2v-{host}-{os.getppid()}-0123abcd.tmp"
    foreign = tmp_path / f".{name}.t2v-otherhost-{int(dead.stdout)}-0123abcd.tmp"
    other_target = tmp_path / f".b.safetensors.t2v-{host}-{int(dead.stdout)}-0123abcd.tmp"
    for path in (stale, live, foreign, other_target):
        path.write_bytes(b"partial")
    umask = os.umask(0o022)
    try:
        path = small_embedding().save(tmp_path / name)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name, live.name, foreign.name, other_target.name]
    )


_DRIVER = textwrap.dedent(
    '''
    """Fork one child per run; stop it at a marked point with a signal; record what is left."""
    import hashlib, json, os, signal, sys, time

    repo, workdir, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.path.insert(0, repo)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(1)
    import t2v_lightning.embedding as embedding_module
    from t2v_lightning import Task2Vec
    from t2v_lightning.embedding import EmbeddingFileError, TaskEmbedding
    from t2v_lightning.fisher.callback import FisherCallback
    from tests.conftest import TinyConvNet, ToyImages, randomise_batchnorm


    def embed_and_save(output, pause, marker):
        if pause == "fisher":  # after the first Fisher-pass batch
            original = FisherCallback.on_train_batch_end

            def slow(self, trainer, *args, **kwargs):
                original(self, trainer, *args, **kwargs)
                open(marker, "w").close()
                deadline = time.monotonic() + 60
                while not trainer.received_sigterm and time.monotonic() < deadline:
                    time.sleep(0.01)

            FisherCallback.on_train_batch_end = slow
        elif pause == "write":  # half of the temporary file written, not yet renamed
            real = embedding_module._write_safetensors

            def slow_save(tensors, filename, metadata=None):
                real(tensors, filename, metadata=metadata)
                with open(filename, "rb") as handle:
                    data = handle.read()
                with open(filename, "wb") as handle:
                    handle.write(data[: len(data) // 2])
                open(marker, "w").close()
                time.sleep(60)
                with open(filename, "wb") as handle:
                    handle.write(data)

            embedding_module._write_safetensors = slow_save
        torch.manual_seed(0)
        probe = randomise_batchnorm(TinyConvNet()).eval()
        t2v = Task2Vec(probe, max_samples=16, batch_size=4, head_epochs=1, progress_bar=False,
                       accelerator="cpu", seed=0)
        t2v.embed(ToyImages(n=24, size=8), task_name="toy").save(output, overwrite=True)


    def snapshot(folder):
        entries = {}
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
            try:
                TaskEmbedding.load(path)
                loads = "yes"
            except EmbeddingFileError:
                loads = "EmbeddingFileError"
            entries[name] = {"sha256": digest, "loads": loads}
        return entries


    def run(name, output, pause, sig):
        marker = os.path.join(workdir, name + ".marker")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                embed_and_save(output, pause, marker)
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        status = None
        if sig is not None:
            deadline = time.monotonic() + 240
            while not os.path.exists(marker) and time.monotonic() < deadline:
                finished, status = os.waitpid(pid, os.WNOHANG)
                if finished:
                    break  # ended before the marked point: reported as it is
                status = None
                time.sleep(0.01)
            if status is None:
                os.kill(pid, getattr(signal, sig))
        if status is None:
            _, status = os.waitpid(pid, 0)
        return {
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "marker": os.path.exists(marker),
            "left": snapshot(os.path.dirname(output)),
        }


    results = {}
    for name, output, pause, sig in plan:
        results[name] = run(name, os.path.join(workdir, output), pause, sig)
    with open(os.path.join(workdir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    '''
)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Embed runs killed during the Fisher pass and during the write, then rerun."""
    workdir = tmp_path_factory.mktemp("kills")
    for folder in ("reference", "fisher_term", "fisher_kill", "write_term", "write_kill"):
        (workdir / folder).mkdir()
    previous = small_embedding(seed=3).save(workdir / "write_kill" / "out.safetensors")
    (workdir / "previous.sha256").write_text(hashlib.sha256(previous.read_bytes()).hexdigest())
    plan = [
        ["reference", "reference/out.safetensors", None, None],
        ["fisher_term", "fisher_term/out.safetensors", "fisher", "SIGTERM"],
        ["fisher_kill", "fisher_kill/out.safetensors", "fisher", "SIGKILL"],
        ["write_term", "write_term/out.safetensors", "write", "SIGTERM"],
        ["write_kill", "write_kill/out.safetensors", "write", "SIGKILL"],
    ]
    plan += [[f"rerun_{name}", output, None, None] for name, output, _, _ in plan[1:]]
    (workdir / "driver.py").write_text(_DRIVER)
    done = subprocess.run(
        [sys.executable, str(workdir / "driver.py"), str(REPO), str(workdir), json.dumps(plan)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=workdir,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, json.loads((workdir / "results.json").read_text())


def _temporaries(left: dict[str, Any]) -> list[str]:
    return [
        name for name in left if name.startswith(".out.safetensors.t2v-") and name.endswith(".tmp")
    ]


@pytest.mark.slow  # the killed_runs fixture runs five embedding processes
def test_sigterm_during_the_fisher_pass_writes_nothing_and_exits_143(killed_runs) -> None:
    _, results = killed_runs
    run = results["fisher_term"]
    assert run["marker"] and run["exit"] == 128 + signal.SIGTERM and run["signal"] is None
    assert run["left"] == {}


@pytest.mark.slow  # the killed_runs fixture runs five embedding processes
def test_sigkill_during_the_fisher_pass_writes_nothing(killed_runs) -> None:
    run = killed_runs[1]["fisher_kill"]
    assert run["marker"] and run["signal"] == signal.SIGKILL
    assert run["left"] == {}


@pytest.mark.slow  # the killed_runs fixture runs five embedding processes
def test_kill_during_the_write_leaves_only_an_ignored_hidden_temporary(killed_runs) -> None:
    _, results = killed_runs
    run = results["write_term"]
    assert run["marker"] and run["signal"] == signal.SIGTERM
    assert "out.safetensors" not in run["left"]
    (temporary,) = _temporaries(run["left"])
    assert list(run["left"]) == [temporary]
    assert run["left"][temporary]["loads"] == "EmbeddingFileError"  # half written


@pytest.mark.slow  # the killed_runs fixture runs five embedding processes
def test_kill_during_an_overwrite_keeps_the_previous_artifact(killed_runs) -> None:
    workdir, results = killed_runs
    run = results["write_kill"]
    assert run["marker"] and run["signal"] == signal.SIGKILL
    previous = (workdir / "previous.sha256").read_text()
    assert run["left"]["out.safetensors"] == {"sha256": previous, "loads": "yes"}
    assert len(_temporaries(run["left"])) == 1


@pytest.mark.slow  # the killed_runs fixture runs five embedding processes
def test_rerun_after_a_kill_gives_the_uninterrupted_artifact(killed_runs) -> None:
    workdir, results = killed_runs
    reference = results["reference"]["left"]["out.safetensors"]
    assert results["reference"]["exit"] == 0 and reference["loads"] == "yes"
    expected = TaskEmbedding.load(workdir / "reference" / "out.safetensors")
    assert torch.isfinite(expected.hessian).all() and expected.hessian.gt(0).any()
    for name in ("fisher_term", "fisher_kill", "write_term", "write_kill"):
        rerun = results[f"rerun_{name}"]
        assert rerun["exit"] == 0, name
        # the artifact, byte for byte; the dead writer's temporary file is gone
        assert rerun["left"] == {"out.safetensors": reference}, name
        assert same_embedding(TaskEmbedding.load(workdir / name / "out.safetensors"), expected)


# ============================================================================================
# Numerical faults
# ============================================================================================

TASK2VEC = {
    "max_samples": 12,
    "batch_size": 6,
    "head_epochs": 1,
    "progress_bar": False,
    "accelerator": "cpu",
}


def test_nan_weight_is_reported_with_its_layer_and_examples() -> None:
    torch.manual_seed(0)
    probe = randomise_batchnorm(TinyConvNet()).eval()
    with torch.no_grad():
        probe.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(
        ProbeError, match=r"dataset indices \[.*'conv2' \(Conv2d: its weight holds NaN"
    ):
        Task2Vec(probe, **TASK2VEC).embed(ToyImages(24))
    chain = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    with torch.no_grad():  # in the skipped prefix: found while caching it
        chain[0].bias[1] = float("inf")
    with pytest.raises(ProbeError, match=r"prefix.*'0' \(Conv2d: its bias holds NaN / inf\)"):
        Task2Vec(chain, skip_layers=2, **TASK2VEC).embed(ToyImages(24))


def test_head_weights_of_absurd_scale_are_reported() -> None:
    torch.manual_seed(0)
    probe = randomise_batchnorm(TinyConvNet()).eval()
    options = {**TASK2VEC, "head_epochs": 0, "reset_head": False}
    with torch.no_grad():
        probe.fc.weight.fill_(float("inf"))
    # Without head fitting no feature pass runs: the Fisher pass is the first to see the logits.
    with pytest.raises(
        FisherError, match=r"'fc' \(Linear: its weight holds NaN / inf\).*dataset indices"
    ):
        Task2Vec(probe, **options).embed(ToyImages(24))
    with torch.no_grad():  # finite logits, but squared gradients beyond float32
        probe.fc.weight.fill_(1e30)
    with pytest.raises(
        FisherError, match=r"gradients \(NaN or inf\) at layer 'bn2'.*dataset indices"
    ):
        Task2Vec(probe, **options).embed(ToyImages(24))


class _Marks:
    """Which rows of the current batch are marked (an input pixel above 50)."""

    rows: torch.Tensor | None = None


class _MarkInputs(nn.Module):
    def __init__(self, marks: _Marks) -> None:
        super().__init__()
        self.marks = marks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.marks.rows = x.reshape(x.shape[0], -1).amax(-1) > 50
        return x


class _Poison(nn.Module):
    """Identity, except for marked rows in passes with gradients on (the Fisher pass).

    ``where="forward"`` makes their output NaN; ``where="backward"`` keeps the output finite
    and makes the gradient flowing back through it infinite.
    """

    def __init__(self, marks: _Marks, where: str) -> None:
        super().__init__()
        self.marks = marks
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or self.marks.rows is None:
            return x
        marked = self.marks.rows.reshape(-1, *[1] * (x.ndim - 1))
        if self.where == "forward":
            return torch.where(marked, torch.full_like(x, float("nan")), x)
        return _InfGradient.apply(x, marked)


class _InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(marked)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (marked,) = ctx.saved_tensors
        return torch.where(marked, torch.full_like(grad, float("inf")), grad), None


def _marked_task(where: str) -> tuple[nn.Module, ToyImages, int]:
    """Layers '1' (conv) and '2' (batch norm) sit before the poison '4', layer '5' after it."""
    torch.manual_seed(0)
    marks = _Marks()
    probe = nn.Sequential(
        _MarkInputs(marks),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        _Poison(marks, where),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    data = ToyImages(24)
    data.images[13, 0, 0, 0] = 100.0  # finite, but marked
    return randomise_batchnorm(probe).eval(), data, 13


def test_nan_logits_in_the_fisher_pass_name_the_dataset_examples() -> None:
    probe, data, marked = _marked_task("forward")
    t2v = Task2Vec(probe, **{**TASK2VEC, "max_samples": 48, "seed": 1})
    with pytest.raises(
        FisherError,
        match=rf"non-finite logits.*first non-finite layer: '4' \(_Poison: NaN from finite inputs\).*dataset indices \[{marked}",
    ) as info:
        t2v.embed(data)
    labels = torch.as_tensor([data[i][1] for i in range(len(data))])
    selection = select_examples(labels, 48, balanced=True, seed=1)
    assert set(selection[info.value.example_ids].tolist()) == {marked}
    # the first failing batch names all of its rows that drew the marked example
    assert 1 <= len(info.value.example_ids) <= int((selection == marked).sum())


def test_infinite_gradients_name_the_layer_and_examples() -> None:
    probe, data, marked = _marked_task("backward")
    options = {**TASK2VEC, "max_samples": 48, "seed": 1}
    with pytest.raises(
        FisherError,
        match=rf"gradients \(NaN or inf\) at layer '2'.*affected: \['1', '2'\].*dataset indices \[{marked}",
    ):
        Task2Vec(probe, **options).embed(data)
    with pytest.raises(
        FisherError,
        match=r"mini-batch gradient .* at layer '2'.*for the batch of example ids.*dataset indices",
    ):
        Task2Vec(probe, estimator="batch", **options).embed(data)


def _fp16_network() -> nn.Sequential:
    """Small activations, large head weights: gradients of ~3e2 per unit at the first layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight.fill_(5e-5)
        net[0].bias.zero_()
        net[1].weight.uniform_(-300, 300)
        net[1].bias.zero_()
    return net


def _fp16_sums(
    net: nn.Module, inputs: torch.Tensor, grad_scale: float, autocast: bool
) -> dict[str, torch.Tensor]:
    def context() -> Any:
        return torch.autocast("cpu", dtype=torch.float16, enabled=autocast)

    ids = torch.arange(100, 100 + inputs.shape[0])
    with torch.enable_grad(), LayerFisherTaps(net, embedded_layers(net, "1"), grad_scale) as taps:
        sums, _ = batch_filter_sums(
            net,
            taps,
            inputs,
            ids,
            torch.ones(len(ids), dtype=torch.bool),
            "exact",
            0,
            forward_context=context,
        )
    return sums


def test_fp16_overflow_in_the_backward_pass_is_caught_and_explained() -> None:
    """The gradients that the loss scale keeps above fp16's underflow overflow its range here."""
    net, inputs = _fp16_network(), torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    reference = _fp16_sums(net, inputs, 1.0, autocast=False)["0"]
    unscaled = _fp16_sums(net, inputs, 1.0, autocast=True)["0"]
    torch.testing.assert_close(unscaled, reference, rtol=5e-3, atol=0)  # fp16 itself is fine
    with pytest.raises(
        FisherError,
        match=r"layer '0' for example ids \[100, 101, 102, 103, 104\] and 1 more.*float16.*bf16-mixed.*grad_scale than 1024",
    ) as info:
        _fp16_sums(net, inputs, 1024.0, autocast=True)
    assert info.value.example_ids == list(range(100, 106))


def test_fp16_overflow_of_the_logits_is_caught_and_explained() -> None:
    net = _fp16_network()
    with torch.no_grad():
        net[0].weight.fill_(100.0)
    inputs = torch.full((3, 4), 100.0)
    _fp16_sums(net, inputs / 1e4, 1.0, autocast=True)  # the same network in range: fine
    with pytest.raises(
        FisherError,
        match=r"non-finite logits.*example ids \[100, 101, 102\].*float16.*65504.*first non-finite layer: '1' \(Linear: its output overflows\)",
    ):
        _fp16_sums(net, inputs, 1.0, autocast=True)


def test_a_fisher_that_overflows_float32_is_not_turned_into_an_embedding() -> None:
    layers = [("a", nn.Linear(2, 2)), ("b", nn.Linear(2, 3))]
    sums = {
        "a": torch.ones(2, dtype=torch.float64),
        "b": torch.tensor([1.0, 1e300, 1.0], dtype=torch.float64),
    }
    with pytest.raises(
        FisherError,
        match=r"layer 'b' is not finite in float32 at 1 of its 3 filters \(first: filter 1\)",
    ):
        filter_values(sums, 1, layers)


def test_constant_images_have_an_exact_finite_fisher() -> None:
    """All-constant images (zero variance under GroupNorm / LayerNorm) against brute force."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.LayerNorm(16),
        nn.Linear(16, 3),
    ).eval()
    inputs = torch.randn(5, 3, 6, 6)
    inputs[1] = 0.0
    inputs[3] = 2.5
    layers = embedded_layers(net, "6")
    ids = torch.arange(5)
    with torch.enable_grad(), LayerFisherTaps(net, layers) as taps:
        sums, count = batch_filter_sums(
            net, taps, inputs, ids, torch.ones(5, dtype=torch.bool), "exact", 0
        )
    hessian, _ = filter_values(sums, count, layers)
    reference = torch.cat([v for v in brute_force_fisher(net, inputs, "6").values()]).float()
    assert torch.isfinite(hessian).all()
    torch.testing.assert_close(hessian, reference, rtol=EXACT_RTOL, atol=1e-12)


class _Standardised(torch.utils.data.Dataset):
    """Per-image standardisation, a common transform: a constant image becomes 0/0 = NaN."""

    def __init__(self, data: ToyImages) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.data[index]
        return (image - image.mean()) / image.std(), label


def test_constant_image_made_nan_by_a_transform_is_named() -> None:
    data = ToyImages(24)
    data.images[17] = 0.0  # a black image
    probe = randomise_batchnorm(TinyConvNet()).eval()
    with pytest.raises(DatasetError, match=r"NaN or infinite values \(at dataset indices \[17\]\)"):
        Task2Vec(probe, **{**TASK2VEC, "max_samples": None, "balanced_sampling": False}).embed(
            _Standardised(data)
        )
    embedding = Task2Vec(probe, **TASK2VEC).embed(data)  # the constant image itself is fine
    assert torch.isfinite(embedding.hessian).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_mixed_overflow_on_gpu_is_reported() -> None:
    """End to end under precision='16-mixed': logits fine in float32, beyond 65504 in float16."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        net[3].weight.mul_(3e5)
    data = ToyImages(24, size=8)
    options = {**TASK2VEC, "accelerator": "gpu", "head_epochs": 0, "reset_head": False}
    assert torch.isfinite(Task2Vec(net, **options).embed(data).hessian).all()
    with pytest.raises(FisherError, match=r"float16.*bf16-mixed.*dataset indices"):
        Task2Vec(net, precision="16-mixed", **options).embed(data)
