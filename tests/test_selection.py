"""Expert selection: the trivial embedding, the asymmetric score and a ranking with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import t2v_lightning
from t2v_lightning.embedding import IncompatibleEmbeddingsError, TaskEmbedding
from t2v_lightning.similarity.distance import task_distance
from t2v_lightning.similarity.selection import (
    ExpertRanking,
    asymmetric_distance,
    complexity,
    select_expert,
    trivial_embedding,
)

# cosine in float32 tiles against hand-computed float64 values with h ≫ ε
RTOL = 1e-5
META = {"probe": "toy", "probe_fingerprint": "fp"}


def embedding(values: list[float], name: str, scale: list[float] | None = None) -> TaskEmbedding:
    scale_t = torch.ones(len(values)) if scale is None else torch.tensor(scale)
    return TaskEmbedding(
        torch.tensor(values), scale_t, {"layer": (0, len(values))}, {**META, "task_name": name}
    )


def hand_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """SPEC cosine distance without ε (negligible for the O(1) values below)."""
    pa, pb = a / (a + b), b / (a + b)
    return 1.0 - float(pa @ pb / math.sqrt((pa @ pa) * (pb @ pb)))


def test_trivial_embedding_is_the_prior() -> None:
    source = TaskEmbedding(
        torch.tensor([0.5, 2.0, 3.0]),
        torch.tensor([1.0, 1.0, 4.0]),
        {"a": (0, 2), "b": (2, 3)},
        {**META, "task_name": "cub"},
    )
    trivial = trivial_embedding(source)
    assert torch.equal(trivial.hessian, source.scale)
    assert torch.equal(trivial.scale, source.scale)
    assert trivial.layers == source.layers
    assert trivial.meta["probe_fingerprint"] == "fp"
    assert trivial.name == "trivial" and trivial.meta["trivial_of"] == "cub"
    trivial.hessian[0] = 9.0  # a copy: the source is untouched
    assert source.scale[0] == 1.0
    # A task whose hessian equals its prior is at distance zero from the trivial embedding.
    assert complexity(trivial_embedding(source)) == pytest.approx(0.0, abs=1e-7)


def test_trivial_embedding_rejects_invalid_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        trivial_embedding(TaskEmbedding(torch.ones(2), torch.tensor([1.0, 0.0])))
    with pytest.raises(TypeError, match="TaskEmbedding"):
        trivial_embedding(torch.ones(2))  # type: ignore[arg-type]


# A constructed meta-task. With unit scales the trivial embedding is all ones, and a constant
# embedding is at cosine distance 0 from it (h/(h+1) and 1/(h+1) are parallel): "simple".
TARGET = [1.0, 4.0]
SIMPLE_NEAR = [1.0, 1.0]
COMPLEX_FAR = [1.0, 20.0]
# target' = (1/2, 4/5) and (1/2, 1/5): cos = (1/4 + 4/25) / sqrt((1/4 + 16/25)(1/4 + 1/25))
#   = 41 / sqrt(89 · 29)
# target' = (1/2, 1/6) and (1/2, 5/6): cos = 14 / sqrt(10 · 34)
# (1, 20)' = (1/2, 20/21) against the trivial (1/2, 1/21): cos = 521 / sqrt(2041 · 445)
EXPECTED_DISTANCE = {
    "simple-near": 1.0 - 41.0 / math.sqrt(89.0 * 29.0),  # 0.19297
    "complex-far": 1.0 - 14.0 / math.sqrt(340.0),  # 0.24074
}
EXPECTED_COMPLEXITY = {
    "simple-near": 0.0,
    "complex-far": 1.0 - 521.0 / math.sqrt(2041.0 * 445.0),  # 0.45332
}


def test_hand_computed_values() -> None:
    target = np.array(TARGET)
    for name, values in (("simple-near", SIMPLE_NEAR), ("complex-far", COMPLEX_FAR)):
        v = np.array(values)
        assert hand_cosine(target, v) == pytest.approx(EXPECTED_DISTANCE[name], abs=1e-12)
        assert hand_cosine(v, np.ones(2)) == pytest.approx(EXPECTED_COMPLEXITY[name], abs=1e-12)


def test_asymmetric_distance_formula() -> None:
    target = embedding(TARGET, "target")
    source = embedding(COMPLEX_FAR, "complex-far")
    expected = EXPECTED_DISTANCE["complex-far"] - 0.15 * EXPECTED_COMPLEXITY["complex-far"]
    assert asymmetric_distance(target, source) == pytest.approx(expected, rel=RTOL)
    assert asymmetric_distance(target, source, alpha=0.0) == pytest.approx(
        task_distance(target, source), rel=1e-12
    )
    # the complexity term is the source's, not the target's
    assert asymmetric_distance(target, source, alpha=1.0) == pytest.approx(
        task_distance(target, source) - complexity(source), rel=1e-12
    )
    assert asymmetric_distance(target, source, alpha=1.0) != pytest.approx(
        task_distance(target, source) - complexity(target), rel=1e-3
    )


def test_alpha_makes_the_complex_expert_win() -> None:
    target = embedding(TARGET, "target")
    experts = [embedding(SIMPLE_NEAR, "simple-near"), embedding(COMPLEX_FAR, "complex-far")]
    nearest = select_expert(target, experts, alpha=0.0)
    assert nearest.order == [0, 1] and nearest.best_name == "simple-near"
    # 0.24074 - 0.15 · 0.45332 = 0.17275 < 0.19297 - 0.15 · 0
    ranking = select_expert(target, experts)
    assert isinstance(ranking, ExpertRanking)
    assert ranking.order == [1, 0] and ranking.best == 1
    assert ranking.ranked_names == ["complex-far", "simple-near"]
    expected_scores = [
        EXPECTED_DISTANCE[n] - 0.15 * EXPECTED_COMPLEXITY[n] for n in ("simple-near", "complex-far")
    ]
    np.testing.assert_allclose(ranking.scores.numpy(), expected_scores, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(
        ranking.complexities.numpy(),
        [EXPECTED_COMPLEXITY[n] for n in ("simple-near", "complex-far")],
        rtol=RTOL,
        atol=1e-7,
    )
    assert t2v_lightning.select_expert is select_expert
    assert t2v_lightning.trivial_embedding is trivial_embedding
    assert t2v_lightning.asymmetric_distance is asymmetric_distance


def test_select_expert_matches_pairwise_scores_on_random_tasks() -> None:
    generator = torch.Generator().manual_seed(0)
    hessians = torch.exp(torch.randn(8, 40, generator=generator))
    experts = {
        f"expert{i}": TaskEmbedding(h, torch.ones(40), {"layer": (0, 40)}, META)
        for i, h in enumerate(hessians[1:])
    }
    target = TaskEmbedding(hessians[0], torch.ones(40), {"layer": (0, 40)}, META)
    for name in ("cosine", "jsd"):
        ranking = select_expert(target, experts, alpha=0.3, distance=name)
        assert ranking.names == list(experts)
        scores = [asymmetric_distance(target, e, 0.3, name) for e in experts.values()]
        np.testing.assert_allclose(ranking.scores.numpy(), scores, rtol=RTOL)
        assert ranking.order == sorted(range(7), key=lambda i: scores[i])


def test_ties_keep_the_candidates_order() -> None:
    target = embedding(TARGET, "target")
    twin = embedding(COMPLEX_FAR, "twin")
    ranking = select_expert(target, [embedding(COMPLEX_FAR, "first"), twin])
    assert ranking.order == [0, 1]


def test_errors() -> None:
    target = embedding(TARGET, "target")
    expert = embedding(SIMPLE_NEAR, "e")
    with pytest.raises(ValueError, match="alpha"):
        select_expert(target, [expert], alpha=float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        asymmetric_distance(target, expert, alpha="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="experts is empty"):
        select_expert(target, [])
    with pytest.raises(TypeError, match="target"):
        select_expert(None, [expert])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distance"):
        select_expert(target, [expert], distance="l2")  # type: ignore[arg-type]
    other_probe = TaskEmbedding(
        torch.ones(2),
        torch.ones(2),
        {"layer": (0, 2)},
        {"probe_fingerprint": "other", "task_name": "x"},
    )
    with pytest.raises(IncompatibleEmbeddingsError, match=r"'target'.*'x'"):
        select_expert(target, [other_probe])
