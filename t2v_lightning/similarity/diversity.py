r"""The diversity coefficient of a dataset (Miranda et al. 2023, "Beyond Scale").

Embed many random batches of one dataset with the same probe, and average the distances
between the batch embeddings:

.. math::

    \operatorname{div}(D) = \mathbb{E}_{B_1 \neq B_2 \sim D}\, d(e_{B_1}, e_{B_2})
    \approx \frac{2}{n (n - 1)} \sum_{i < j} d(e_i, e_j)

with the cosine distance by default. A diverse dataset has batches that look like different
tasks (large coefficient); a narrow one has batches that look alike. The cross-diversity
coefficient of two datasets averages ``d(e_i, f_j)`` over every batch embedding ``e_i`` of the
first and ``f_j`` of the second.

The confidence interval follows the paper's convention: Student's t interval of the mean of the
pairwise distances, treating them as independent samples. Pairs that share a batch are not
independent, so the interval is optimistic; more batches, not more pairs, make it honest. The
bootstrap interval over batches (SPEC section 8) is the honest one: resample the batches with
replacement, recompute the mean distance over the pairs of different batches, and take the
percentiles of the resampled means.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset, Subset

from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.safety import check_seed, is_int
from t2v_lightning.similarity.distance import Distance, _check_distance, cdist, pdist

__all__ = [
    "DiversityCoefficient",
    "SupportsEmbed",
    "bootstrap_interval",
    "cross_diversity_coefficient",
    "diversity_coefficient",
    "embed_batches",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiversityCoefficient:
    """A (cross-)diversity coefficient with its spread and confidence interval.

    Attributes:
        mean: the coefficient: the mean of the distances.
        std: their standard deviation (``ddof=1``; NaN for a single distance).
        ci_low: lower end of the confidence interval of the mean.
        ci_high: upper end.
        confidence: the interval's confidence level.
        num_pairs: the number of distances averaged.
        distances: the distances themselves (1-D, float64).
        bootstrap_low: lower end of the bootstrap interval over batches (same confidence; NaN
            when not computed or with fewer than 2 batches a side).
        bootstrap_high: upper end.
        num_tasks: the number of batch embeddings (tasks) the distances come from (for a
            cross-diversity, those of the first dataset; 0 when not known).
    """

    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float
    num_pairs: int
    distances: torch.Tensor
    bootstrap_low: float = math.nan
    bootstrap_high: float = math.nan
    num_tasks: int = 0

    @property
    def ci_half_width(self) -> float:
        """Half the width of the confidence interval (the "±" of the paper's tables)."""
        return (self.ci_high - self.ci_low) / 2.0


def _summarise(distances: torch.Tensor, confidence: float) -> DiversityCoefficient:
    from scipy import stats

    values = distances.to(torch.float64).flatten()
    count = int(values.numel())
    mean = float(values.mean())
    if count < 2:
        std = half = math.nan
    else:
        std = float(values.std(correction=1))
        half = float(stats.t.ppf((1.0 + confidence) / 2.0, count - 1)) * std / math.sqrt(count)
    return DiversityCoefficient(mean, std, mean - half, mean + half, confidence, count, values)


def bootstrap_interval(
    matrix: torch.Tensor,
    confidence: float = 0.95,
    num_resamples: int = 1000,
    seed: int = 0,
    cross: bool = False,
) -> tuple[float, float]:
    r"""Percentile bootstrap interval of a mean distance, resampling tasks (not pairs).

    Each resample draws the tasks with replacement (counts :math:`c`) and recomputes the mean
    over the pairs of *different* tasks: for a pairwise matrix :math:`D` (zero diagonal),
    :math:`\sum_{i \neq j} c_i c_j D_{ij} / ((\sum c)^2 - \sum c_i^2)`; for a cross matrix
    (rows one dataset's tasks, columns the other's, each side resampled on its own)
    :math:`a^\top D b / (\sum a \sum b)`. Resamples that hold a single distinct task are
    dropped.

    Args:
        matrix: ``n x n`` distances between the tasks of one dataset, or ``m x n`` between two.
        confidence: the interval's confidence level.
        num_resamples: bootstrap resamples.
        seed: the resampling's seed.
        cross: ``matrix`` is a cross matrix.

    Returns:
        ``(low, high)``; NaN for a pairwise matrix of fewer than 2 tasks.
    """
    _check_confidence(confidence)
    values = matrix.to(torch.float64)
    rows, cols = values.shape
    if num_resamples < 1 or (not cross and rows < 2):
        return math.nan, math.nan
    generator = torch.Generator().manual_seed(seed)

    def counts(n: int) -> torch.Tensor:
        draws = torch.randint(0, n, (num_resamples, n), generator=generator)
        return torch.zeros(num_resamples, n, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(num_resamples, n, dtype=torch.float64)
        )

    if cross:
        a, b = counts(rows), counts(cols)
        means = torch.einsum("ri,ij,rj->r", a, values, b) / (rows * cols)
    else:
        c = counts(rows)
        off = values - torch.diag(torch.diagonal(values))
        pairs = c.sum(1) ** 2 - (c**2).sum(1)
        kept = pairs > 0
        means = torch.einsum("ri,ij,rj->r", c[kept], off, c[kept]) / pairs[kept]
    if means.numel() == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(low), float(high)


def _check_confidence(confidence: float) -> None:
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, (int, float))
        or not (0.0 < confidence < 1.0)
    ):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")


def diversity_coefficient(
    embeddings: Sequence[TaskEmbedding],
    distance: Distance = "cosine",
    confidence: float = 0.95,
    num_resamples: int = 1000,
    bootstrap_seed: int = 0,
    assume_comparable: bool = False,
) -> DiversityCoefficient:
    r"""The diversity coefficient: mean distance between embeddings of random batches of a dataset.

    .. math::

        \operatorname{div} = \frac{2}{n (n - 1)} \sum_{i < j} d(e_i, e_j)

    (for ``asymmetric_kl``, the mean over all ordered pairs ``i ≠ j``).

    Args:
        embeddings: ``n ≥ 2`` embeddings of batches of one dataset (see :func:`embed_batches`).
        distance: the distance (cosine, as in the paper, by default).
        confidence: the confidence level of both intervals.
        num_resamples: bootstrap resamples of the batches (0: no bootstrap interval).
        bootstrap_seed: the resampling's seed.
        assume_comparable: compare embeddings that record no probe fingerprint or layer table
            (see :func:`~t2v_lightning.similarity.distance.pdist`).

    Returns:
        A :class:`DiversityCoefficient` over the ``n (n - 1) / 2`` pairs, with the t interval
        over pairs and the bootstrap interval over batches.

    Example:
        >>> import torch
        >>> from t2v_lightning import TaskEmbedding, diversity_coefficient
        >>> batches = [TaskEmbedding(torch.rand(8) + 0.1, torch.ones(8)) for _ in range(5)]
        >>> result = diversity_coefficient(batches, assume_comparable=True)  # no probe recorded
        >>> result.num_pairs, result.ci_low <= result.mean <= result.ci_high
        (10, True)
    """
    _check_distance(distance)
    _check_confidence(confidence)
    matrix = pdist(embeddings, distance, assume_comparable)
    n = matrix.shape[0]
    if n < 2:
        raise ValueError(f"embeddings must hold at least 2 batch embeddings, got {n}")
    if distance == "asymmetric_kl":
        mask = ~torch.eye(n, dtype=torch.bool)
    else:
        mask = torch.ones(n, n, dtype=torch.bool).triu(diagonal=1)
    low, high = bootstrap_interval(matrix, confidence, num_resamples, bootstrap_seed)
    return replace(
        _summarise(matrix[mask], confidence), bootstrap_low=low, bootstrap_high=high, num_tasks=n
    )


def cross_diversity_coefficient(
    a_embeddings: Sequence[TaskEmbedding],
    b_embeddings: Sequence[TaskEmbedding],
    distance: Distance = "cosine",
    confidence: float = 0.95,
    num_resamples: int = 1000,
    bootstrap_seed: int = 0,
    assume_comparable: bool = False,
) -> DiversityCoefficient:
    r"""The cross-diversity coefficient: mean distance between batches of two datasets.

    .. math::

        \operatorname{div}(A, B) = \frac{1}{m n} \sum_{i, j} d(a_i, b_j)

    Args:
        a_embeddings: ``m`` batch embeddings of the first dataset.
        b_embeddings: ``n`` batch embeddings of the second (same probe and layers).
        distance: the distance (cosine by default).
        confidence: the confidence level of both intervals.
        num_resamples: bootstrap resamples (each dataset's batches resampled on its own; 0: no
            bootstrap interval).
        bootstrap_seed: the resampling's seed.
        assume_comparable: compare embeddings that record no probe fingerprint or layer table
            (see :func:`~t2v_lightning.similarity.distance.pdist`).

    Returns:
        A :class:`DiversityCoefficient` over the ``m n`` pairs (``num_tasks``: ``m``).
    """
    _check_distance(distance)
    _check_confidence(confidence)
    matrix = cdist(a_embeddings, b_embeddings, distance, assume_comparable)
    low, high = bootstrap_interval(matrix, confidence, num_resamples, bootstrap_seed, cross=True)
    return replace(
        _summarise(matrix.flatten(), confidence),
        bootstrap_low=low,
        bootstrap_high=high,
        num_tasks=int(matrix.shape[0]),
    )


class SupportsEmbed(Protocol):
    """Anything with ``embed(dataset) -> TaskEmbedding``, such as :class:`~t2v_lightning.Task2Vec`."""

    def embed(self, dataset: Any) -> TaskEmbedding: ...


def _positive_int(value: object, name: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def embed_batches(
    task2vec: SupportsEmbed,
    dataset: Dataset[Any],
    batch_size: int,
    num_batches: int,
    seed: int = 0,
) -> list[TaskEmbedding]:
    """Embed ``num_batches`` random batches of ``batch_size`` examples of ``dataset``.

    When the dataset is large enough (``batch_size · num_batches ≤ len(dataset)``) the batches
    are disjoint slices of one random permutation; otherwise each batch is drawn on its own
    (no example twice within a batch, batches may overlap). Each batch is embedded by
    ``task2vec.embed(Subset(dataset, indices))``; its ``task_name`` gets a ``[batch k]`` suffix
    and its metadata a ``"diversity_batch"`` record (index, batch size, number of batches,
    seed, whether batches overlap).

    Args:
        task2vec: the embedder (a :class:`~t2v_lightning.Task2Vec`).
        dataset: a map-style dataset with ``len``.
        batch_size: examples per batch.
        num_batches: number of batches.
        seed: seed of the batch draw (the same seed gives the same batches).

    Returns:
        The batch embeddings, in batch order.

    Raises:
        TypeError: ``task2vec`` has no ``embed`` method, the dataset has no length, or
            ``embed`` returns something other than a :class:`TaskEmbedding`.
        ValueError: invalid ``batch_size``, ``num_batches`` or ``seed``, or a batch larger than
            the dataset.
    """
    if not callable(getattr(task2vec, "embed", None)):
        raise TypeError(
            f"task2vec must have an embed(dataset) method, got {type(task2vec).__name__}"
        )
    batch_size = _positive_int(batch_size, "batch_size")
    num_batches = _positive_int(num_batches, "num_batches")
    check_seed(seed)
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(
            f"dataset must be a map-style dataset with a length, got {type(dataset).__name__}"
        ) from err
    if batch_size > size:
        raise ValueError(f"batch_size ({batch_size}) is larger than the dataset ({size} examples)")

    generator = torch.Generator().manual_seed(seed)
    overlapping = batch_size * num_batches > size
    if overlapping:
        batches = [
            torch.randperm(size, generator=generator)[:batch_size] for _ in range(num_batches)
        ]
        log.info(
            "%d batches of %d need more than the %d examples of the dataset; batches are drawn "
            "independently and may overlap",
            num_batches,
            batch_size,
            size,
        )
    else:
        order = torch.randperm(size, generator=generator)
        batches = [order[k * batch_size : (k + 1) * batch_size] for k in range(num_batches)]

    embeddings = []
    for k, indices in enumerate(batches):
        log.info("embedding batch %d/%d (%d examples)", k + 1, num_batches, batch_size)
        embedding = task2vec.embed(Subset(dataset, indices.tolist()))
        if not isinstance(embedding, TaskEmbedding):
            raise TypeError(
                f"task2vec.embed returned {type(embedding).__name__}, expected a TaskEmbedding"
            )
        name = f"{embedding.name} [batch {k}]" if embedding.name else f"batch {k}"
        meta = {
            **embedding.meta,
            "task_name": name,
            "diversity_batch": {
                "index": k,
                "batch_size": batch_size,
                "num_batches": num_batches,
                "seed": seed,
                "overlapping": overlapping,
            },
        }
        embeddings.append(
            TaskEmbedding(embedding.hessian, embedding.scale, dict(embedding.layers), meta)
        )
    return embeddings
