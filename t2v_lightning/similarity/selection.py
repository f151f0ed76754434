"""Expert selection with the asymmetric Task2Vec score (paper section 3, used in section 4).

Transfer from a source task to a target works better when the tasks are close and when the
source is complex: pre-training on a large, general task often beats fine-tuning from a close
task of comparable complexity. The paper measures complexity as the distance from the
*trivial embedding* ``t0`` (the embedding of a task that teaches nothing: posterior equal to
the prior, i.e. hessian equal to scale) and scores a candidate expert, trained on a source
task, for a target task by

    d_asym(source → target) = d(target, source) − α · d(source, t0(source)),    α = 0.15,

a score rather than a distance: asymmetric and possibly negative. The expert with the lowest
score is the predicted best.

The complexity term belongs to the *source*: in the paper's ``d_asym(t_a → t_b) = d(t_a, t_b)
− α d(t_a, t_0)``, ``t_a`` is the task transferred from, and transfer is said to depend on the
similarity of the tasks and on the complexity of that first task. With the complexity of the
target instead, the term would be the same for every candidate and α could not change the
ranking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.similarity.distance import (
    Distance,
    _check_distance,
    cdist,
    check_embeddings,
    task_distance,
)

__all__ = [
    "DEFAULT_ALPHA",
    "ExpertRanking",
    "RankedExpert",
    "asymmetric_distance",
    "complexity",
    "ranked_experts",
    "select_expert",
    "trivial_embedding",
]

DEFAULT_ALPHA = 0.15
"""The paper's α for a ResNet-34 probe, "robust to the choice of meta-tasks"."""


def trivial_embedding(embedding: TaskEmbedding) -> TaskEmbedding:
    """The embedding of a task that moves nothing away from the prior: hessian equal to scale.

    Args:
        embedding: any embedding of the probe; its scale, layers and metadata are used.

    Returns:
        A new embedding with ``hessian = scale`` (for Monte Carlo embeddings, whose scale is
        one, a vector of ones), the same layers, and the metadata of ``embedding`` with
        ``task_name`` ``"trivial"`` and ``trivial_of`` naming the original task.

    Raises:
        TypeError: ``embedding`` is not a :class:`TaskEmbedding`.
        ValueError: the scale has non-finite or non-positive entries.
    """
    if not isinstance(embedding, TaskEmbedding):
        raise TypeError(f"embedding must be a TaskEmbedding, got {type(embedding).__name__}")
    scale = embedding.scale
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError(
            f"embedding {embedding.name or ''!r} has non-finite or non-positive scale entries; "
            f"its trivial embedding (hessian = scale) would not be a valid embedding"
        )
    meta = {**embedding.meta, "task_name": "trivial", "trivial_of": embedding.name}
    return TaskEmbedding(scale.clone(), scale.clone(), dict(embedding.layers), meta)


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")


def complexity(embedding: TaskEmbedding, distance: Distance = "cosine") -> float:
    """A task's complexity: its distance from its own trivial embedding, ``d(e, t0(e))``.

    Args:
        embedding: the task's embedding.
        distance: one of :data:`~t2v_lightning.similarity.distance.DISTANCES`.
    """
    # its own trivial embedding: same probe and layers by construction
    return task_distance(embedding, trivial_embedding(embedding), distance, assume_comparable=True)


def asymmetric_distance(
    target: TaskEmbedding,
    source: TaskEmbedding,
    alpha: float = DEFAULT_ALPHA,
    distance: Distance = "cosine",
    assume_comparable: bool = False,
) -> float:
    """The asymmetric score of transferring from ``source`` to ``target`` (lower is better).

    .. math::

        d_{asym}(source → target) = d(target, source) − α · d(source, t_0(source))

    where :math:`t_0` is :func:`trivial_embedding`. It can be negative.

    Args:
        target: the embedding of the task to solve.
        source: the embedding of the task an expert was trained on.
        alpha: weight of the source's complexity (the paper's 0.15 by default).
        distance: the symmetric distance ``d`` (one of
            :data:`~t2v_lightning.similarity.distance.DISTANCES`).
        assume_comparable: compare embeddings that record no probe fingerprint or layer
            table (see :func:`~t2v_lightning.similarity.distance.pdist`).

    Returns:
        The score as a Python float.
    """
    _check_alpha(alpha)
    return (task_distance(target, source, distance, assume_comparable)
            - alpha * complexity(source, distance))


@dataclass(frozen=True)
class ExpertRanking:
    """Candidate experts ranked for one target task.

    Attributes:
        order: indices into the candidates, best (lowest score) first.
        scores: ``d_asym(candidate → target)`` per candidate, in the candidates' order
            (float64).
        names: the candidates' names, in the candidates' order.
        distances: ``d(target, candidate)`` per candidate.
        complexities: ``d(candidate, t0(candidate))`` per candidate.
    """

    order: list[int]
    scores: torch.Tensor
    names: list[str]
    distances: torch.Tensor
    complexities: torch.Tensor

    @property
    def best(self) -> int:
        """Index of the selected expert."""
        return self.order[0]

    @property
    def best_name(self) -> str:
        """Name of the selected expert."""
        return self.names[self.order[0]]

    @property
    def ranked_names(self) -> list[str]:
        """Names of the candidates, best first."""
        return [self.names[i] for i in self.order]


def select_expert(
    target: TaskEmbedding,
    experts: Sequence[TaskEmbedding] | Mapping[str, TaskEmbedding],
    alpha: float = DEFAULT_ALPHA,
    distance: Distance = "cosine",
    assume_comparable: bool = False,
) -> ExpertRanking:
    """Rank experts (by the embeddings of their training tasks) for a target task.

    Computes :func:`asymmetric_distance` of every candidate and sorts ascending (ties keep the
    candidates' order); ``alpha=0`` ranks by plain distance.

    Args:
        target: the embedding of the task to solve.
        experts: the embeddings of the experts' training tasks, as a sequence (named by their
            ``task_name``) or a mapping from expert name to embedding.
        alpha: weight of each source's complexity.
        distance: the symmetric distance ``d``.
        assume_comparable: compare embeddings that record no probe fingerprint or layer
            table (see :func:`~t2v_lightning.similarity.distance.pdist`).

    Returns:
        An :class:`ExpertRanking`; ``ranking.best`` is the index of the selected expert.

    Example:
        >>> import torch
        >>> from t2v_lightning import TaskEmbedding, select_expert
        >>> def emb(values, name):
        ...     return TaskEmbedding(torch.tensor(values), torch.ones(3), meta={"task_name": name})
        >>> target = emb([1.0, 2.0, 3.0], "target")
        >>> experts = [emb([3.0, 2.0, 1.0], "far"), emb([1.0, 2.0, 2.9], "near")]
        >>> select_expert(target, experts, alpha=0.0, assume_comparable=True).best_name
        'near'
    """
    if not isinstance(target, TaskEmbedding):
        raise TypeError(f"target must be a TaskEmbedding, got {type(target).__name__}")
    _check_alpha(alpha)
    _check_distance(distance)
    if isinstance(experts, Mapping):
        names = [str(name) for name in experts]
        candidates = check_embeddings(list(experts.values()), "experts", assume_comparable)
    else:
        candidates = check_embeddings(experts, "experts", assume_comparable)
        names = [e.name or f"experts[{i}]" for i, e in enumerate(candidates)]
    distances = cdist([target], candidates, distance, assume_comparable)[0]
    complexities = torch.tensor(
        [complexity(candidate, distance) for candidate in candidates], dtype=torch.float64
    )
    scores = distances - alpha * complexities
    order = torch.sort(scores, stable=True).indices.tolist()
    return ExpertRanking(order, scores, names, distances, complexities)


@dataclass(frozen=True)
class RankedExpert:
    """One row of a ranking, as ``t2v select`` prints it.

    Attributes:
        rank: 1 for the selected expert.
        index: the candidate's index in the candidates given to :func:`select_expert`.
        name: the candidate's name.
        score: the asymmetric distance ``d(target, candidate) − α · d(candidate, t0)``.
        distance: ``d(target, candidate)``.
        complexity: ``d(candidate, t0(candidate))``, the distance to the trivial embedding.
    """

    rank: int
    index: int
    name: str
    score: float
    distance: float
    complexity: float


def ranked_experts(ranking: ExpertRanking) -> list[RankedExpert]:
    """The rows of ``ranking``, best first.

    Example:
        >>> import torch
        >>> from t2v_lightning import TaskEmbedding, select_expert
        >>> def emb(values, name):
        ...     return TaskEmbedding(torch.tensor(values), torch.ones(3), meta={"task_name": name})
        >>> ranking = select_expert(emb([1.0, 2.0, 3.0], "target"),
        ...                         [emb([3.0, 2.0, 1.0], "far"), emb([1.0, 2.0, 2.9], "near")],
        ...                         assume_comparable=True)
        >>> [(row.rank, row.name) for row in ranked_experts(ranking)]
        [(1, 'near'), (2, 'far')]
    """
    return [
        RankedExpert(
            rank=position + 1,
            index=index,
            name=ranking.names[index],
            score=float(ranking.scores[index]),
            distance=float(ranking.distances[index]),
            complexity=float(ranking.complexities[index]),
        )
        for position, index in enumerate(ranking.order)
    ]
