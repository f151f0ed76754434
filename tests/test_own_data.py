"""Your own data: image folders, Hugging Face datasets, CSV / JSONL text tasks.

Every file is written here: PNG and JPEG images through PIL, Parquet through ``datasets`` /
``pyarrow``, JSON lines and CSV by hand. Nothing is downloaded (the Hugging Face builders used
are the packaged ``parquet``, ``json``, ``csv`` and ``imagefolder`` ones).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
PIL = pytest.importorskip("PIL")
datasets = pytest.importorskip("datasets")

from PIL import Image  # noqa: E402

from t2v_lightning.data import TaskDataModule, get_task  # noqa: E402
from t2v_lightning.data.folders import open_image, scan_image_folder, task_folders  # noqa: E402
from t2v_lightning.data.sources import label_ids  # noqa: E402
from t2v_lightning.data.task import IMAGENET_MEAN, IMAGENET_STD, DataSourceError  # noqa: E402
from t2v_lightning.embedding import TaskEmbedding  # noqa: E402
from tests.cli_runner import run_t2v  # noqa: E402

FAST = [
    "--model.probe",
    "timm:test_efficientnet",
    "--data.input_size",
    "16",
    "--data.max_samples",
    "8",
    "--data.batch_size",
    "8",
    "--trainer.max_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]
TEXT = [
    "--model.probe",
    "text:all-MiniLM-L6-v2",
    "--data.max_samples",
    "8",
    "--data.batch_size",
    "8",
    "--trainer.max_epochs",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.fixture(autouse=True)
def _hf_cache_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``datasets`` prepares splits in a cache: keep it in the test's folder, offline."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # lightning_logs/ and outputs land here
    return tmp_path


def write_image(path: Path, seed: int, size: tuple[int, int] = (30, 24)) -> np.ndarray:
    """A random RGB image as PNG or JPEG (by extension); returns its pixels."""
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def image_task(
    folder: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4, seed: int = 0
) -> Path:
    """``folder/<class>/<i>.png|jpg``: PNG and JPEG mixed."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(folder / name / f"{i}.{'png' if i % 2 else 'jpg'}", seed + 100 * c + i)
    return folder


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ------------------------------------------------------------------------------ image folders
def test_image_folder_classes_labels_and_preprocessing(tmp_path: Path) -> None:
    from torchvision.transforms import functional as TF

    root = image_task(tmp_path / "pets", classes=("zebra", "ant", "Bee"))
    task = get_task("imagefolder", str(root), input_size=20)
    assert task.num_classes == 3 and task.name == "pets"
    assert task.metadata["class_names"] == ["Bee", "ant", "zebra"]  # sorted, as ImageFolder
    assert task.metadata["class_counts"] == [4, 4, 4] and task.metadata["skipped_files"] == 0
    assert task.dataset.targets == [0] * 4 + [1] * 4 + [2] * 4  # type: ignore[attr-defined]
    image, label = task.dataset[5]
    assert label == 1 and image.shape == (3, 20, 20)
    # ImageNet evaluation preprocessing: shorter side to round(20 * 256 / 224) = 23, center crop
    with Image.open(root / "ant" / "1.png") as raw:
        expected = TF.center_crop(TF.resize(raw.convert("RGB"), 23), [20, 20])
    reference = TF.normalize(TF.to_tensor(expected), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(image, reference)
    # the JPEG decodes to what PIL decodes
    direct = np.asarray(Image.open(root / "ant" / "0.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(open_image(root / "ant" / "0.jpg")), direct)


def test_train_subfolder_is_used_and_val_is_the_held_out_split(tmp_path: Path) -> None:
    root = tmp_path / "task"
    image_task(root / "train", per_class=3)
    image_task(root / "val", per_class=2, seed=50)
    (root / "notes").mkdir()  # would be a third class if train/ were not used
    train = get_task("imagefolder", str(root))
    held_out = get_task("imagefolder", str(root), train=False)
    assert len(train.dataset) == 6 and len(held_out.dataset) == 4  # type: ignore[arg-type]
    assert train.metadata["folder"].endswith("train") and held_out.metadata["split"] == "test"
    with pytest.raises(FileNotFoundError, match="no val/ or test/"):
        get_task("imagefolder", str(image_task(tmp_path / "plain")), train=False)


def test_files_that_are_not_images_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = image_task(tmp_path / "t")
    (root / "cat" / "README.txt").write_text("not an image")
    (root / "dog" / "labels.csv").write_text("a,b\n")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")
    (root / "LICENSE").write_text("top-level files are not classes")
    with caplog.at_level("WARNING"):
        scan = scan_image_folder(root)
    assert len(scan.paths) == 8
    assert scan.skipped == ("cat/README.txt", "dog/.DS_Store", "dog/labels.csv")
    assert "skipped 3 file(s)" in caplog.text and "cat/README.txt" in caplog.text
    meta = get_task("imagefolder", str(root)).metadata
    assert meta["skipped_files"] == 3 and meta["skipped_examples"][0] == "cat/README.txt"


def test_a_file_with_an_image_extension_that_is_not_an_image_is_named(tmp_path: Path) -> None:
    root = image_task(tmp_path / "t")
    fake = root / "dog" / "9.jpg"
    fake.write_text("this is text")
    task = get_task("imagefolder", str(root), input_size=16)
    index = task.dataset.sources.index(str(fake))  # type: ignore[attr-defined]
    with pytest.raises(DataSourceError, match=r"9\.jpg is not an image that can be read"):
        task.dataset[index]
    truncated = root / "cat" / "9.png"
    truncated.write_bytes((root / "cat" / "1.png").read_bytes()[:60])
    with pytest.raises(DataSourceError, match=r"9\.png is not an image"):
        open_image(truncated)


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path: Path) -> None:
    from t2v_lightning.safety import MAX_IMAGE_PIXELS

    side = int(MAX_IMAGE_PIXELS**0.5) + 10  # a bilevel PNG: small file, large declared size
    big = tmp_path / "t" / "cat" / "big.png"
    big.parent.mkdir(parents=True)
    Image.new("1", (side, side)).save(big)
    assert big.stat().st_size < 2_000_000
    with pytest.raises(DataSourceError, match=rf"big\.png.* {side} x {side} pixels, more than"):
        open_image(big)
    with pytest.raises(DataSourceError, match="more than the limit"):
        open_image(big.read_bytes(), name="row 3 of column 'image'")


def test_task_folders_match_globs(tmp_path: Path) -> None:
    for name in ("birds", "boats", "cars"):
        image_task(tmp_path / name)
    (tmp_path / "a_file.txt").write_text("")
    assert [p.name for p in task_folders(tmp_path, ["*"])] == ["birds", "boats", "cars"]
    assert [p.name for p in task_folders(tmp_path, ["b*", "birds"])] == ["birds", "boats"]
    with pytest.raises(DataSourceError, match=r"'x\*' matches no task folder .*birds, boats, cars"):
        task_folders(tmp_path, ["x*"])


def test_folder_sweep_writes_one_artifact_per_task_and_resumes(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = workdir / "tasks"
    image_task(tasks / "birds", classes=("crow", "owl"))
    image_task(tasks / "cars", classes=("red", "blue", "green"), seed=7)
    image_task(tasks / "boats", seed=9)
    args = [
        "embed",
        "--data.name",
        "imagefolder",
        "--data.root",
        "tasks",
        "--datasets",
        "b*",
        "c*",
        "--output",
        "out/{task}-{task_id}.safetensors",
        *FAST,
    ]
    code, _, err = run_t2v(args, capsys)
    assert code == 0, err
    written = sorted(p.name for p in (workdir / "out").iterdir())
    assert written == ["birds-0.safetensors", "boats-1.safetensors", "cars-2.safetensors"]
    cars = TaskEmbedding.load(workdir / "out" / "cars-2.safetensors")
    assert cars.name == "cars" and cars.meta["dataset"] == "imagefolder"
    assert cars.meta["task_metadata"]["class_names"] == ["blue", "green", "red"]
    assert cars.meta["task_metadata"]["folder"].endswith("cars")
    before = {p: p.stat().st_mtime_ns for p in (workdir / "out").iterdir()}
    (workdir / "out" / "boats-1.safetensors").unlink()  # an interrupted sweep
    code, _, err = run_t2v(args, capsys)
    assert code == 0, err
    assert (workdir / "out" / "boats-1.safetensors").exists()  # embedded again
    for path, stamp in before.items():
        if path.name != "boats-1.safetensors":
            assert path.stat().st_mtime_ns == stamp  # skipped, left alone
    assert TaskEmbedding.load(workdir / "out" / "boats-1.safetensors").name == "boats"


def test_a_sweep_reads_each_task_folder_once(
    workdir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    tasks = workdir / "tasks"
    for name in ("birds", "cars"):
        (image_task(tasks / name) / "cat" / "notes.txt").write_text("not an image")
    caplog.set_level(logging.WARNING, logger="t2v_lightning.data.folders")
    code, _, err = run_t2v(
        [
            *("embed", "--data.name", "imagefolder", "--data.root", str(tasks)),
            *("--datasets", "*", "--output", "out/", *FAST),
        ],
        capsys,
    )
    assert code == 0, err
    skipped = [r.getMessage() for r in caplog.records if "skipped 1 file(s)" in r.getMessage()]
    folders = sorted(Path(message.split(": skipped")[0]).name for message in skipped)
    assert folders == ["birds", "cars"], skipped


def test_a_bad_task_folder_stops_the_sweep_before_any_work(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_task(workdir / "tasks" / "a_good")
    image_task(workdir / "tasks" / "b_single", classes=("only",))
    code, _, err = run_t2v(
        [
            "embed",
            "--data.name",
            "imagefolder",
            "--data.root",
            "tasks",
            "--datasets",
            "*",
            "--output",
            "out/",
            *FAST,
        ],
        capsys,
    )
    assert code == 2
    line = one_line_error(err)
    assert "b_single" in line and "single class" in line
    assert files_under(workdir / "out") == []


# ------------------------------------------------------------------------- bad input, one line
def _empty(root: Path) -> list[str]:
    (root / "empty").mkdir()
    return ["--data.name", "imagefolder", "--data.root", "empty"]


def _class_without_images(root: Path) -> list[str]:
    image_task(root / "t")
    (root / "t" / "fox").mkdir()
    (root / "t" / "fox" / "notes.txt").write_text("")
    return ["--data.name", "imagefolder", "--data.root", "t"]


def _single_class(root: Path) -> list[str]:
    image_task(root / "t", classes=("cat",))
    return ["--data.name", "imagefolder", "--data.root", "t"]


def _not_an_image(root: Path) -> list[str]:
    image_task(root / "t", per_class=2)
    (root / "t" / "dog" / "0.jpg").write_bytes(b"GIF89a but no")
    (root / "t" / "cat" / "0.jpg").write_text("text, not a JPEG")
    return ["--data.name", "imagefolder", "--data.root", "t", "--data.balanced_sampling", "false"]


def _missing_folder(root: Path) -> list[str]:
    return ["--data.name", "imagefolder", "--data.root", "nowhere"]


def _csv_missing_column(root: Path) -> list[str]:
    (root / "r.csv").write_text("sentence,label\na,x\nb,y\n")
    return ["--data.name", "csv", "--data.root", "r.csv"]


def _jsonl_float_labels(root: Path) -> list[str]:
    (root / "r.jsonl").write_text(
        "".join(json.dumps({"text": f"s{i}", "label": i / 2}) + "\n" for i in range(4))
    )
    return ["--data.name", "jsonl", "--data.root", "r.jsonl"]


def _jsonl_bad_line(root: Path) -> list[str]:
    (root / "r.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", label: 1}\n')
    return ["--data.name", "jsonl", "--data.root", "r.jsonl"]


def _parquet_missing_column(root: Path) -> list[str]:
    datasets.Dataset.from_dict({"review": ["a", "b"], "stars": [1, 2]}).to_parquet(
        str(root / "r.parquet")
    )
    return [
        "--data.name",
        "hf",
        "--data.path",
        "parquet",
        "--data.data_files",
        "r.parquet",
        "--data.text_column",
        "review",
    ]


def _parquet_float_labels(root: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": ["a", "b", "c"], "label": [0.5, 1.0, 0.5]}), root / "r.parquet"
    )
    return ["--data.name", "hf", "--data.path", "parquet", "--data.data_files", "r.parquet"]


def _json_list_labels(root: Path) -> list[str]:
    (root / "r.json").write_text(
        json.dumps([{"text": "a", "label": [1, 0]}, {"text": "b", "label": [0, 1]}])
    )
    return ["--data.name", "hf", "--data.path", "json", "--data.data_files", "r.json"]


def _hf_no_image_or_text(root: Path) -> list[str]:
    datasets.Dataset.from_dict({"x": [1, 2], "label": [0, 1]}).to_parquet(str(root / "r.parquet"))
    return ["--data.name", "hf", "--data.path", "parquet", "--data.data_files", "r.parquet"]


def _hf_missing_file(root: Path) -> list[str]:
    return ["--data.name", "hf", "--data.path", "parquet", "--data.data_files", "gone.parquet"]


def _text_task_with_an_image_probe(root: Path) -> list[str]:
    (root / "r.csv").write_text("text,label\na,x\nb,y\n")
    return ["--data.name", "csv", "--data.root", "r.csv"]


BAD_INPUTS = {
    "empty folder": (_empty, ["empty", "holds nothing"]),
    "class folder without images": (_class_without_images, ["fox", "holds no images"]),
    "single class": (_single_class, ["single class (cat)", "two classes"]),
    "file that is not an image": (_not_an_image, ["0.jpg is not an image"]),
    "missing folder": (_missing_folder, ["nowhere", "does not exist"]),
    "csv missing column": (
        _csv_missing_column,
        ["r.csv", "no column 'text'", "its columns are: sentence, label"],
    ),
    "jsonl float labels": (
        _jsonl_float_labels,
        ["r.jsonl", "'label'", "float 0.0", "integers or strings"],
    ),
    "jsonl bad line": (_jsonl_bad_line, ["r.jsonl, line 2", "not JSON"]),
    "parquet missing column": (
        _parquet_missing_column,
        ["r.parquet", "no column 'label'", "review, stars"],
    ),
    "parquet float labels": (
        _parquet_float_labels,
        ["r.parquet", "'label'", "float 0.5", "integers or strings"],
    ),
    "json list labels": (_json_list_labels, ["r.json", "list [1, 0]", "integers or strings"]),
    "hf no image or text column": (
        _hf_no_image_or_text,
        ["no 'image' or 'text' column", "x, label"],
    ),
    "hf missing data file": (_hf_missing_file, ["gone.parquet", "does not exist"]),
    "text task, image probe": (
        _text_task_with_an_image_probe,
        ["text task", "text:all-MiniLM-L6-v2"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_it_and_exit_2_with_nothing_written(
    case: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = BAD_INPUTS[case]
    data = make(workdir)
    code, _, err = run_t2v(["embed", *data, "--output", "out/", *FAST], capsys)
    assert code == 2, err
    line = one_line_error(err)
    for words in expected:
        assert words in line, line
    assert files_under(workdir / "out") == []


def test_options_of_one_source_are_refused_by_another(tmp_path: Path) -> None:
    root = image_task(tmp_path / "t")
    with pytest.raises(ValueError, match=r"label_column='y' .* not read by dataset 'imagefolder'"):
        get_task("imagefolder", str(root), label_column="y")
    with pytest.raises(ValueError, match=r"path='x' .*applies to: hf"):
        get_task("digits", "data", path="x")
    with pytest.raises(ValueError, match="needs path="):
        get_task("hf", "")
    with pytest.raises(ValueError, match="set max_samples"):
        get_task("hf", "", path="json", data_files=str(tmp_path / "t"), streaming=True)


# ------------------------------------------------------------------------------------ labels
def test_labels_are_numbered_in_sorted_order() -> None:
    assert label_ids(["dog", "cat", "emu", "cat"], "y", "f") == (
        [1, 0, 2, 0],
        ["cat", "dog", "emu"],
        "string",
    )
    assert label_ids([7, 3, 7], "y", "f") == ([1, 0, 1], ["3", "7"], "integer")
    # CSV cells: integers by value, not as strings ("10" after "9")
    assert label_ids(["10", "9", "2"], "y", "f", from_text=True) == (
        [2, 1, 0],
        ["2", "9", "10"],
        "integer",
    )
    assert label_ids(["10", "9", "b"], "y", "f", from_text=True)[1] == ["10", "9", "b"]
    # ClassLabel: by name, whatever the ids
    assert label_ids([0, 1, 1, 2], "y", "f", names=["zebra", "ant", "moth"]) == (
        [2, 0, 0, 1],
        ["ant", "moth", "zebra"],
        "ClassLabel",
    )
    for bad in ([True, False], [1.0, 2.0], [None, 1], [1, "a"], ["a", ""]):
        with pytest.raises(DataSourceError, match="integers or strings"):
            label_ids(bad, "y", "f")
    with pytest.raises(DataSourceError, match="-1 is not one of its 2 ClassLabel"):
        label_ids([0, -1], "y", "f", names=["a", "b"])


def test_hf_class_label_and_string_labels_are_mapped_and_recorded(tmp_path: Path) -> None:
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["zebra", "ant", "moth"]),
        }
    )
    data = datasets.Dataset.from_dict(
        {"text": ["a", "b", "c", "d"], "label": [0, 1, 2, 1]}, features=features
    )
    data.to_parquet(str(tmp_path / "c.parquet"))
    task = get_task("hf", "", path="parquet", data_files=str(tmp_path / "c.parquet"))
    assert task.metadata["label_kind"] == "ClassLabel"
    assert task.metadata["class_names"] == ["ant", "moth", "zebra"]
    assert task.dataset.targets.tolist() == [2, 0, 1, 0]  # type: ignore[attr-defined]
    assert task.metadata["modality"] == "text" and task.name == "c"

    rows = [
        {"sentence": s, "topic": t}
        for s, t in [("goal!", "sport"), ("a new star", "space"), ("penalty", "sport")]
    ]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(
        "hf",
        "",
        path="json",
        data_files=str(tmp_path / "s.jsonl"),
        text_column="sentence",
        label_column="topic",
    )
    assert task.metadata["class_names"] == ["space", "sport"]
    assert task.dataset.targets.tolist() == [1, 0, 1]  # type: ignore[attr-defined]
    assert task.dataset.texts == ["goal!", "a new star", "penalty"]  # type: ignore[attr-defined]


def test_hf_image_column_from_parquet_decodes_through_open_image(tmp_path: Path) -> None:
    import io

    pixels, blobs = [], []
    for i in range(6):
        buffer = io.BytesIO()
        array = write_image(tmp_path / f"src{i}.png", seed=i)
        Image.fromarray(array).save(buffer, format="PNG")
        pixels.append(array)
        blobs.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"image": blobs, "label": ["b", "a"] * 3}, features=features
    ).to_parquet(str(tmp_path / "imgs.parquet"))
    task = get_task(
        "hf",
        "",
        path="parquet",
        data_files=str(tmp_path / "imgs.parquet"),
        input_size=24,
        normalize="none",
    )
    assert task.metadata["modality"] == "image" and task.metadata["image_column"] == "image"
    assert task.metadata["class_names"] == ["a", "b"] and task.num_classes == 2
    image, label = task.dataset[2]
    assert label == 1 and image.shape == (3, 24, 24)
    # 30 x 24 -> shorter side round(24 * 256 / 224) = 27 -> center crop 24
    from torchvision.transforms import functional as TF

    expected = TF.to_tensor(TF.center_crop(TF.resize(Image.fromarray(pixels[2]), 27), [24, 24]))
    torch.testing.assert_close(image, expected)


def test_hf_local_imagefolder_builder(tmp_path: Path) -> None:
    image_task(tmp_path / "pets", classes=("dog", "cat"))
    task = get_task(
        "hf", "", path="imagefolder", data_files=str(tmp_path / "pets" / "**"), input_size=16
    )
    assert task.name == "pets" and task.metadata["class_names"] == ["cat", "dog"]
    assert sorted(task.dataset.targets) == [0] * 4 + [1] * 4  # type: ignore[attr-defined]
    assert task.dataset[0][0].shape == (3, 16, 16)


def test_streaming_reads_only_max_samples_rows(tmp_path: Path, _hf_cache_here: Path) -> None:
    rows = [{"text": f"sentence {i}", "label": ["neg", "pos"][i % 2]} for i in range(50)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(
        "hf", "", path="json", data_files=str(tmp_path / "big.jsonl"), streaming=True, max_samples=4
    )
    assert len(task.dataset) == 4 and task.metadata["num_examples"] == 4  # type: ignore[arg-type]
    assert task.dataset.texts == [f"sentence {i}" for i in range(4)]  # type: ignore[attr-defined]
    assert task.metadata["streaming"] is True
    assert not list(_hf_cache_here.rglob("*.arrow"))  # the split was not prepared on disk
    whole = get_task("hf", "", path="json", data_files=str(tmp_path / "big.jsonl"))
    assert len(whole.dataset) == 50 and list(_hf_cache_here.rglob("*.arrow"))  # type: ignore[arg-type]


def test_take_rows_stops_after_count() -> None:
    from t2v_lightning.data.hf import take_rows

    produced: list[int] = []

    def rows() -> Any:
        for i in range(1000):
            produced.append(i)
            yield {"text": str(i), "label": i % 2, "extra": i}

    stream = datasets.IterableDataset.from_generator(rows)
    taken = take_rows(stream, 7, ["text", "label"])
    assert taken == [{"text": str(i), "label": i % 2} for i in range(7)]
    assert len(produced) == 7


def test_streamed_images_and_the_data_module(tmp_path: Path) -> None:
    image_task(tmp_path / "pets", classes=("a", "b"), per_class=3)
    module = TaskDataModule(
        name="hf",
        root="",
        path="imagefolder",
        data_files=[str(tmp_path / "pets" / "**")],
        streaming=True,
        max_samples=5,
        input_size=16,
        balanced_sampling=False,
    )
    assert module.num_classes == 2 and module.task_metadata["num_examples"] == 5
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch[0].shape == (5, 3, 16, 16)


# ------------------------------------------------------------------------------- text files
def test_csv_and_jsonl_text_tasks_match_a_text_dataset(tmp_path: Path) -> None:
    from t2v_lightning.text import TextDataset

    rows = [("a wonderful film", "pos"), ("dull, too long", "neg"), ("a gem", "pos")]
    with open(tmp_path / "r.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        writer.writerows(rows)
    (tmp_path / "r.jsonl").write_text(
        "".join(json.dumps({"review": t, "sentiment": s}) + "\n" for t, s in rows)
    )
    reference = TextDataset([t for t, _ in rows], [1, 0, 1])
    for kind in ("csv", "jsonl"):
        task = get_task(
            kind, str(tmp_path / f"r.{kind}"), text_column="review", label_column="sentiment"
        )
        assert task.metadata["class_names"] == ["neg", "pos"] and task.name == "r"
        assert task.metadata["modality"] == "text" and task.num_classes == 2
        for key, value in reference.inputs.items():
            assert torch.equal(task.dataset.inputs[key], value)  # type: ignore[attr-defined]
        assert task.dataset.targets.tolist() == [1, 0, 1]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "text"), [("empty.csv", "text,label\n"), ("empty.jsonl", "\n\n")], ids=["csv", "jsonl"]
)
def test_a_text_file_without_rows_is_named(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataSourceError, match=f"^{re.escape(str(path))} has no rows$"):
        get_task(path.suffix[1:], str(path))


def test_text_tasks_through_the_command_line_and_yaml(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sentences = [
        ("what a great match", "sport"),
        ("the rocket launched", "space"),
        ("a late goal", "sport"),
        ("a comet passed", "space"),
    ] * 3
    with open(workdir / "news.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(sentences)
    code, _, err = run_t2v(
        ["embed", "--data.name", "csv", "--data.root", "news.csv", "--output", "out/", *TEXT],
        capsys,
    )
    assert code == 0, err
    from_csv = TaskEmbedding.load(workdir / "out" / "news.safetensors")
    assert from_csv.meta["task_metadata"]["class_names"] == ["space", "sport"]
    assert len(from_csv) == 25728
    # the same rows as Parquet through the hf dataset, from a YAML config
    datasets.Dataset.from_dict(
        {"text": [s for s, _ in sentences], "label": [t for _, t in sentences]}
    ).to_parquet("news.parquet")
    (workdir / "hf.yaml").write_text(
        "data:\n  name: hf\n  path: parquet\n  data_files: [news.parquet]\n"
        "output: out/hf_{task}.safetensors\n"
    )
    code, _, err = run_t2v(["embed", "--config", "hf.yaml", *TEXT], capsys)
    assert code == 0, err
    from_hf = TaskEmbedding.load(workdir / "out" / "hf_news.safetensors")
    assert from_hf.meta["task_metadata"]["path"] == "parquet"
    # same sentences, labels, sampling and seed: the same embedding
    torch.testing.assert_close(from_hf.hessian, from_csv.hessian, rtol=1e-5, atol=1e-12)


def test_image_folder_through_a_yaml_config(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("leaves", "flowers"):
        image_task(workdir / "plants" / name, seed=len(name))
    config = Path(__file__).resolve().parents[1] / "configs" / "imagefolder.yaml"
    code, _, err = run_t2v(
        [
            "embed",
            "--config",
            str(config),
            "--data.root",
            "plants",
            "--output",
            "out/{task}.safetensors",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(p.name for p in (workdir / "out").iterdir()) == [
        "flowers.safetensors",
        "leaves.safetensors",
    ]


def test_fit_then_embed_a_text_task_with_its_head(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        {"text": t, "label": i % 2}
        for i, t in enumerate(["good", "bad", "great", "awful", "fine", "poor", "nice", "dull"])
    ]
    (workdir / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = ["--data.name", "jsonl", "--data.root", "s.jsonl"]
    code, _, err = run_t2v(["fit", *data, *TEXT], capsys)
    assert code == 0, err
    checkpoint = next((workdir / "lightning_logs").rglob("*.ckpt"))
    code, _, err = run_t2v(
        ["embed", *data, "--ckpt_path", str(checkpoint), "--output", "s.safetensors", *TEXT], capsys
    )
    assert code == 0, err
    assert TaskEmbedding.load(workdir / "s.safetensors").meta["checkpoint"] == str(checkpoint)


def test_fit_and_validate_an_image_folder(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_task(workdir / "plain")  # no val/: fit without validation
    code, _, err = run_t2v(
        ["fit", "--data.name", "imagefolder", "--data.root", "plain", *FAST], capsys
    )
    assert code == 0, err
    code, _, err = run_t2v(
        ["validate", "--data.name", "imagefolder", "--data.root", "plain", *FAST], capsys
    )
    assert code == 2 and "no val/ or test/ subfolder" in one_line_error(err)
    image_task(workdir / "split" / "train")
    image_task(workdir / "split" / "val", per_class=2, seed=3)
    code, out, err = run_t2v(
        ["validate", "--data.name", "imagefolder", "--data.root", "split", *FAST], capsys
    )
    assert code == 0, err
    assert "val/accuracy" in out


@pytest.mark.parametrize("streaming", [False, True])
def test_an_image_column_of_another_name_is_found_and_read_undecoded(
    tmp_path: Path, streaming: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    import t2v_lightning.data.folders as folders

    blobs = []
    for i in range(6):
        buffer = io.BytesIO()
        Image.fromarray(write_image(tmp_path / f"p{i}.png", seed=i)).save(buffer, format="PNG")
        blobs.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"photo": datasets.Image(), "kind": datasets.Value("int64")})
    datasets.Dataset.from_dict({"photo": blobs, "kind": [3, 9] * 3}, features=features).to_parquet(
        str(tmp_path / "p.parquet")
    )
    opened: list[str] = []
    real = folders.open_image

    def counting(source: Any, name: str | None = None) -> Any:
        opened.append(type(source).__name__)
        return real(source, name)

    monkeypatch.setattr(folders, "open_image", counting)
    monkeypatch.setattr("t2v_lightning.data.hf.open_image", counting)
    task = get_task(
        "hf",
        "",
        path="parquet",
        data_files=str(tmp_path / "p.parquet"),
        label_column="kind",
        streaming=streaming,
        max_samples=4,
        input_size=16,
    )
    assert task.metadata["image_column"] == "photo" and task.metadata["class_names"] == ["3", "9"]
    assert len(task.dataset) == (4 if streaming else 6)  # type: ignore[arg-type]
    image, label = task.dataset[1]
    assert image.shape == (3, 16, 16) and label == 1
    assert opened == ["bytes"]  # decoded by open_image, from the stored bytes


def test_shell_lists_of_globs_and_files_reach_the_parser_as_lists() -> None:
    from t2v_lightning.cli import _expand_shorthands

    assert _expand_shorthands(
        [
            "embed",
            "--datasets",
            "*",
            "b?rds",
            "--data.data_files",
            "a.parquet",
            "b.parquet",
            "--data.streaming",
            "--overwrite",
        ]
    ) == [
        "embed",
        "--datasets",
        '["*", "b?rds"]',
        "--data.data_files",
        '["a.parquet", "b.parquet"]',
        "--data.streaming",
        "true",
        "--overwrite",
        "true",
    ]
    assert _expand_shorthands(["--datasets", "[digits,mnist]"]) == ["--datasets", "[digits,mnist]"]


def test_task_names_from_file_and_folder_names_are_safe_for_paths_and_terminals(
    tmp_path: Path,
) -> None:
    from t2v_lightning.data.sources import DataSource, source_label

    odd = tmp_path / "my reviews\x1b[2J.csv"
    odd.write_text("text,label\na,x\nb,y\n")
    assert get_task("csv", str(odd)).name == "my_reviews_2J"
    assert source_label("imagefolder", str(tmp_path / "a b" / "."), DataSource()) == "a_b"
    assert (
        source_label("hf", "", DataSource(path="user/some-set", config="en")) == "user__some-set_en"
    )
    assert (
        source_label("hf", "", DataSource(path="imagefolder", data_files=("d/cars/**",))) == "cars"
    )


def test_an_image_folder_with_a_text_probe_is_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_task(workdir / "t")
    code, _, err = run_t2v(
        [
            "embed",
            "--data.name",
            "imagefolder",
            "--data.root",
            "t",
            "--output",
            "out/",
            *FAST,
            "--model.probe",
            "text:all-MiniLM-L6-v2",
        ],
        capsys,
    )
    assert code == 2
    assert "holds images, but 'text:all-MiniLM-L6-v2' is a text probe" in one_line_error(err)
    assert files_under(workdir / "out") == []
