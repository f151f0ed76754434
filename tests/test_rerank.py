"""Task2Vec's shortlist reranked by a transferability estimator: library and ``t2v select``.

Tiny experts: one whose penultimate features carry the class (the per-channel means of
:class:`~tests.conftest.ToyImages`), two whose features remove exactly that signal. Task2Vec is
made to rank a feature-blind expert first; LogME over the top 3 must bring the informative one
to the top, and the order of the shortlist must be the estimator's, computed independently.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.similarity.selection import (
    model_outputs,
    ranked_experts,
    rerank_experts,
    select_expert,
)
from t2v_lightning.similarity.transferability import leep, logme
from tests.cli_runner import run_t2v
from tests.conftest import TOY_PROBE_META as META
from tests.conftest import ToyImages
from tests.conftest import toy_embedding as emb


class Expert(nn.Module):
    """Features: per-channel means (``informative``) or the image minus its channel means."""

    def __init__(self, informative: bool, seed: int) -> None:
        super().__init__()
        self.informative = informative
        generator = torch.Generator().manual_seed(seed)
        self.mix = nn.Parameter(
            torch.randn(3 if informative else 192, 5, generator=generator), requires_grad=False
        )
        self.fc = nn.Linear(5, 4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3), keepdim=True)
        body = means.flatten(1) if self.informative else (x - means).flatten(1)
        return body @ self.mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@pytest.fixture
def zoo() -> tuple[TaskEmbedding, dict[str, TaskEmbedding], dict[str, nn.Module]]:
    torch.manual_seed(0)
    target = emb([1.0, 2.0, 3.0], "target")
    experts = {
        "blind_a": emb([1.0, 2.0, 3.1], "blind_a"),
        "blind_b": emb([1.0, 2.2, 3.0], "blind_b"),
        "useful": emb([1.3, 2.0, 3.0], "useful"),
        "far": emb([3.0, 2.0, 1.0], "far"),
    }
    models = {
        "blind_a": Expert(False, 1),
        "blind_b": Expert(False, 2),
        "useful": Expert(True, 3),
        "far": Expert(True, 4),
    }
    return target, experts, models


def test_model_outputs_are_the_head_input_and_the_logits(
    zoo: tuple[TaskEmbedding, dict[str, TaskEmbedding], dict[str, nn.Module]],
) -> None:
    model = zoo[2]["useful"].train()
    data = ToyImages(n=25)
    features, logits, labels = model_outputs(model, data, batch_size=7)
    with torch.no_grad():
        assert torch.allclose(features, model.features(data.images), atol=1e-6)
        assert torch.allclose(logits, model(data.images), atol=1e-6)
    assert labels.tolist() == data.labels.tolist()
    assert model.training  # left as found


def test_rerank_orders_the_shortlist_by_the_estimator_and_keeps_the_rest(
    zoo: tuple[TaskEmbedding, dict[str, TaskEmbedding], dict[str, nn.Module]],
) -> None:
    target, experts, models = zoo
    data = ToyImages(n=60)
    plain = select_expert(target, experts, alpha=0.0)
    assert plain.ranked_names[:3] == ["blind_a", "blind_b", "useful"]  # Task2Vec's shortlist
    ranking = select_expert(target, experts, alpha=0.0, rerank="logme", models=models, data=data)
    expected = {}
    for name in plain.ranked_names[:3]:
        with torch.no_grad():
            expected[name] = logme(models[name].features(data.images), data.labels)
    assert ranking.ranked_names[:3] == sorted(expected, key=lambda n: -expected[n])
    assert ranking.best_name == "useful"
    assert ranking.ranked_names[3:] == plain.ranked_names[3:]
    assert ranking.rerank == "logme"
    assert ranking.transferability is not None
    for name, value in expected.items():
        assert float(ranking.transferability[ranking.names.index(name)]) == pytest.approx(value)
    assert math.isnan(float(ranking.transferability[ranking.names.index("far")]))
    assert torch.equal(ranking.scores, plain.scores)  # Task2Vec's scores are still reported
    rows = ranked_experts(ranking)
    assert rows[0].name == "useful" and rows[0].transferability == pytest.approx(expected["useful"])
    # LEEP reads the heads' predictions; top_k=1 changes nothing; the far expert is never run
    by_leep = rerank_experts(plain, {k: v for k, v in models.items() if k != "far"}, data, "leep")
    with torch.no_grad():
        theta = {n: torch.softmax(models[n](data.images).double(), 1) for n in expected}
    assert by_leep.ranked_names[:3] == sorted(expected, key=lambda n: -leep(theta[n], data.labels))
    assert rerank_experts(plain, models, data, "logme", top_k=1).ranked_names == plain.ranked_names


def test_rerank_refuses_what_it_cannot_do(
    zoo: tuple[TaskEmbedding, dict[str, TaskEmbedding], dict[str, nn.Module]],
) -> None:
    target, experts, models = zoo
    data = ToyImages(n=20)
    with pytest.raises(ValueError, match="needs the experts' models"):
        select_expert(target, experts, rerank="logme", data=data)
    with pytest.raises(ValueError, match="only used with rerank"):
        select_expert(target, experts, models=models)
    plain = select_expert(target, experts, alpha=0.0)
    with pytest.raises(ValueError, match=r"no model for the shortlisted expert.*useful"):
        rerank_experts(plain, {"blind_a": models["blind_a"], "blind_b": models["blind_b"]}, data)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        rerank_experts(plain, models, data, top_k=0)
    with pytest.raises(ValueError, match="rerank must be one of"):
        rerank_experts(plain, models, data, "gbc")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ t2v select
ARCH = "timm:resnet10t"


@pytest.fixture
def cli_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Artifacts of four experts and of a ``digits`` target, and three experts' checkpoints."""
    pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    from safetensors.torch import save_file

    from t2v_lightning.probe import get_probe

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "experts").mkdir()
    (tmp_path / "models").mkdir()
    names = ["alpha", "beta", "gamma", "delta"]
    for i, name in enumerate(names):
        values = np.exp(rng.normal(size=6) * (0.3 + 0.3 * i)).astype(np.float32)
        TaskEmbedding(
            torch.tensor(values), torch.ones(6), {"a": (0, 6)}, {**META, "task_name": name}
        ).save(tmp_path / "experts" / f"{name}.safetensors")
        torch.manual_seed(i)
        model = get_probe(ARCH, num_classes=3 + i)
        save_file(model.state_dict(), str(tmp_path / "models" / f"{name}.safetensors"))
    TaskEmbedding(
        torch.tensor(np.exp(rng.normal(size=6)).astype(np.float32)),
        torch.ones(6),
        {"a": (0, 6)},
        {**META, "task_name": "target", "probe": ARCH, "dataset": "digits", "input_size": 32},
    ).save(tmp_path / "target.safetensors")
    return names


def test_t2v_select_reranks_the_top_k_with_the_experts_checkpoints(
    cli_zoo: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.utils.data import Subset

    from t2v_lightning.data.registry import get_task
    from t2v_lightning.embedding import TaskEmbedding as Artifact
    from t2v_lightning.probe import get_probe

    base = ["select", "--target", "target.safetensors", "--experts", "experts", "--alpha", "0"]
    code, out, err = run_t2v(base, capsys)
    assert code == 0, err
    plain = [line.split()[1] for line in out.splitlines()[2:]]
    code, out, err = run_t2v(
        [
            *base,
            "--rerank",
            "logme",
            "--top_k",
            "3",
            "--models",
            "models",
            "--max_samples",
            "90",
            "--csv",
            "ranking.csv",
        ],
        capsys,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert "first 3 reranked by logme" in lines[0] and lines[1].split()[-1] == "logme"
    rows = [line.split() for line in lines[2:6]]
    # independently: the same 90 digits images, each checkpoint through get_probe
    task = get_task("digits", "data", train=True, input_size=32)
    keep = torch.randperm(len(task.dataset), generator=torch.Generator().manual_seed(0))[:90]
    data = Subset(task.dataset, sorted(keep.tolist()))
    expected = {}
    for name in plain[:3]:
        features, _, labels = model_outputs(
            get_probe(ARCH, weights=f"models/{name}.safetensors"), data
        )
        expected[name] = logme(features, labels)
    assert [r[1] for r in rows[:3]] == sorted(expected, key=lambda n: -expected[n])
    assert [r[1] for r in rows[3:]] == plain[3:] and rows[3][-1] == "nan"
    for row in rows[:3]:
        assert float(row[-1]) == pytest.approx(expected[row[1]], abs=6e-5)
    header = Path("ranking.csv").read_text().splitlines()[0]
    assert header.endswith(",logme")
    assert Artifact.load("target.safetensors").meta["dataset"] == "digits"


def test_t2v_select_rerank_mistakes_are_one_line(
    cli_zoo: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "select",
        "--target",
        "target.safetensors",
        "--experts",
        "experts",
        "--alpha",
        "0",
        "--rerank",
        "nce",
    ]
    code, _, err = run_t2v(base, capsys)
    assert code == 2 and "--rerank needs --models DIR" in err and "Traceback" not in err
    Path("models/alpha.safetensors").unlink()
    code, _, err = run_t2v([*base, "--models", "models", "--top_k", "4"], capsys)
    assert code == 2 and "no model for the shortlisted expert(s) alpha" in err
    code, _, err = run_t2v([*base, "--models", "models", "--rerank", "gbc"], capsys)
    assert code == 2 and "invalid choice: 'gbc'" in err
