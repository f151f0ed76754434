"""The words every part of the package shares: the estimators, likelihoods and methods, the
Fisher errors, and the one check of a choice made at the boundary.

This module imports nothing of the package, so that :mod:`t2v_lightning.prepare`, the Fisher
methods under :mod:`t2v_lightning.fisher` and the command line can all name the same choices
without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

__all__ = [
    "Estimator",
    "ESTIMATORS",
    "ESTIMATOR_FACTS",
    "EstimatorFacts",
    "Likelihood",
    "LIKELIHOODS",
    "Method",
    "METHODS",
    "FisherError",
    "UnsupportedLayerError",
    "check_choice",
    "check_non_negative",
    "check_positive",
]

Estimator = Literal["per_sample", "batch", "exact"]
ESTIMATORS: tuple[str, ...] = ("per_sample", "batch", "exact")
"""Monte Carlo estimators: labels sampled per example, the squared mean gradient of each
mini-batch (the 2019 reference), the expectation over every label."""


@dataclass(frozen=True)
class EstimatorFacts:
    """What the rest of the package needs to know about an estimator besides its math.

    Args:
        uses_mc_samples: it draws ``mc_samples`` labels per example (recorded in the meta).
        per_batch: it squares mini-batch gradients: it counts batches (``num_batches`` in the
            meta, not ``num_samples``) and estimates the Fisher divided by the batch size.
    """

    uses_mc_samples: bool
    per_batch: bool


ESTIMATOR_FACTS: dict[str, EstimatorFacts] = {
    "per_sample": EstimatorFacts(uses_mc_samples=True, per_batch=False),
    "batch": EstimatorFacts(uses_mc_samples=False, per_batch=True),
    "exact": EstimatorFacts(uses_mc_samples=False, per_batch=False),
}
"""``estimator=`` value → its facts (one per :data:`ESTIMATORS`)."""

Likelihood = Literal["categorical", "bernoulli"]
LIKELIHOODS: tuple[str, ...] = ("categorical", "bernoulli")
"""One class per example (softmax), or independent 0/1 outputs (multi-label, sigmoids)."""

Method = Literal["montecarlo", "variational"]
METHODS: tuple[str, ...] = ("montecarlo", "variational")
"""Fisher by sampling labels from the model, or the paper's variational method."""

_Choice = TypeVar("_Choice", bound=str)


def check_choice(name: str, value: _Choice, choices: Sequence[str]) -> _Choice:
    """``value`` if it is one of ``choices``; else ``ValueError`` naming the argument.

    Example:
        >>> check_choice("estimator", "exact", ESTIMATORS)
        'exact'
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_positive(name: str, value: float) -> None:
    """``ValueError`` naming the argument unless ``value > 0`` (NaN is refused)."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def check_non_negative(name: str, value: float) -> None:
    """``ValueError`` naming the argument unless ``value >= 0`` (NaN is refused)."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


class FisherError(RuntimeError):
    """The Fisher pass cannot produce a meaningful value (non-finite logits, unused layers...).

    Args:
        message: what went wrong.
        example_ids: the ids of the examples involved, when the fault is tied to examples.
    """

    def __init__(self, message: str, example_ids: Sequence[int] | None = None) -> None:
        super().__init__(message)
        self.example_ids: list[int] = [] if example_ids is None else [int(i) for i in example_ids]


class UnsupportedLayerError(ValueError):
    """A module with weights that the filter-wise Fisher has no rule for (named in the message).

    Args:
        message: what is wrong.
        layer: the qualified name of the module, when known (callers add how to leave it out).
    """

    def __init__(self, message: str, layer: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer
