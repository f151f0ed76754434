"""Transferability estimators against brute-force and closed-form references.

* LogME: the log evidence is checked against the Gaussian marginal likelihood of the labels,
  ``y ~ N(0, β⁻¹ I + α⁻¹ F Fᵀ)`` (scipy), and LogME against that evidence maximised over
  (α, β) by a generic optimiser started from a grid, with more and with fewer examples than
  features.
* LEEP and NCE against the empirical conditionals written with Python loops and counters.
* H-score against numpy's covariances and pseudo-inverse, and its closed form K − 1 when the
  examples are fewer than the features; the shrinkage variant against scikit-learn's
  Ledoit–Wolf covariance.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from t2v_lightning.similarity.transferability import (
    TRANSFERABILITY_METHODS,
    h_score,
    h_score_shrinkage,
    ledoit_wolf_shrinkage,
    leep,
    logme,
    logme_evidence,
    nce,
    transferability,
)


def _data(
    n: int, d: int, k: int, seed: int = 0, signal: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    centres = rng.normal(size=(k, d)) * signal
    features = centres[labels] + rng.normal(size=(n, d))
    return torch.tensor(features), torch.tensor(labels)


# ------------------------------------------------------------------------------ LogME
@pytest.mark.parametrize(("n", "d"), [(12, 3), (5, 8)])
def test_logme_evidence_is_the_gaussian_marginal_likelihood(n: int, d: int) -> None:
    from scipy.stats import multivariate_normal

    features, labels = _data(n, d, 2, seed=n)
    y = (labels == 0).double()
    f = features.numpy()
    for alpha, beta in ((0.3, 2.0), (5.0, 0.1)):
        covariance = np.eye(n) / beta + f @ f.T / alpha
        expected = multivariate_normal(np.zeros(n), covariance).logpdf(y.numpy()) / n
        assert logme_evidence(features, y, alpha, beta) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(("n", "d", "k"), [(30, 4, 3), (6, 10, 2), (9, 9, 3)])
def test_logme_is_the_evidence_maximised_over_alpha_and_beta(n: int, d: int, k: int) -> None:
    from scipy.optimize import minimize

    features, labels = _data(n, d, k, seed=d)
    best_per_class = []
    for c in range(k):
        y = (labels == c).double()

        def negative(log_ab: np.ndarray, y: torch.Tensor = y) -> float:
            return -logme_evidence(features, y, math.exp(log_ab[0]), math.exp(log_ab[1]))

        grid = [(a, b) for a in np.linspace(-6, 6, 9) for b in np.linspace(-6, 6, 9)]
        start = min(grid, key=lambda ab: negative(np.array(ab)))
        found = minimize(
            negative,
            np.array(start),
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 20000},
        )
        best_per_class.append(-found.fun)
    assert logme(features, labels) == pytest.approx(float(np.mean(best_per_class)), abs=1e-8)


def test_logme_is_invariant_to_label_values_and_ranks_separable_above_noise() -> None:
    features, labels = _data(40, 6, 4, signal=3.0)
    assert logme(features, labels + 7) == pytest.approx(logme(features, labels), rel=1e-12)
    noise = torch.tensor(np.random.default_rng(5).normal(size=(40, 6)))
    assert logme(features, labels) > logme(noise, labels) + 0.1


# ------------------------------------------------------------------------------ LEEP, NCE
def test_logme_does_not_depend_on_the_scale_of_the_features() -> None:
    """The prior precision absorbs a scale: the maximised evidence is the same, also for scales
    where the unnormalised fixed point rounds gamma to n and fails (fewer examples than
    features)."""
    torch.manual_seed(0)
    features = torch.randn(10, 50, dtype=torch.float64)
    labels = torch.arange(10) % 3
    values = [logme(features * scale, labels) for scale in (1e-6, 1.0, 1e4, 1e9)]
    assert all(math.isfinite(v) for v in values)
    assert max(values) - min(values) < 1e-6


def test_leep_matches_the_empirical_conditional_written_as_loops() -> None:
    rng = np.random.default_rng(1)
    n, z_classes = 25, 4
    theta = rng.dirichlet(np.ones(z_classes), size=n)
    labels = rng.integers(0, 3, size=n)
    joint = {(y, z): 0.0 for y in range(3) for z in range(z_classes)}
    for i in range(n):
        for z in range(z_classes):
            joint[(int(labels[i]), z)] += theta[i, z] / n
    total = 0.0
    for i in range(n):
        likelihood = 0.0
        for z in range(z_classes):
            p_z = sum(joint[(y, z)] for y in range(3))
            likelihood += joint[(int(labels[i]), z)] / p_z * theta[i, z]
        total += math.log(likelihood)
    assert leep(torch.tensor(theta), torch.tensor(labels)) == pytest.approx(total / n, rel=1e-12)


def test_leep_prefers_predictions_that_determine_the_labels() -> None:
    labels = torch.arange(30) % 3
    sharp = torch.nn.functional.one_hot(labels, 5).double() * 0.9 + 0.02
    flat = torch.full((30, 5), 0.2, dtype=torch.float64)
    assert leep(sharp, labels) > leep(flat, labels)
    assert leep(flat, labels) == pytest.approx(math.log(1 / 3))  # P(y | z) = class frequency
    with pytest.raises(ValueError, match="sum to one"):
        leep(flat * 2, labels)


def test_nce_matches_the_conditional_entropy_written_as_loops() -> None:
    rng = np.random.default_rng(2)
    z = rng.integers(0, 5, size=40)
    y = rng.integers(0, 3, size=40)
    pairs = Counter(zip(z.tolist(), y.tolist()))
    sources = Counter(z.tolist())
    entropy = 0.0
    for (zi, _yi), count in pairs.items():
        entropy -= count / 40 * math.log(count / sources[zi])
    assert nce(torch.tensor(z), torch.tensor(y)) == pytest.approx(-entropy, rel=1e-12)
    assert nce(torch.tensor(y * 2 + 1), torch.tensor(y)) == pytest.approx(0.0, abs=1e-15)
    assert nce(torch.zeros(40, dtype=torch.long), torch.tensor(y)) < -0.9  # H(Y) of 3 classes


# ------------------------------------------------------------------------------ H-score
def test_h_score_matches_explicit_covariances() -> None:
    features, labels = _data(60, 5, 3, seed=3)
    f = features.numpy()
    g = np.zeros_like(f)
    for c in range(3):
        g[labels.numpy() == c] = f[labels.numpy() == c].mean(0)
    expected = np.trace(np.linalg.pinv(np.cov(f, rowvar=False)) @ np.cov(g, rowvar=False))
    assert h_score(features, labels) == pytest.approx(expected, rel=1e-9)
    noise = torch.tensor(np.random.default_rng(4).normal(size=(60, 5)))
    assert h_score(features, labels) > h_score(noise, labels)


def test_h_score_is_k_minus_1_for_any_features_when_examples_are_fewer_than_features() -> None:
    for seed in range(3):
        features, labels = _data(12, 20, 4, seed=seed, signal=float(seed))
        assert h_score(features, labels) == pytest.approx(3.0, abs=1e-6)


def test_ledoit_wolf_shrinkage_and_shrunk_h_score_match_scikit_learn() -> None:
    sklearn_covariance = pytest.importorskip("sklearn.covariance")
    for n, d in ((50, 6), (12, 20)):
        features, labels = _data(n, d, 3, seed=n)
        f = features.numpy()
        shrinkage = sklearn_covariance.ledoit_wolf_shrinkage(f - f.mean(0))
        assert ledoit_wolf_shrinkage(features) == pytest.approx(shrinkage, rel=1e-10)
        shrunk = sklearn_covariance.LedoitWolf().fit(f).covariance_
        centred = f - f.mean(0)
        g = np.zeros_like(centred)
        for c in range(3):
            g[labels.numpy() == c] = centred[labels.numpy() == c].mean(0)
        expected = np.trace(np.linalg.inv(shrunk) @ ((1 - shrinkage) * g.T @ g / n))
        assert h_score_shrinkage(features, labels) == pytest.approx(expected, rel=1e-8)
    # fewer examples than features: the shrunk score still ranks separable above noise
    features, labels = _data(12, 20, 3, seed=1, signal=3.0)
    noise = torch.tensor(np.random.default_rng(9).normal(size=(12, 20)))
    assert h_score_shrinkage(features, labels) > h_score_shrinkage(noise, labels)


# ------------------------------------------------------------------------------ by name
def test_transferability_dispatches_and_names_what_is_missing() -> None:
    features, labels = _data(20, 4, 2, seed=6)
    logits = torch.tensor(np.random.default_rng(6).normal(size=(20, 7)))
    assert transferability("logme", labels, features=features) == logme(features, labels)
    assert transferability("hscore", labels, features=features) == h_score(features, labels)
    assert transferability("leep", labels, logits=logits) == leep(torch.softmax(logits, 1), labels)
    assert transferability("nce", labels, logits=logits) == nce(logits.argmax(1), labels)
    assert set(TRANSFERABILITY_METHODS) == {"logme", "leep", "nce", "hscore", "hscore_shrinkage"}
    with pytest.raises(ValueError, match="needs the candidate's source-class logits"):
        transferability("leep", labels, features=features)
    with pytest.raises(ValueError, match="needs the candidate's penultimate features"):
        transferability("logme", labels, logits=logits)
    with pytest.raises(ValueError, match="method must be one of"):
        transferability("gbc", labels, features=features)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels has 3 entries for 20 examples"):
        logme(features, labels[:3])
    with pytest.raises(ValueError, match="features holds NaN"):
        logme(features * float("nan"), labels)
    with pytest.raises(ValueError, match="1-D integer"):
        nce(labels, labels.double())
