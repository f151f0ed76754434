"""A hostile or careless user, second sweep: every case backs a row of docs/reliability.md.

Lost files (a ``config.yaml`` replaced by Lightning's, ``save`` over an existing file), silently
wrong artifacts (a sweep that resumes another task's artifact, a checkpoint of another task or
probe, Trainer limits that do nothing, comparisons without a probe fingerprint), code and paths
from data (a config's ``class_path``, iNat index paths, task names with terminal escapes,
spreadsheet formulas or mathtext), memory (YAML alias bombs, huge task ranges and template
widths, batches that cannot fit, decompression bombs) and tracebacks where one line is due.

Checks that would allocate gigabytes if the code under test had no bound run in a child
process with a 6 GiB address-space limit, so that a regression fails instead of exhausting the
machine.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("timm")

from t2v_lightning import Task2Vec, get_probe
from t2v_lightning.data import get_task
from t2v_lightning.embedding import (
    EmbeddingFileError,
    IncompatibleEmbeddingsError,
    TaskEmbedding,
)
from t2v_lightning.features import DatasetError
from t2v_lightning.similarity.distance import pdist, task_distance
from t2v_lightning.similarity.selection import select_expert
from tests.conftest import TinyConvNet, ToyImages
from tests.test_hostile import SUBPROCESS_ENV, no_work, small_embedding
from tests.test_reliability_cli import PROBE, one_line_error, run_cli

QUIET = ["--trainer.enable_progress_bar", "false"]
TINY = ["--data.max_samples", "8", "--data.input_size", "16", *QUIET]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # lightning_logs/ lands here
    return tmp_path


def run_limited(code: str, cwd: Path, limit_gib: int = 6) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child Python whose address space is limited to ``limit_gib`` GiB."""
    limit = limit_gib * 2**30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=SUBPROCESS_ENV,
        preexec_fn=cap,
        capture_output=True,
        text=True,
        timeout=300,
    )


def artifact(values: list[float], name: str, **meta: Any) -> TaskEmbedding:
    n = len(values)
    return TaskEmbedding(
        torch.tensor(values),
        torch.ones(n),
        {"fc": (0, n)},
        {"probe": "toy", "probe_fingerprint": "fp", "task_name": name, **meta},
    )


# ============================================================================================
# 1. Never lose a file
# ============================================================================================


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_fit_and_validate_with_the_logger_off_keep_an_existing_config_yaml(
    workdir: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    mine = "data:\n  name: digits\n# my own notes, not Lightning's\n"
    (workdir / "config.yaml").write_text(mine)
    code, err = run_cli(
        [
            command,
            "--config",
            "config.yaml",
            *PROBE,
            *TINY,
            "--trainer.max_epochs",
            "1",
            "--trainer.logger",
            "false",
        ],
        capsys,
    )
    assert code == 0, err
    assert (workdir / "config.yaml").read_text() == mine
    assert not [p for p in workdir.iterdir() if p.name.startswith(".config.yaml")]


def test_save_never_replaces_an_existing_file_unless_asked(tmp_path: Path) -> None:
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes, not an artifact")
    with pytest.raises(FileExistsError, match="already exists"):
        small_embedding().save(notes)
    assert notes.read_text() == "my notes, not an artifact"
    small_embedding(1).save(notes, overwrite=True)
    assert TaskEmbedding.load(notes).name == "t1"


# ============================================================================================
# 2. Resume only what matches; checkpoints, Trainer limits, fingerprints
# ============================================================================================

SWEEP = [
    "embed",
    *PROBE,
    *TINY,
    "--trainer.max_epochs",
    "1",
    "--datasets",
    "digits_0_4",
    "digits_5_9",
    "--output",
    "e/{task}.safetensors",
]


def test_a_sweep_resumes_only_artifacts_of_the_same_task_and_settings(
    workdir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    code, err = run_cli(SWEEP, capsys)
    assert code == 0, err
    first, second = (
        workdir / "e" / "digits_0_4.safetensors",
        workdir / "e" / "digits_5_9.safetensors",
    )
    second.write_bytes(first.read_bytes())  # another task's artifact at this task's path
    code, err = run_cli(SWEEP, capsys)
    assert code == 2, err
    line = one_line_error(err)
    assert "digits_5_9.safetensors exists but was made with other settings" in line
    assert "dataset: 'digits_0_4' in the file, 'digits_5_9' now" in line
    assert "--resume_mismatch reembed" in line
    # other settings that change the numbers stop the sweep too, naming the setting
    for extra, words in (
        (["--model.estimator", "batch"], "estimator: 'per_sample' in the file"),
        (["--data.max_samples", "9"], "max_samples: 8 in the file, 9 now"),
        (["--model.seed", "3"], "seed: 0 in the file, 3 now"),
    ):
        code, err = run_cli([*SWEEP, *extra], capsys)
        assert code == 2 and words in one_line_error(err), err
    # asked for: the mismatching task is embedded again, the matching one skipped
    code, err = run_cli([*SWEEP, "--resume_mismatch", "reembed"], capsys)
    assert code == 0, err
    assert TaskEmbedding.load(second).meta["dataset"] == "digits_5_9"
    assert "skipping digits_0_4" in caplog.text
    caplog.clear()
    code, err = run_cli(SWEEP, capsys)  # now everything matches
    assert code == 0 and "(2 already done)" in caplog.text


def test_a_checkpoint_of_another_task_or_probe_is_refused_naming_both(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, err = run_cli(
        ["fit", *PROBE, *TINY, "--data.name", "digits_0_4", "--trainer.max_epochs", "1"], capsys
    )
    assert code == 0, err
    (checkpoint,) = (workdir / "lightning_logs").rglob("*.ckpt")
    no_work(monkeypatch)
    code, err = run_cli(
        ["embed", *PROBE, *TINY, "--data.name", "digits_5_9", "--ckpt_path", str(checkpoint)],
        capsys,
    )
    assert code == 2, err
    line = one_line_error(err)
    assert "fitted on --data.name='digits_0_4'" in line and "'digits_5_9' was asked" in line
    code, err = run_cli(
        [
            "embed",
            "--model.probe",
            "resnet34",
            *TINY,
            "--data.name",
            "digits_0_4",
            "--ckpt_path",
            str(checkpoint),
        ],
        capsys,
    )
    assert code == 2, err
    line = one_line_error(err)
    assert "--model.probe='timm:test_efficientnet'" in line and "'resnet34' was asked" in line
    # validate (and fit) read the same checkpoint through the same check
    code, err = run_cli(
        ["validate", *PROBE, *TINY, "--data.name", "digits_5_9", "--ckpt_path", str(checkpoint)],
        capsys,
    )
    assert code == 2, err
    line = one_line_error(err)
    assert "fitted on --data.name='digits_0_4'" in line and "'digits_5_9' was asked" in line


@pytest.mark.parametrize(
    "limit",
    [
        ["--trainer.limit_train_batches", "2"],
        ["--trainer.max_time", "00:00:01:00"],
        ["--trainer.max_steps", "3"],
    ],
    ids=lambda a: a[0],
)
def test_embed_refuses_trainer_limits_it_cannot_apply(
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    limit: list[str],
) -> None:
    no_work(monkeypatch)
    code, err = run_cli(["embed", *PROBE, *TINY, "--data.name", "digits", *limit], capsys)
    assert code == 2, err
    line = one_line_error(err)
    assert limit[0] in line and "cannot take effect in 't2v embed'" in line


def test_fast_dev_run_is_a_smoke_test_that_writes_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    code, err = run_cli(
        [
            "embed",
            *PROBE,
            *TINY,
            "--data.name",
            "digits",
            "--output",
            "smoke.safetensors",
            "--trainer.fast_dev_run",
            "true",
        ],
        capsys,
    )
    assert code == 0, err
    assert "smoke.safetensors not written" in caplog.text
    assert not (workdir / "smoke.safetensors").exists()
    # a later sweep embeds the task for real: nothing was left to skip
    code, err = run_cli(
        [
            "embed",
            *PROBE,
            *TINY,
            "--data.name",
            "digits",
            "--output",
            "smoke.safetensors",
            "--trainer.max_epochs",
            "1",
        ],
        capsys,
    )
    assert code == 0 and TaskEmbedding.load(workdir / "smoke.safetensors").meta["head_epochs"] == 1


def test_embeddings_without_a_fingerprint_or_layers_are_compared_only_when_assumed(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = artifact([0.5, 1.0, 2.0], "real")
    bare = TaskEmbedding(
        torch.tensor([2.0, 1.0, 0.5]), torch.ones(3), {"fc": (0, 3)}, {"task_name": "bare"}
    )
    flat = TaskEmbedding(
        torch.tensor([1.0, 1.0, 0.5]),
        torch.ones(3),
        {},
        {"probe_fingerprint": "fp", "task_name": "flat"},
    )
    for other, missing in ((bare, "no probe fingerprint"), (flat, "no layer table")):
        with pytest.raises(IncompatibleEmbeddingsError, match=missing):
            task_distance(real, other)
        with pytest.raises(IncompatibleEmbeddingsError, match="assume_comparable"):
            pdist([real, other])
        with pytest.raises(IncompatibleEmbeddingsError, match=missing):
            select_expert(real, [artifact([1.0, 1.0, 1.0], "e"), other])
        assert task_distance(real, other, assume_comparable=True) > 0
    files = [str(e.save(workdir / f"{e.name}.safetensors")) for e in (real, bare)]
    code, err = run_cli(["distance", *files], capsys)
    assert code == 2 and "--assume_comparable" in one_line_error(err)
    code, err = run_cli(["select", "--target", files[0], "--experts", files[1]], capsys)
    assert code == 2 and "no probe fingerprint" in one_line_error(err)
    code, err = run_cli(["distance", *files, "--assume_comparable"], capsys)
    assert code == 0, err


# ============================================================================================
# 3. No code, no path, no markup from data
# ============================================================================================


def test_a_config_class_path_outside_the_allowed_namespaces_is_never_imported(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "zen.yaml").write_text("trainer:\n  logger:\n    class_path: this.Nope\n")
    code, out, err = _run_with_stdout(["embed", *PROBE, "--config", "zen.yaml"], capsys)
    assert code == 2, err
    assert "Beautiful is better than ugly" not in out  # the module 'this' was not imported
    line = one_line_error(err)
    assert "'this.Nope' is not allowed" in line and "t2v imports classes only from" in line
    # python -m puts the working folder first on sys.path: a module there must not run either
    (workdir / "evil_mod.py").write_text("open('EVIL_RAN', 'w').close()\n")
    (workdir / "evil.yaml").write_text("trainer:\n  callbacks:\n    - class_path: evil_mod.X\n")
    result = subprocess.run(
        [sys.executable, "-m", "t2v_lightning.cli", "embed", *PROBE, "--config", "evil.yaml"],
        cwd=workdir,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "'evil_mod.X' is not allowed" in one_line_error(result.stderr)
    assert not (workdir / "EVIL_RAN").exists()


def _run_with_stdout(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from tests.cli_runner import run_t2v

    return run_t2v(args, capsys)


def test_inat_index_paths_outside_the_data_root_are_refused(tmp_path: Path) -> None:
    from tests.test_data_cub_inat import tiny_jpeg, write_inat

    root = tmp_path / "data"
    inat = write_inat(root)
    secret = tmp_path / "secret.jpg"  # a readable image outside the data root
    tiny_jpeg(secret, (1, 2, 3))
    index = json.loads((inat / "train2018.json").read_text())
    for image, bad in zip(
        index["images"], [str(secret), "../../secret.jpg", "train_val2018/../../../secret.jpg"]
    ):
        image["file_name"] = bad
        (inat / "train2018.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match="leads outside the data folder") as caught:
            task = get_task("inat2018", str(root), task_id=0)
            [task.dataset[i] for i in range(len(task.dataset))]  # type: ignore[arg-type]
        assert "train2018.json" in str(caught.value) and repr(bad) in str(caught.value)
        image["file_name"] = "train_val2018/x.jpg"


def test_task_names_from_artifacts_are_escaped_for_terminal_csv_and_figure(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["\x1b[2J\x1b[31mred", '=HYPERLINK("http://x","click")', "costs $5 and $6", "-2+3"]
    files = [
        str(artifact([0.5 + i, 1.0, 2.0 - 0.3 * i], name).save(workdir / f"{i}.safetensors"))
        for i, name in enumerate(names)
    ]
    code, out, err = _run_with_stdout(
        ["distance", *files, "--csv", "m.csv", "--out", "m.png"], capsys
    )
    assert code == 0, err
    assert "\x1b" not in out and "\\x1b[2J" in out
    rows = list(csv.reader((workdir / "m.csv").open()))
    assert rows[0][1:] == ["\\x1b[2J\\x1b[31mred", "'" + names[1], names[2], "'-2+3"]
    assert [row[0] for row in rows[1:]] == rows[0][1:]
    assert float(rows[1][2]) > 0  # numbers stay numbers
    assert (workdir / "m.png").stat().st_size > 1000  # two '$' did not break the figure
    code, out, err = _run_with_stdout(
        ["select", "--target", files[0], "--experts", *files[1:]], capsys
    )
    assert code == 0 and "\x1b" not in out, err


# ============================================================================================
# 4. Bounded memory before work
# ============================================================================================


def test_a_yaml_bomb_huge_task_ranges_and_template_widths_are_refused_before_allocating(
    workdir: Path,
) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    (workdir / "bomb.yaml").write_text("\n".join(lines) + "\n")
    assert (workdir / "bomb.yaml").stat().st_size < 500  # 9**9 = 387 million strings expanded
    result = run_limited(
        """
        import sys
        from t2v_lightning.cli import embedding_jobs, main, parse_task_ids
        for call in (lambda: parse_task_ids('0-9999999999'),
                     lambda: parse_task_ids('0-9999999999', 5),
                     lambda: embedding_jobs(['digits'], 'data', None, None,
                                            'o/{task:>2000000000}.safetensors')):
            try:
                call()
            except ValueError as err:
                print(err)
        sys.stdout.flush()
        main(['embed', '--model.probe', 'timm:test_efficientnet', '--config', 'bomb.yaml'])
        """,
        workdir,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "expands to more than 100,000 values" in one_line_error(result.stderr)
    lines = result.stdout.splitlines()
    assert "lists more than 100,000 task ids" in lines[0]
    assert "task ids [5, 6, 7, 8, 9] are out of range" in lines[1]
    assert "asks for 2,000,000,000 characters; a file name holds at most 255" in lines[2]


def test_a_batch_that_cannot_fit_in_memory_is_one_line_before_the_pass(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import t2v_lightning.input_checks as input_checks

    no_work_after_prepare = Task2Vec(
        TinyConvNet().eval(),
        max_samples=8,
        batch_size=8,
        head_epochs=0,
        progress_bar=False,
        accelerator="cpu",
    )
    monkeypatch.setattr(input_checks, "_available_memory", lambda device: 20_000)
    with pytest.raises(DatasetError, match=r"one batch of 8 .* more than the 0\.0 GiB available"):
        no_work_after_prepare.embed(ToyImages(n=12))
    monkeypatch.setattr(input_checks, "_available_memory", lambda device: 40 * 2**20)
    code, err = run_cli(
        [
            "embed",
            *PROBE,
            "--data.name",
            "digits",
            "--data.max_samples",
            "100",
            "--data.input_size",
            "256",
            *QUIET,
            "--output",
            "big.safetensors",
        ],
        capsys,
    )
    assert code == 2, err
    line = one_line_error(err)
    assert "one batch of 100" in line and "--data.batch_size" in line
    assert not (workdir / "big.safetensors").exists()


def test_images_beyond_the_pixel_limit_are_refused_before_decoding(tmp_path: Path) -> None:
    from PIL import Image

    from t2v_lightning.data.cub_inat import ImageFileDataset
    from t2v_lightning.safety import MAX_IMAGE_PIXELS, check_image_pixels

    files = []
    for side in (16000, 10000):  # 256 and 100 megapixels in a few hundred KB
        path = tmp_path / f"bomb_{side}.png"
        Image.new("1", (side, side)).save(path, optimize=True)
        files.append(path)
    assert max(p.stat().st_size for p in files) < 1_000_000
    dataset = ImageFileDataset(files, [0, 1], transform=lambda image: torch.zeros(1))
    for index, side in enumerate((16000, 10000)):
        with pytest.raises(ValueError, match=f"bomb_{side}.png.*limit of 50,000,000 pixels"):
            dataset[index]
    check_image_pixels((MAX_IMAGE_PIXELS, 1), "ok.png")
    with pytest.raises(ValueError, match=r"'big\.png' is 7072 x 7072 pixels"):
        check_image_pixels((7072, 7072), "big.png")


# ============================================================================================
# 5, 6. Checked before the work; one line (or a ValueError / TypeError naming the argument)
# ============================================================================================


def test_probes_made_for_another_input_size_fail_on_one_example(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = get_task("digits", "data", input_size=32)
    for name in ("timm:vit_tiny_patch16_224", "alexnet", "inception_v3"):
        t2v = Task2Vec(
            get_probe(name, num_classes=10),
            max_samples=4,
            batch_size=4,
            head_epochs=0,
            progress_bar=False,
            accelerator="cpu",
            skip_layers=0,
            reset_head=False,
        )
        with pytest.raises(DatasetError, match=r"cannot take dataset index \d+ .*\(3, 32, 32\)"):
            t2v.embed(task.dataset)
    code, err = run_cli(
        [
            "embed",
            "--model.probe",
            "timm:vit_tiny_patch16_224",
            "--data.name",
            "digits",
            "--data.input_size",
            "32",
            "--data.max_samples",
            "4",
            *QUIET,
            "--trainer.max_epochs",
            "0",
        ],
        capsys,
    )
    assert code == 2, err
    assert "Input height (32) doesn't match model (224)" in one_line_error(err)


def test_a_text_probe_on_an_image_task_is_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    try:
        get_probe("text:all-MiniLM-L6-v2")
    except Exception as err:  # the text extra's weights are not installed here
        pytest.skip(f"no offline text probe: {err}")
    code, err = run_cli(
        [
            "embed",
            "--model.probe",
            "text:all-MiniLM-L6-v2",
            *TINY,
            "--data.name",
            "digits",
            "--trainer.max_epochs",
            "0",
        ],
        capsys,
    )
    assert code == 2, err
    assert "cannot take dataset index" in one_line_error(err)


def test_a_failed_download_is_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets as tvd

    def unreachable(self: Any) -> None:
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz: <urlopen error "
            "[Errno -2] Name or service not known>"
        )

    monkeypatch.setattr(tvd.KMNIST, "download", unreachable)
    code, err = run_cli(
        [
            "embed",
            *PROBE,
            *TINY,
            "--data.name",
            "kmnist",
            "--data.root",
            "dl",
            "--data.download",
            "true",
        ],
        capsys,
    )
    assert code == 2, err
    line = one_line_error(err)
    assert "downloading 'kmnist' into dl failed" in line and "Name or service not known" in line


def test_an_empty_artifact_is_refused_everywhere(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import t2v_lightning.embedding as embedding_module

    empty = TaskEmbedding(torch.zeros(0), torch.zeros(0), {}, {"probe_fingerprint": "fp"})
    with pytest.raises(ValueError, match="has no entries"):
        empty.save(workdir / "empty.safetensors")
    with pytest.raises(ValueError, match="has no entries"):
        pdist([artifact([1.0], "one"), empty])
    # an empty artifact written by other means (an older version, another tool)
    header = {
        "format": embedding_module.FORMAT_NAME,
        "format_version": "2",
        "layers": "[]",
        "meta": json.dumps({"task_name": "empty"}),
    }
    header["checksum"] = embedding_module._checksum(
        header["layers"], header["meta"], torch.zeros(0), torch.zeros(0)
    )
    embedding_module._write_safetensors(
        {"hessian": torch.zeros(0), "scale": torch.zeros(0)},
        str(workdir / "empty.safetensors"),
        metadata=header,
    )
    with pytest.raises(EmbeddingFileError, match="empty embedding"):
        TaskEmbedding.load(workdir / "empty.safetensors")
    other = str(artifact([1.0, 2.0], "x").save(workdir / "x.safetensors"))
    for args in (
        ["distance", "empty.safetensors", other],
        ["select", "--target", other, "--experts", "empty.safetensors"],
    ):
        code, err = run_cli(args, capsys)
        assert code == 2 and "empty embedding" in one_line_error(err), err


def test_a_figure_without_a_known_extension_is_refused_before_anything_is_written(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [
        str(artifact([1.0 + i, 2.0], f"t{i}").save(workdir / f"{i}.safetensors")) for i in range(2)
    ]
    for out, words in (("matrix", "has no extension"), ("matrix.xyz", "has the extension .xyz")):
        code, err = run_cli(["distance", *files, "--csv", "m.csv", "--out", out], capsys)
        assert code == 2, err
        line = one_line_error(err)
        assert f"--out '{out}' {words}" in line and ".png" in line
        assert not (workdir / "m.csv").exists() and not (workdir / out).exists()


def test_python_arguments_of_the_wrong_type_are_named() -> None:
    class Float64Images(ToyImages):
        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            image, label = super().__getitem__(index)
            return image.double(), label

    t2v = Task2Vec(
        TinyConvNet().eval(),
        max_samples=8,
        batch_size=4,
        head_epochs=0,
        progress_bar=False,
        accelerator="cpu",
    )
    with pytest.raises(DatasetError, match=r"dataset index \d+ .* is float64 .* \.float\(\)"):
        t2v.embed(Float64Images(n=12))
    with pytest.raises(
        ValueError, match="num_classes must be a positive integer or None, got True"
    ):
        get_probe("resnet18", num_classes=True)
    for size in ("32", 32.5):
        with pytest.raises(TypeError, match=f"input_size must be an int .* got {size!r}"):
            get_task("digits", "data", input_size=size)  # type: ignore[arg-type]


def test_a_blocked_checkpoint_folder_and_a_dangling_output_link_fail_before_any_work(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_work(monkeypatch)
    (workdir / "blocked").write_text("a file where the checkpoint folder should be")
    code, err = run_cli(
        ["embed", *PROBE, *TINY, "--data.name", "digits", "--fisher_checkpoint_dir", "blocked"],
        capsys,
    )
    assert code == 2, err
    assert "blocked is a file, not a folder" in one_line_error(err)
    os.symlink(workdir / "nowhere" / "gone.safetensors", workdir / "link.safetensors")
    code, err = run_cli(
        ["embed", *PROBE, *TINY, "--data.name", "digits", "--output", "link.safetensors"], capsys
    )
    assert code == 2, err
    assert "is a symbolic link to" in one_line_error(err)
    with pytest.raises(ValueError, match=r"symbolic link to .* which does not exist"):
        small_embedding().save(workdir / "link.safetensors")
    assert os.path.islink(workdir / "link.safetensors")
