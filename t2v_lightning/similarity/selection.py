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
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from t2v_lightning.choices import check_choice
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.safety import is_int
from t2v_lightning.similarity.distance import (
    Distance,
    _check_distance,
    cdist,
    check_embeddings,
    task_distance,
)
from t2v_lightning.similarity.transferability import (
    TRANSFERABILITY_METHODS,
    TransferabilityMethod,
    transferability,
)

__all__ = [
    "DEFAULT_ALPHA",
    "ExpertRanking",
    "RankedExpert",
    "asymmetric_distance",
    "complexity",
    "model_outputs",
    "ranked_experts",
    "rerank_experts",
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
    return task_distance(target, source, distance, assume_comparable) - alpha * complexity(
        source, distance
    )


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
        rerank: the transferability estimator that reordered the first candidates
            (:func:`rerank_experts`), or ``None``.
        transferability: that estimator's score per candidate (higher is better), NaN for the
            candidates it did not score; ``None`` without ``rerank``.
    """

    order: list[int]
    scores: torch.Tensor
    names: list[str]
    distances: torch.Tensor
    complexities: torch.Tensor
    rerank: str | None = None
    transferability: torch.Tensor | None = None

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
    rerank: TransferabilityMethod | None = None,
    models: Mapping[str, nn.Module] | None = None,
    data: Dataset[Any] | None = None,
    top_k: int = 3,
) -> ExpertRanking:
    """Rank experts (by the embeddings of their training tasks) for a target task.

    Computes :func:`asymmetric_distance` of every candidate and sorts ascending (ties keep the
    candidates' order); ``alpha=0`` ranks by plain distance. With ``rerank``, the first
    ``top_k`` are then reordered by a transferability estimator computed from each expert's
    model on the target's labelled data (:func:`rerank_experts`): Task2Vec shortlists without
    running any expert, the estimator decides among the shortlist at ``top_k`` forward passes.

    Args:
        target: the embedding of the task to solve.
        experts: the embeddings of the experts' training tasks, as a sequence (named by their
            ``task_name``) or a mapping from expert name to embedding.
        alpha: weight of each source's complexity.
        distance: the symmetric distance ``d``.
        assume_comparable: compare embeddings that record no probe fingerprint or layer
            table (see :func:`~t2v_lightning.similarity.distance.pdist`).
        rerank: a name of
            :data:`~t2v_lightning.similarity.transferability.TRANSFERABILITY_METHODS`, or ``None``
            (Task2Vec's order only).
        models: with ``rerank``: each shortlisted expert's network by name (its classifier head
            found by :func:`~t2v_lightning.probe.find_head`).
        data: with ``rerank``: the target's labelled examples, ``(input, label)`` pairs.
        top_k: with ``rerank``: how many of Task2Vec's first candidates are reordered.

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
    if rerank is None and (models is not None or data is not None):
        raise ValueError("models and data are only used with rerank=<method>")
    if rerank is not None and (models is None or data is None):
        raise ValueError(
            f"rerank={rerank!r} needs the experts' models (models=...) and the "
            "target's labelled examples (data=...)"
        )
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
    ranking = ExpertRanking(order, scores, names, distances, complexities)
    if rerank is None:
        return ranking
    assert models is not None and data is not None  # checked above
    return rerank_experts(ranking, models, data, rerank, top_k)


@torch.no_grad()
def model_outputs(
    model: nn.Module,
    data: Dataset[Any],
    head: str | None = None,
    batch_size: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass of ``model`` (in eval mode) over ``data``: what the estimators need.

    Args:
        model: a classifier network.
        data: ``(input, label)`` pairs.
        head: the qualified name of the classifier head (default: found by
            :func:`~t2v_lightning.probe.find_head`).
        batch_size: examples per forward pass.

    Returns:
        ``(features, logits, labels)``: the head's inputs flattened to (n, D) (the penultimate
        features), the model's outputs (n, Z) and the labels (n,), all on the CPU, float32.
    """
    from t2v_lightning.probe import find_head, get_submodule

    module = get_submodule(model, find_head(model, head))
    captured: list[torch.Tensor] = []

    def keep_input(_: nn.Module, inputs: tuple[torch.Tensor, ...], __: torch.Tensor) -> None:
        captured.append(inputs[0].detach().flatten(1).float().cpu())

    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(keep_input)
    logits, labels = [], []
    try:
        for x, y in DataLoader(data, batch_size=batch_size):
            logits.append(model(x).detach().float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured), torch.cat(logits), torch.cat(labels).long()


def rerank_experts(
    ranking: ExpertRanking,
    models: Mapping[str, nn.Module],
    data: Dataset[Any],
    method: TransferabilityMethod = "logme",
    top_k: int = 3,
) -> ExpertRanking:
    """Reorder the first ``top_k`` of ``ranking`` by a transferability estimator.

    Each shortlisted expert's model makes one forward pass over ``data``
    (:func:`model_outputs`); :func:`~t2v_lightning.similarity.transferability.transferability`
    scores it, and the shortlist is sorted by that score, highest first (ties keep Task2Vec's
    order). The candidates after the shortlist keep Task2Vec's order.

    Args:
        ranking: a ranking from :func:`select_expert`.
        models: each shortlisted expert's network by name; others may be absent.
        data: the target's labelled examples.
        method: the estimator's name.
        top_k: the shortlist's length (clipped to the number of candidates).

    Raises:
        ValueError: unknown method, ``top_k`` below 1, or a shortlisted expert without a model.
    """
    check_choice("rerank", method, TRANSFERABILITY_METHODS)
    if not is_int(top_k) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    shortlist = ranking.order[:top_k]
    missing = [ranking.names[i] for i in shortlist if ranking.names[i] not in models]
    if missing:
        raise ValueError(
            f"no model for the shortlisted expert(s) {', '.join(missing)} (models "
            f"has {', '.join(sorted(models)) or 'none'})"
        )
    values = torch.full((len(ranking.names),), float("nan"), dtype=torch.float64)
    for index in shortlist:
        features, logits, labels = model_outputs(models[ranking.names[index]], data)
        values[index] = transferability(method, labels, features=features, logits=logits)
    reordered = sorted(shortlist, key=lambda i: -float(values[i]))  # stable: ties keep order
    return replace(
        ranking, order=reordered + ranking.order[top_k:], rerank=method, transferability=values
    )


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
        transferability: the reranking estimator's score (NaN outside the shortlist), or
            ``None`` when the ranking was not reranked.
    """

    rank: int
    index: int
    name: str
    score: float
    distance: float
    complexity: float
    transferability: float | None = None


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
            transferability=None
            if ranking.transferability is None
            else float(ranking.transferability[index]),
        )
        for position, index in enumerate(ranking.order)
    ]
