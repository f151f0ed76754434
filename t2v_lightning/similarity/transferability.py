"""Transferability estimators: score a pretrained model for a target task from one forward pass.

Where Task2Vec compares *tasks* (one probe pass per target, whatever the size of the zoo), these
estimators score each *candidate model* from its own outputs on the target's labelled examples:
one forward pass of every candidate over the target. Every score here is higher-is-better.
Inputs are the candidate's penultimate features ``f`` (n × D, the input of its classifier head)
and/or its source-task predictions, and the target labels ``y`` in ``0 .. K − 1``. All the
arithmetic is float64.

* **LogME** (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning"): for each class k, the one-hot column y_k ∈ R^n is modelled as a Bayesian linear
  regression on the features, ``y_k = F w + ε`` with ``w ~ N(0, α⁻¹ I_D)``, ``ε ~ N(0, β⁻¹)``.
  Its log evidence

      L(α, β) = D/2 log α + n/2 log β − n/2 log 2π − β/2 ‖F m − y_k‖² − α/2 ‖m‖² − ½ log |A|,
      A = α I + β FᵀF,   m = β A⁻¹ Fᵀ y_k,

  is maximised over α, β by MacKay's fixed point, written with the thin SVD
  ``F = U diag(σ) Vᵀ`` (r = min(n, D) values, s_i = σ_i², z = Uᵀ y_k):
  ``γ = Σ β s_i / (α + β s_i)``, ``α ← γ / ‖m‖²``, ``β ← (n − γ) / ‖F m − y_k‖²``, where
  ``‖m‖² = Σ β² s_i z_i² / (α + β s_i)²``,
  ``‖F m − y_k‖² = Σ (α z_i / (α + β s_i))² + ‖y_k‖² − ‖z‖²`` and
  ``log |A| = Σ log(α + β s_i) + (D − r) log α``. LogME is the mean over classes of ``L / n``
  at the fixed point. (The authors' code stops after at most 11 iterations at a 1% change of
  α/β and mixes the last two iterates in L; we iterate to a tight tolerance and evaluate L at
  the final α, β, which is the quantity the paper defines.)
* **LEEP** (Nguyen et al. 2020): θ(x) ∈ Δ^Z, the candidate's softmax over its own Z source
  classes. The empirical joint ``P(y, z) = 1/n Σ_i θ(x_i)_z [y_i = y]`` gives
  ``P(y | z) = P(y, z) / Σ_y' P(y', z)`` and
  ``LEEP = 1/n Σ_i log Σ_z P(y_i | z) θ(x_i)_z``.
* **NCE** (Tran et al. 2019, "Transferability and Hardness of Supervised Classification
  Tasks"): with hard source labels ``z_i`` (here the candidate's predicted source class),
  ``NCE = −H(Y | Z) = Σ_{y,z} P(y, z) log P(y | z)`` over the empirical joint of (y_i, z_i).
* **H-score** (Bao et al. 2019, "An Information-Theoretic Approach to Transferability in Task
  Transfer Learning"): ``H(f) = tr(cov(f)⁺ cov(E[f | y]))``, where E[f | y] replaces each
  example's features by the mean of its class, and ⁺ is the pseudo-inverse. When the centred
  features span every direction orthogonal to the all-ones vector of R^n (n ≤ D in general
  position: the usual case for a few hundred target images and D ≥ 512), H-score equals K − 1
  for *every* model and ranks nothing; :func:`h_score_shrinkage` is the fix of Ibrahim et al.
  2022 ("Newer is not always better: rethinking transferability metrics, their peculiarities,
  stability and performance"): cov(f) replaced by its Ledoit–Wolf shrinkage
  ``Σ_a = (1 − a) S + a μ I`` (S the empirical covariance, μ = tr(S)/D, a the Ledoit–Wolf
  coefficient), and ``H_a(f) = tr(Σ_a⁻¹ (1 − a) cov(E[f | y]))``.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from t2v_lightning.choices import check_choice
from t2v_lightning.safety import is_int

__all__ = [
    "TRANSFERABILITY_METHODS",
    "TransferabilityMethod",
    "h_score",
    "h_score_shrinkage",
    "leep",
    "ledoit_wolf_shrinkage",
    "logme",
    "logme_evidence",
    "nce",
    "transferability",
]

TransferabilityMethod = Literal["logme", "leep", "nce", "hscore", "hscore_shrinkage"]
TRANSFERABILITY_METHODS: tuple[str, ...] = get_args(TransferabilityMethod)
"""The estimators :func:`transferability` knows, by name."""

_NEEDS_PREDICTIONS = ("leep", "nce")


# ------------------------------------------------------------------------------ input checks
def _labels(labels: torch.Tensor, n: int | None, name: str = "labels") -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D integer tensor, got {labels.dtype} of shape "
            f"{tuple(labels.shape)}"
        )
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries for {n} examples")
    if labels.numel() < 2:
        raise ValueError(f"{name} must hold at least two examples, got {labels.numel()}")
    if int(labels.min()) < 0:
        raise ValueError(f"{name} must be class indices >= 0, got {int(labels.min())}")
    return labels.long().cpu()


def _centred(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The checked features with their mean removed, and the checked labels."""
    f = _matrix(features, "features")
    y = _labels(labels, f.shape[0])
    return f - f.mean(0, keepdim=True), y


def _matrix(values: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(values).__name__}")
    if values.dim() != 2 or values.shape[0] < 2 or values.shape[1] < 1:
        raise ValueError(
            f"{name} must be an (examples x dims) matrix with at least two rows, "
            f"got shape {tuple(values.shape)}"
        )
    out = values.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return out


def _one_hot(labels: torch.Tensor) -> torch.Tensor:
    """(n, K) float64 indicators of the classes present, in increasing label order."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    return torch.nn.functional.one_hot(inverse, len(classes)).to(torch.float64)


# ------------------------------------------------------------------------------ LogME
def logme_evidence(
    features: torch.Tensor, targets: torch.Tensor, alpha: float, beta: float
) -> float:
    """The log evidence per example, ``L(α, β) / n``, of one regression target (module docs).

    Computed directly (``A = α I + β FᵀF`` built and factorised), not through the SVD: the
    reference against which :func:`logme` is tested, and a way to look at the evidence surface.

    Args:
        features: F, (n, D).
        targets: y, (n,) real values.
        alpha: prior precision α > 0 of the weights.
        beta: noise precision β > 0.
    """
    f = _matrix(features, "features")
    y = targets.detach().to(dtype=torch.float64, device="cpu").reshape(-1)
    if y.shape[0] != f.shape[0]:
        raise ValueError(f"targets has {y.shape[0]} entries for {f.shape[0]} examples")
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"alpha and beta must be positive, got {alpha!r}, {beta!r}")
    n, d = f.shape
    a = alpha * torch.eye(d, dtype=torch.float64) + beta * f.T @ f
    m = beta * torch.linalg.solve(a, f.T @ y)
    logdet = torch.linalg.slogdet(a).logabsdet
    value = (
        d / 2 * math.log(alpha)
        + n / 2 * math.log(beta)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * float(((f @ m - y) ** 2).sum())
        - alpha / 2 * float(m @ m)
        - 0.5 * float(logdet)
    )
    return value / n


def _logme_one(
    s: torch.Tensor,
    z: torch.Tensor,
    y_norm2: float,
    n: int,
    d: int,
    max_iterations: int,
    tolerance: float,
) -> tuple[float, float, float]:
    alpha, beta = 1.0, 1.0
    z2 = z * z
    out_of_span = max(y_norm2 - float(z2.sum()), 0.0)
    for _ in range(max_iterations):
        denominator = alpha + beta * s
        gamma = float((beta * s / denominator).sum())
        m2 = float((beta * beta * s * z2 / denominator**2).sum())
        residual = float(((alpha / denominator) ** 2 * z2).sum()) + out_of_span
        new_alpha = gamma / max(m2, 1e-300)
        new_beta = (n - gamma) / max(residual, 1e-300)
        if not (0.0 < new_alpha < math.inf and 0.0 < new_beta < math.inf):
            # gamma rounded to n in float64 (features of extreme scale fit every target
            # exactly): the step leaves the domain; keep the last (alpha, beta), both positive.
            break
        change = max(abs(new_alpha - alpha) / alpha, abs(new_beta - beta) / beta)
        alpha, beta = new_alpha, new_beta
        if change < tolerance:
            break
    denominator = alpha + beta * s
    m2 = float((beta * beta * s * z2 / denominator**2).sum())
    residual = float(((alpha / denominator) ** 2 * z2).sum()) + out_of_span
    logdet = float(torch.log(denominator).sum()) + (d - len(s)) * math.log(alpha)
    evidence = (
        d / 2 * math.log(alpha)
        + n / 2 * math.log(beta)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual
        - alpha / 2 * m2
        - 0.5 * logdet
    )
    return evidence / n, alpha, beta


def logme(
    features: torch.Tensor,
    labels: torch.Tensor,
    max_iterations: int = 100,
    tolerance: float = 1e-10,
) -> float:
    """LogME (You et al. 2021): the mean over classes of the maximised log evidence per example.

    See the module docstring for the model and the fixed point. Higher is better.

    Args:
        features: the candidate's penultimate features on the target, (n, D).
        labels: the target labels, (n,) integers (classes absent from ``labels`` are ignored).
        max_iterations: at most this many fixed-point updates per class.
        tolerance: stop when α and β both change by less than this relative amount.

    Returns:
        The score as a Python float.

    Example:
        >>> import torch
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> good = torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.0, 1.0], [0.0, 0.9]])
        >>> bad = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.1, 0.0], [0.0, 0.9]])
        >>> logme(good, labels) > logme(bad, labels)
        True
    """
    f = _matrix(features, "features")
    y = _one_hot(_labels(labels, f.shape[0]))
    if not is_int(max_iterations) or max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive int, got {max_iterations!r}")
    n, d = f.shape
    u, sigma, _ = torch.linalg.svd(f, full_matrices=False)
    s = sigma**2
    if float(s.mean()) > 0:
        # The maximised evidence does not change when F is scaled (alpha absorbs it); the fixed
        # point converges in far fewer steps, and stays in float64's range, at unit mean scale.
        s = s / s.mean()
    z = u.T @ y  # (r, K)
    values = [
        _logme_one(s, z[:, k], float(y[:, k] @ y[:, k]), n, d, max_iterations, tolerance)[0]
        for k in range(y.shape[1])
    ]
    return float(sum(values) / len(values))


# ------------------------------------------------------------------------------ LEEP and NCE
def leep(source_probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """LEEP (Nguyen et al. 2020): the mean log-likelihood of the expected empirical predictor.

    Args:
        source_probabilities: θ(x_i), the candidate's probabilities over its own source classes
            on each target example, (n, Z); rows must sum to one.
        labels: the target labels, (n,).

    Returns:
        ``1/n Σ_i log Σ_z P(y_i | z) θ(x_i)_z`` (at most 0; higher is better).
    """
    theta = _matrix(source_probabilities, "source_probabilities")
    y = _one_hot(_labels(labels, theta.shape[0]))
    if bool((theta < 0).any()) or not torch.allclose(
        theta.sum(1), torch.ones(len(theta), dtype=torch.float64), atol=1e-4
    ):
        raise ValueError(
            "source_probabilities must be non-negative rows that sum to one "
            "(a softmax over the source classes)"
        )
    joint = y.T @ theta / theta.shape[0]  # (K, Z): P(y, z)
    marginal = joint.sum(0, keepdim=True)  # P(z)
    conditional = joint / marginal.clamp_min(1e-300)  # P(y | z); columns of unused z are 0
    likelihood = ((theta @ conditional.T) * y).sum(1)
    return float(torch.log(likelihood.clamp_min(1e-300)).mean())


def nce(source_labels: torch.Tensor, labels: torch.Tensor) -> float:
    """NCE (Tran et al. 2019): the negative conditional entropy ``−H(Y | Z)`` of the target labels
    given the source labels, on their empirical joint distribution.

    Args:
        source_labels: z_i, a source-task label of each target example (for a model: its
            predicted source class), (n,).
        labels: the target labels y_i, (n,).

    Returns:
        ``Σ_{y,z} P(y, z) log P(y | z)`` (at most 0; 0 when z determines y).
    """
    z = _labels(source_labels, None, "source_labels")
    y = _labels(labels, z.shape[0])
    joint = _one_hot(y).T @ _one_hot(z) / len(y)  # (K, Z) over the classes present
    marginal = joint.sum(0, keepdim=True)
    present = joint > 0
    return float((joint[present] * torch.log((joint / marginal)[present])).sum())


# ------------------------------------------------------------------------------ H-score
def _class_projection_terms(f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For centred features ``f = U diag(σ) Vᵀ`` (thin SVD): ``σ²`` and ``diag(Uᵀ P U)``, P the
    n × n matrix that replaces each row by its class mean (so ``E[f | y] = P f``)."""
    u, sigma, _ = torch.linalg.svd(f, full_matrices=False)
    indicators = _one_hot(y)
    projected = u.T @ indicators  # (r, K)
    return sigma**2, (projected**2 / indicators.sum(0)).sum(1)


def h_score(features: torch.Tensor, labels: torch.Tensor) -> float:
    """H-score (Bao et al. 2019): ``tr(cov(f)⁺ cov(E[f | y]))``.

    With the centred features ``X = U diag(σ) Vᵀ`` and P the class-mean matrix (``E[f | y] =
    P X``), ``cov(E[f | y]) = XᵀPX / (n − 1)`` lies in the span of V, so the trace is
    ``Σ_i (Uᵀ P U)_ii`` over the singular directions kept by the pseudo-inverse: those with
    ``σ_i² > max(n, D) · eps · σ_max²`` (``torch.linalg.pinv``'s default cut-off on cov(f)).
    That costs O(n² D) instead of the D × D inverse. With n ≤ D the score is K − 1 for any
    features in general position (module docs): use :func:`h_score_shrinkage` there.

    Args:
        features: the candidate's penultimate features on the target, (n, D).
        labels: the target labels, (n,).
    """
    f, y = _centred(features, labels)
    s, diagonal = _class_projection_terms(f, y)
    if len(s) == 0 or float(s.max()) == 0.0:
        return 0.0
    kept = s > max(f.shape) * torch.finfo(torch.float64).eps * s.max()
    return float(diagonal[kept].sum())


def ledoit_wolf_shrinkage(features: torch.Tensor) -> float:
    """The Ledoit–Wolf (2004) shrinkage coefficient ``a ∈ [0, 1]`` of the features' covariance.

    With X the centred features (n × D), S = XᵀX / n, μ = tr(S) / D:
    ``δ = ‖S − μ I‖²_F / D``, ``b = min(δ, (Σ_i ‖x_i x_iᵀ − S‖²_F / n²) / D)`` written as in
    scikit-learn's ``ledoit_wolf_shrinkage``, and ``a = b / δ`` (0 when b = 0). The D × D
    products are taken as n × n ones (``‖XᵀX‖²_F = ‖XXᵀ‖²_F``).
    """
    x = _matrix(features, "features")
    x = x - x.mean(0, keepdim=True)
    n, d = x.shape
    x2 = x * x
    trace_terms = x2.sum(0) / n
    mu = float(trace_terms.sum()) / d
    beta_sum = float((x2.sum(1) ** 2).sum())  # Σ_jk Σ_i x_ij² x_ik² = Σ_i ‖x_i‖⁴
    delta_sum = float(((x @ x.T) ** 2).sum()) / n**2
    beta = (beta_sum / n - delta_sum) / (d * n)
    delta = (delta_sum - 2 * mu * float(trace_terms.sum()) + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0 else beta / delta


def h_score_shrinkage(features: torch.Tensor, labels: torch.Tensor) -> float:
    """H-score with a Ledoit–Wolf shrunk feature covariance (Ibrahim et al. 2022).

    ``tr(Σ_a⁻¹ (1 − a) cov(E[f | y]))`` with ``Σ_a = (1 − a) S + a μ I``, S = XᵀX / n the
    empirical covariance of the centred features, μ = tr(S) / D, a :func:`ledoit_wolf_shrinkage`
    and ``cov(E[f | y]) = XᵀPX / n``. In the SVD ``X = U diag(σ) Vᵀ`` this is
    ``Σ_i (1 − a) (σ_i² / n) (Uᵀ P U)_ii / ((1 − a) σ_i² / n + a μ)``: O(n² D), no D × D
    inverse. Unlike :func:`h_score` it still ranks models when the target has fewer examples
    than features.

    Args:
        features: the candidate's penultimate features on the target, (n, D).
        labels: the target labels, (n,).
    """
    f, y = _centred(features, labels)
    n, d = f.shape
    a = ledoit_wolf_shrinkage(f)
    mu = float((f * f).sum()) / (n * d)
    if mu == 0.0 or a >= 1.0:  # constant features, or nothing left of S: no signal to rank
        return 0.0
    s, diagonal = _class_projection_terms(f, y)
    signal = (1 - a) * s / n
    return float((signal * diagonal / (signal + a * mu)).sum())


# ------------------------------------------------------------------------------ by name
def transferability(
    method: TransferabilityMethod,
    labels: torch.Tensor,
    features: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
) -> float:
    """The score of one candidate by the estimator named ``method`` (higher is better).

    Args:
        method: one of :data:`TRANSFERABILITY_METHODS`.
        labels: the target labels, (n,).
        features: the candidate's penultimate features (``logme``, ``hscore``,
            ``hscore_shrinkage``).
        logits: the candidate's source-class logits (``leep``: their softmax; ``nce``: their
            argmax).

    Raises:
        ValueError: unknown method, or the input it needs is missing.
    """
    check_choice("method", method, TRANSFERABILITY_METHODS)
    if method in _NEEDS_PREDICTIONS:
        if logits is None:
            raise ValueError(f"{method} needs the candidate's source-class logits (logits=...)")
        if method == "leep":
            return leep(torch.softmax(logits.detach().to(torch.float64), dim=1), labels)
        return nce(logits.argmax(1), labels)
    if features is None:
        raise ValueError(f"{method} needs the candidate's penultimate features (features=...)")
    if method == "logme":
        return logme(features, labels)
    if method == "hscore":
        return h_score(features, labels)
    return h_score_shrinkage(features, labels)
