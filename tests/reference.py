"""Brute-force references for the filter-wise Fisher, shared by the tests.

One example and one label at a time, ``torch.autograd.grad`` of ``log p(y|x)`` with respect to
each embedded layer's weight, accumulated in float64; no code is shared with the closed forms of
:mod:`t2v_lightning.fisher.estimators` (only :func:`embedded_layers`, which names the layers).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from t2v_lightning.fisher.estimators import embedded_layers

Inputs = torch.Tensor | Mapping[str, torch.Tensor]

__all__ = ["as_vector", "brute_force_fisher", "brute_force_joint", "brute_force_per_output"]


def as_vector(values: dict[str, torch.Tensor], layers: list[tuple[str, nn.Module]]) -> torch.Tensor:
    """The per-layer values concatenated in layer order (float64)."""
    return torch.cat([values[name].double() for name, _ in layers])


def _row_means(grad: torch.Tensor) -> torch.Tensor:
    return grad.double().reshape(grad.shape[0], -1).square().mean(-1)


def _example(inputs: Inputs, n: int) -> Inputs:
    if isinstance(inputs, Mapping):
        return {key: value[n : n + 1] for key, value in inputs.items()}
    return inputs[n : n + 1]


def _rows(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def _logits(network: nn.Module, inputs: Inputs) -> torch.Tensor:
    return network(**inputs) if isinstance(inputs, Mapping) else network(inputs)


@contextmanager
def _weight_grads(
    network: nn.Module, head: str | None
) -> Iterator[tuple[list[tuple[str, nn.Module]], list[torch.Tensor]]]:
    """Within the context only the embedded layers' weights require gradients."""
    layers = embedded_layers(network, head)
    weights = [cast(torch.Tensor, module.weight) for _, module in layers]
    flags = [p.requires_grad for p in network.parameters()]
    network.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    try:
        yield layers, weights
    finally:
        for p, flag in zip(network.parameters(), flags):
            p.requires_grad_(flag)


def _expectation(
    network: nn.Module,
    inputs: Inputs,
    head: str | None,
    log_likelihoods: Callable[[torch.Tensor], list[torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``(1/N) Σ_n Σ_y p(y|x_n) · rowmean(grad_w log p(y|x_n))²`` per layer."""
    with _weight_grads(network, head) as (layers, weights):
        totals = {
            name: torch.zeros(len(weight), dtype=torch.float64)
            for (name, _), weight in zip(layers, weights)
        }
        rows = _rows(inputs)
        for n in range(rows):
            logits = _logits(network, _example(inputs, n))[0]
            for log_p in log_likelihoods(logits):
                grads = torch.autograd.grad(log_p, weights, retain_graph=True)
                prob = float(log_p.detach().exp())
                for (name, _), grad in zip(layers, grads):
                    totals[name] += prob * _row_means(grad)
    return {name: value / rows for name, value in totals.items()}


def brute_force_fisher(
    network: nn.Module, inputs: Inputs, head: str | None
) -> dict[str, torch.Tensor]:
    """Exact filter-wise Fisher of a softmax classifier: every example and class in turn.

    ``inputs`` is a batch tensor or a mapping of batch tensors (keyword arguments of the network).
    """
    return _expectation(network, inputs, head, lambda logits: list(logits.log_softmax(-1)))


def brute_force_joint(network: nn.Module, inputs: torch.Tensor, head: str) -> torch.Tensor:
    """Multi-label (sigmoid) Fisher: Σ over all 2^K joint label vectors of p(y|x)·(squared rows)."""

    def joint(logits: torch.Tensor) -> list[torch.Tensor]:
        on, off = nn.functional.logsigmoid(logits), nn.functional.logsigmoid(-logits)
        return [
            (torch.tensor(bits) * on + (1 - torch.tensor(bits)) * off).sum()
            for bits in itertools.product((0.0, 1.0), repeat=logits.numel())
        ]

    values = _expectation(network, inputs, head, joint)
    return as_vector(values, embedded_layers(network, head))


def brute_force_per_output(network: nn.Module, inputs: torch.Tensor, head: str) -> torch.Tensor:
    """Multi-label Fisher as a sum over outputs: Σ_k Σ_{y_k} p(y_k|x)·(squared rows of log p(y_k|x))."""

    def per_output(logits: torch.Tensor) -> list[torch.Tensor]:
        return [
            nn.functional.logsigmoid(logit if outcome else -logit)
            for logit in logits
            for outcome in (0, 1)
        ]

    values = _expectation(network, inputs, head, per_output)
    return as_vector(values, embedded_layers(network, head))
