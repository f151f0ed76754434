"""The likelihood objects against brute-force expectations over every label, on the logits.

For a likelihood, ``sum_k c_k |grad s_k|^2`` (its exact terms) must equal
``E_y |grad log p(y|x)|^2`` computed by enumerating every label y (every class, or every 0/1
vector of a few outputs), the gradient taken with respect to the logits by autograd.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from t2v_lightning.choices import LIKELIHOODS, FisherError
from t2v_lightning.fisher.likelihoods import LIKELIHOOD_OBJECTS, likelihood_object

EXACT_RTOL = 1e-5  # float32 terms against float64 enumeration


def _sq_grad(value: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(value, logits, retain_graph=True)
    return grad.double().square().sum()


def _labels(name: str, outputs: int) -> list[torch.Tensor]:
    if name == "categorical":
        return [torch.tensor([k]) for k in range(outputs)]
    return [
        torch.tensor([values], dtype=torch.float32)
        for values in itertools.product((0.0, 1.0), repeat=outputs)
    ]


def test_every_likelihood_has_its_object() -> None:
    assert tuple(LIKELIHOOD_OBJECTS) == LIKELIHOODS
    with pytest.raises(
        ValueError, match=r"likelihood must be one of \('categorical', 'bernoulli'\), got 'poisson'"
    ):
        likelihood_object("poisson")


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_exact_terms_are_the_expectation_over_every_label(name: str) -> None:
    torch.manual_seed(0)
    likelihood = likelihood_object(name)
    logits = torch.randn(1, 4, requires_grad=True)
    predictions = likelihood.predict(logits)
    exact = sum(
        factor.double()[0] * _sq_grad(score[0], logits)
        for score, factor in likelihood.exact_terms(predictions)
    )
    expectation = torch.zeros((), dtype=torch.float64)
    for labels in _labels(name, 4):
        log_p = likelihood.log_likelihood(predictions, labels)[0]
        expectation += log_p.detach().double().exp() * _sq_grad(log_p, logits)
    torch.testing.assert_close(exact, expectation, rtol=EXACT_RTOL, atol=0)


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_predict_refuses_wrong_shapes_and_names_non_finite_examples(name: str) -> None:
    likelihood = likelihood_object(name)
    with pytest.raises(FisherError, match=r"logits of shape \(batch, "):
        likelihood.predict(torch.zeros(2, 3, 4))
    logits = torch.zeros(3, 2)
    logits[1, 0] = float("nan")
    with pytest.raises(FisherError, match=r"example ids \[11\]"):
        likelihood.predict(logits, torch.tensor([10, 11, 12]))
