r"""One object per likelihood: what the Fisher estimators need to know about the model's outputs.

The Fisher is the expected square of the score :math:`\nabla_w \log p_w(y|x)` under labels drawn
from the model itself. An estimator (:mod:`t2v_lightning.fisher.estimators`) needs three things
from the likelihood, and nothing else:

* :meth:`~OutputLikelihood.predict`: from the network's logits, the float32 *scores* whose
  gradients are taken (checked: shape, NaN / inf) and the detached probabilities;
* :meth:`~OutputLikelihood.sample` and :meth:`~OutputLikelihood.log_likelihood`: labels drawn
  by example id, and :math:`\log p(y|x)` per example (``per_sample``, ``batch``);
* :meth:`~OutputLikelihood.exact_terms`: terms :math:`(s_k, c_k)` with
  :math:`\mathbb{E}_y[\lVert\nabla \log p(y|x)\rVert^2] = \sum_k c_k \lVert \nabla s_k \rVert^2`,
  one backward pass each (``exact``).

**Categorical** (one class per example, softmax over the logits): the scores are the
log-probabilities, and the exact expectation is :math:`\sum_y p(y|x)\lVert\nabla\log p(y|x)\rVert^2`,
one term per class.

**Bernoulli** (multi-label: :math:`K` independent outputs, :math:`q_k = \sigma(z_k)`,
:math:`\log p(y|x) = \sum_k y_k \log q_k + (1 - y_k) \log(1 - q_k)`): the scores are the logits.
The outputs' scores :math:`(y_k - q_k) \nabla z_k` are independent with zero mean, so
:math:`\mathbb{E}_y[(\sum_k s_k)^2] = \sum_k \mathbb{E}[s_k^2]` and

.. math::

    \sum_k \sum_{y_k \in \{0, 1\}} p(y_k|x) \lVert \nabla \log p(y_k|x) \rVert^2
    = \sum_k q_k (1 - q_k) \lVert \nabla z_k \rVert^2,

one term per output. ``per_sample`` draws every :math:`y_k` from :math:`\text{Bernoulli}(q_k)`,
seeded by example id, draw and output.

Adding a likelihood (say one categorical per token position of a language model, padding
masked by the attention mask) is one more subclass of :class:`OutputLikelihood` and one entry in
:data:`LIKELIHOOD_OBJECTS`: :meth:`~OutputLikelihood.predict` receives the batch's inputs, so
it can read ``inputs["attention_mask"]``; its :meth:`~OutputLikelihood.log_likelihood` sums
over the real positions (padded ones then get no gradient); its
:meth:`~OutputLikelihood.exact_terms` may refuse with a :class:`FisherError` saying why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from t2v_lightning.choices import LIKELIHOODS, FisherError, Likelihood, check_choice
from t2v_lightning.fisher.faults import check_finite_logits
from t2v_lightning.fisher.sampling import sample_labels, sample_multilabels

__all__ = [
    "BernoulliLikelihood",
    "CategoricalLikelihood",
    "LIKELIHOOD_OBJECTS",
    "OutputLikelihood",
    "Predictions",
    "likelihood_object",
]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


class Predictions(NamedTuple):
    """The model's outputs on one batch, as a likelihood reads them."""

    scores: torch.Tensor
    """float32, in the graph: what :meth:`OutputLikelihood.log_likelihood` differentiates."""
    probs: torch.Tensor
    """Detached probabilities that the labels are drawn from."""


def _shape_of(logits: object) -> object:
    return tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__


class OutputLikelihood:
    """The likelihood :math:`p(y|x)` of the model's outputs; subclasses say which one.

    Attributes:
        name: the value of ``likelihood=`` that selects it.
    """

    name: str = ""

    def predict(
        self, logits: torch.Tensor, ids: torch.Tensor | None = None, inputs: Inputs | None = None
    ) -> Predictions:
        """Scores and probabilities of a batch; :class:`FisherError` on a wrong shape or NaN/inf.

        Args:
            logits: the network's output.
            ids: the examples' ids (named in errors).
            inputs: the batch's inputs (a likelihood over positions reads its mask there).
        """
        raise NotImplementedError

    def sample(
        self, predictions: Predictions, ids: torch.Tensor, seed: int, draw: int
    ) -> torch.Tensor:
        """Labels drawn from the probabilities, a pure function of ``(seed, id, draw)``."""
        raise NotImplementedError

    def log_likelihood(self, predictions: Predictions, labels: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(y|x)` of each example (float32, in the graph)."""
        raise NotImplementedError

    def exact_terms(self, predictions: Predictions) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        r"""Terms :math:`(s_k, c_k)`, each ``(B,)``, with :math:`\mathbb{E}_y[\lVert\nabla\log p\rVert^2]
        = \sum_k c_k \lVert \nabla s_k \rVert^2` per example (:math:`c_k` detached)."""
        raise NotImplementedError


class CategoricalLikelihood(OutputLikelihood):
    """One class per example: a softmax over logits of shape (batch, classes)."""

    name = "categorical"

    def predict(
        self, logits: torch.Tensor, ids: torch.Tensor | None = None, inputs: Inputs | None = None
    ) -> Predictions:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise FisherError(
                "the network must return logits of shape (batch, classes), got "
                f"{_shape_of(logits)}"
            )
        check_finite_logits(logits, ids)
        log_probs = logits.float().log_softmax(-1)
        check_finite_logits(log_probs, ids, "log-probabilities")
        return Predictions(log_probs, log_probs.detach().exp())

    def sample(
        self, predictions: Predictions, ids: torch.Tensor, seed: int, draw: int
    ) -> torch.Tensor:
        return sample_labels(predictions.probs, ids, seed, draw)

    def log_likelihood(self, predictions: Predictions, labels: torch.Tensor) -> torch.Tensor:
        return predictions.scores.gather(1, labels.unsqueeze(1)).squeeze(1)

    def exact_terms(self, predictions: Predictions) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        log_probs, probs = predictions
        return [(log_probs[:, label], probs[:, label]) for label in range(probs.shape[1])]


class BernoulliLikelihood(OutputLikelihood):
    """Multi-label: an independent sigmoid per output of logits of shape (batch, outputs)."""

    name = "bernoulli"

    def predict(
        self, logits: torch.Tensor, ids: torch.Tensor | None = None, inputs: Inputs | None = None
    ) -> Predictions:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise FisherError(
                "the network must return logits of shape (batch, outputs), got "
                f"{_shape_of(logits)}"
            )
        check_finite_logits(logits, ids)
        logits32 = logits.float()
        return Predictions(logits32, logits32.detach().sigmoid())

    def sample(
        self, predictions: Predictions, ids: torch.Tensor, seed: int, draw: int
    ) -> torch.Tensor:
        return sample_multilabels(predictions.probs, ids, seed, draw)

    def log_likelihood(self, predictions: Predictions, labels: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_k y_k \log \sigma(z_k) + (1 - y_k) \log \sigma(-z_k)` per row (float32)."""
        logits = predictions.scores
        return -F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(-1)

    def exact_terms(self, predictions: Predictions) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        # Σ_{y∈{0,1}} p(y)·(∂ log p(y)/∂z)² = q(1-q)² + (1-q)q² = q(1-q): one term per output.
        logits, probs = predictions
        variance = probs * (1.0 - probs)
        return [(logits[:, k], variance[:, k]) for k in range(logits.shape[1])]


LIKELIHOOD_OBJECTS: dict[str, OutputLikelihood] = {
    likelihood.name: likelihood for likelihood in (CategoricalLikelihood(), BernoulliLikelihood())
}
"""``likelihood=`` value → the object that implements it (one per :data:`LIKELIHOODS`)."""


def likelihood_object(likelihood: Likelihood | str) -> OutputLikelihood:
    """The object of ``likelihood`` (``ValueError`` naming the argument when it is unknown)."""
    return LIKELIHOOD_OBJECTS[check_choice("likelihood", likelihood, LIKELIHOODS)]
