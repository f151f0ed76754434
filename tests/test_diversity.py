"""Diversity coefficients against scipy statistics, and batch embedding with a fake embedder."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.spatial.distance import cosine as scipy_cosine
from torch.utils.data import Dataset, Subset

import t2v_lightning
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.similarity.distance import task_distance
from t2v_lightning.similarity.diversity import (
    DiversityCoefficient,
    cross_diversity_coefficient,
    diversity_coefficient,
    embed_batches,
)

RTOL = 1e-5  # float32 cosine tiles against scipy in float64
META = {"probe": "toy", "probe_fingerprint": "fp"}


def random_embeddings(n: int, d: int = 30, seed: int = 0) -> list[TaskEmbedding]:
    generator = torch.Generator().manual_seed(seed)
    return [
        TaskEmbedding(
            torch.exp(torch.randn(d, generator=generator)),
            torch.ones(d),
            {"layer": (0, d)},
            {**META, "task_name": f"b{i}"},
        )
        for i in range(n)
    ]


def scipy_spec_cosine(a: TaskEmbedding, b: TaskEmbedding) -> float:
    ha, hb = a.hessian.double().numpy(), b.hessian.double().numpy()
    total = ha + hb + 1e-8
    return float(scipy_cosine(ha / total, hb / total))


def scipy_summary(values: list[float], confidence: float) -> tuple[float, float, float, float]:
    """Mean, std (ddof 1) and Student's t interval of the mean, as Beyond Scale reports them."""
    array = np.asarray(values)
    low, high = scipy.stats.t.interval(
        confidence, len(array) - 1, loc=array.mean(), scale=scipy.stats.sem(array)
    )
    return float(array.mean()), float(array.std(ddof=1)), float(low), float(high)


@pytest.mark.parametrize("confidence", [0.95, 0.5])
def test_diversity_coefficient_against_scipy(confidence: float) -> None:
    embeddings = random_embeddings(7)
    pairs = [
        scipy_spec_cosine(embeddings[i], embeddings[j]) for i in range(7) for j in range(i + 1, 7)
    ]
    result = diversity_coefficient(embeddings, confidence=confidence)
    assert isinstance(result, DiversityCoefficient)
    assert result.num_pairs == 21 and result.confidence == confidence
    mean, std, low, high = scipy_summary(pairs, confidence)
    assert result.mean == pytest.approx(mean, rel=RTOL)
    assert result.std == pytest.approx(std, rel=1e-4)
    assert result.ci_low == pytest.approx(low, rel=1e-4)
    assert result.ci_high == pytest.approx(high, rel=1e-4)
    assert result.ci_half_width == pytest.approx((high - low) / 2, rel=1e-4)
    np.testing.assert_allclose(np.sort(result.distances.numpy()), np.sort(pairs), rtol=RTOL)
    assert t2v_lightning.diversity_coefficient is diversity_coefficient


def test_cross_diversity_coefficient_against_scipy() -> None:
    first, second = random_embeddings(4, seed=1), random_embeddings(5, seed=2)
    pairs = [scipy_spec_cosine(a, b) for a in first for b in second]
    result = cross_diversity_coefficient(first, second)
    mean, std, low, high = scipy_summary(pairs, 0.95)
    assert result.num_pairs == 20
    assert t2v_lightning.cross_diversity_coefficient is cross_diversity_coefficient
    assert result.mean == pytest.approx(mean, rel=RTOL)
    assert (result.std, result.ci_low, result.ci_high) == pytest.approx((std, low, high), rel=1e-4)


def test_other_distances() -> None:
    embeddings = random_embeddings(4)
    jsd = diversity_coefficient(embeddings, distance="jsd")
    expected = np.mean(
        [
            task_distance(embeddings[i], embeddings[j], "jsd")
            for i in range(4)
            for j in range(i + 1, 4)
        ]
    )
    assert jsd.mean == pytest.approx(expected, rel=RTOL)
    # an asymmetric distance averages both directions of every pair
    akl = diversity_coefficient(embeddings, distance="asymmetric_kl")
    assert akl.num_pairs == 12
    expected = np.mean(
        [
            task_distance(embeddings[i], embeddings[j], "asymmetric_kl")
            for i in range(4)
            for j in range(4)
            if i != j
        ]
    )
    assert akl.mean == pytest.approx(expected, rel=1e-9)


def test_a_single_pair_has_no_spread() -> None:
    result = diversity_coefficient(random_embeddings(2))
    assert result.num_pairs == 1 and math.isfinite(result.mean)
    assert math.isnan(result.std) and math.isnan(result.ci_low) and math.isnan(result.ci_high)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        diversity_coefficient(random_embeddings(1))
    with pytest.raises(ValueError, match="confidence"):
        diversity_coefficient(random_embeddings(3), confidence=1.0)
    with pytest.raises(ValueError, match="distance"):
        cross_diversity_coefficient(random_embeddings(2), random_embeddings(2), distance="x")  # type: ignore[arg-type]


# --- batch embeddings -----------------------------------------------------------------------


class LabelDataset(Dataset):
    """Examples are (index, label) pairs; labels repeat ``classes`` in order."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, self.labels[index]


class HistogramEmbedder:
    """A stand-in for Task2Vec: the embedding is the batch's label histogram (plus one)."""

    def __init__(self, classes: int = 10) -> None:
        self.classes = classes
        self.seen: list[list[int]] = []

    def embed(self, dataset: Subset) -> TaskEmbedding:
        assert isinstance(dataset, Subset)
        indices = [dataset[i][0] for i in range(len(dataset))]
        self.seen.append(indices)
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        counts = torch.bincount(labels, minlength=self.classes).float() + 1.0
        return TaskEmbedding(
            counts,
            torch.ones(self.classes),
            {"fc": (0, self.classes)},
            {**META, "task_name": "toy"},
        )


def test_embed_batches_draws_disjoint_seeded_batches(caplog: pytest.LogCaptureFixture) -> None:
    dataset = LabelDataset([i % 10 for i in range(100)])
    embedder = HistogramEmbedder()
    with caplog.at_level(logging.INFO, logger="t2v_lightning.similarity.diversity"):
        embeddings = embed_batches(embedder, dataset, batch_size=20, num_batches=4, seed=3)
    assert len(embeddings) == 4 and [len(s) for s in embedder.seen] == [20] * 4
    flat = [i for batch in embedder.seen for i in batch]
    assert len(set(flat)) == 80  # disjoint
    assert [e.name for e in embeddings] == [f"toy [batch {k}]" for k in range(4)]
    assert embeddings[2].meta["diversity_batch"] == {
        "index": 2,
        "batch_size": 20,
        "num_batches": 4,
        "seed": 3,
        "overlapping": False,
    }
    assert embeddings[0].meta["probe_fingerprint"] == "fp"
    assert "embedding batch 4/4 (20 examples)" in caplog.text
    # the same seed draws the same batches; another seed others
    again = HistogramEmbedder()
    embed_batches(again, dataset, batch_size=20, num_batches=4, seed=3)
    assert again.seen == embedder.seen
    other = HistogramEmbedder()
    embed_batches(other, dataset, batch_size=20, num_batches=4, seed=4)
    assert other.seen != embedder.seen
    assert t2v_lightning.embed_batches is embed_batches


def test_embed_batches_overlap_when_the_dataset_is_small(caplog: pytest.LogCaptureFixture) -> None:
    dataset = LabelDataset([i % 10 for i in range(30)])
    embedder = HistogramEmbedder()
    with caplog.at_level(logging.INFO, logger="t2v_lightning.similarity.diversity"):
        embeddings = embed_batches(embedder, dataset, batch_size=20, num_batches=3)
    assert all(len(set(batch)) == 20 for batch in embedder.seen)  # no repeat within a batch
    assert embeddings[0].meta["diversity_batch"]["overlapping"] is True
    assert "may overlap" in caplog.text


def test_diversity_of_batches_reflects_the_data() -> None:
    # Ten balanced classes: every batch has nearly the same label histogram (low diversity).
    # Batches of a dataset of classes 0-4 and of one of classes 5-9 share no label: their
    # cross-diversity is far above the first dataset's diversity.
    uniform = LabelDataset([i % 10 for i in range(400)])
    low = LabelDataset([i % 5 for i in range(400)])
    high = LabelDataset([5 + i % 5 for i in range(400)])
    embedder = HistogramEmbedder()
    within = diversity_coefficient(embed_batches(embedder, uniform, 40, 6))
    low_batches = embed_batches(embedder, low, 40, 6)
    high_batches = embed_batches(embedder, high, 40, 6)
    across = cross_diversity_coefficient(low_batches, high_batches)
    assert across.ci_low > within.ci_high


def test_embed_batches_errors() -> None:
    dataset = LabelDataset([0, 1, 2])
    embedder = HistogramEmbedder()
    with pytest.raises(ValueError, match="batch_size"):
        embed_batches(embedder, dataset, batch_size=4, num_batches=1)
    with pytest.raises(ValueError, match="batch_size"):
        embed_batches(embedder, dataset, batch_size=0, num_batches=1)
    with pytest.raises(ValueError, match="num_batches"):
        embed_batches(embedder, dataset, batch_size=1, num_batches=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        embed_batches(embedder, dataset, batch_size=1, num_batches=1, seed="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="embed"):
        embed_batches(object(), dataset, batch_size=1, num_batches=1)  # type: ignore[arg-type]

    class Unsized(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter([])

    with pytest.raises(TypeError, match="length"):
        embed_batches(embedder, Unsized(), batch_size=1, num_batches=1)

    class Broken:
        def embed(self, dataset: Dataset) -> torch.Tensor:
            return torch.ones(3)

    with pytest.raises(TypeError, match="expected a TaskEmbedding"):
        embed_batches(Broken(), dataset, batch_size=1, num_batches=1)
