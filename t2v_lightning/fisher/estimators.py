r"""The per-batch step of the Monte Carlo Fisher: one loop per estimator, any likelihood.

For a probe with weights :math:`w`, examples :math:`x_n` and labels drawn from the model itself,

.. math::

    F = \frac{1}{N} \sum_n \mathbb{E}_{y \sim p_w(y|x_n)}
        \left[ \nabla_w \log p_w(y|x_n) ^{\odot 2} \right].

Task2Vec keeps one number per filter: the weight-Fisher of each layer reshaped to
``(rows, -1)`` and averaged over each row. Only the per-example squared *row norms*
:math:`\lVert g_n[o, :] \rVert^2` are needed; each layer type's rule computes them in closed form
from the layer's input and output gradient (:mod:`t2v_lightning.fisher.layers`, SPEC 3.1), read
by the hooks of :class:`~t2v_lightning.fisher.taps.LayerFisherTaps`. So the backward pass
computes input gradients only, never weight gradients, and the per-example weights of the
estimators enter the loss as :math:`\sqrt{w_n}`, so that
:math:`\lVert \sqrt{w_n} g_n \rVert^2 = w_n \lVert g_n \rVert^2`.

Estimators (``estimator=``, :data:`ESTIMATOR_STEPS`):

* ``"per_sample"``: labels sampled from the model (``mc_samples`` draws per example), one
  backward pass per draw;
* ``"exact"``: the expectation over labels, one backward pass per term of the likelihood
  (per class for ``categorical``, per output for ``bernoulli``);
* ``"batch"``: the 2019 reference's estimator, the square of the *mean* gradient of each
  mini-batch, averaged over batches; its expectation is :math:`F/B` for batch size :math:`B`.

What each needs from the likelihood (scores, label draws, the exact expectation's terms) is the
likelihood object's (:mod:`t2v_lightning.fisher.likelihoods`). Labels are sampled by example id
(:mod:`t2v_lightning.fisher.sampling`), so results do not depend on batch order, batch size or
the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from t2v_lightning.choices import (
    ESTIMATORS,
    LIKELIHOODS,
    Estimator,
    FisherError,
    Likelihood,
    UnsupportedLayerError,
    check_choice,
)
from t2v_lightning.fisher.faults import check_finite_logits, nonfinite_ids, precision_hint
from t2v_lightning.fisher.layers.rule import layer_weight, sq_norms_of_rows
from t2v_lightning.fisher.layers.table import (
    embedded_layers,
    num_filters,
    per_example_sq_norms,
    row_size,
)
from t2v_lightning.fisher.likelihoods import OutputLikelihood, Predictions, likelihood_object
from t2v_lightning.fisher.sampling import (
    hash_seed,
    sample_labels,
    sample_multilabels,
    uniform_by_id,
)
from t2v_lightning.fisher.taps import LayerFisherTaps, unscaled
from t2v_lightning.probe import call_probe, find_nonfinite_layer

__all__ = [
    "Estimator",
    "ESTIMATORS",
    "ESTIMATOR_STEPS",
    "Likelihood",
    "LIKELIHOODS",
    "FisherError",
    "UnsupportedLayerError",
    "LayerFisherTaps",
    "embedded_layers",
    "sample_labels",
    "sample_multilabels",
    "batch_filter_sums",
    "eval_filter_sums",
    "filter_values",
    "hash_seed",
    "layer_weight",
    "num_filters",
    "per_example_sq_norms",
    "row_size",
    "uniform_by_id",
]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


@contextmanager
def _trainable(params: Sequence[nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _check_logits(
    network: nn.Module,
    taps: LayerFisherTaps,
    inputs: Inputs,
    logits: torch.Tensor,
    ids: torch.Tensor,
    forward_context: Callable[[], AbstractContextManager[object]],
) -> None:
    """Non-finite logits: raise naming the examples and the first layer that went non-finite."""
    if not isinstance(logits, torch.Tensor) or bool(torch.isfinite(logits).all()):
        return
    try:
        check_finite_logits(logits, ids)
    except FisherError as err:
        row = nonfinite_ids(logits, None)[:1]
        one = (
            {key: value[row] for key, value in inputs.items()}
            if isinstance(inputs, Mapping)
            else inputs[row]
        )
        with taps.paused(), forward_context():
            layer = find_nonfinite_layer(network, one)
        where = f"; first non-finite layer: {layer}" if layer else ""
        raise FisherError(f"{err}{where}", example_ids=err.example_ids) from None


Sums = tuple[dict[str, torch.Tensor], int]


@dataclass(frozen=True)
class _Batch:
    """One batch's Fisher step: what every estimator reads."""

    network: nn.Module
    taps: LayerFisherTaps
    inputs: Inputs
    ids: torch.Tensor
    valid: torch.Tensor
    likelihood: OutputLikelihood
    seed: int
    mc_samples: int
    forward_context: Callable[[], AbstractContextManager[object]]

    def predict(self) -> Predictions:
        """The network's predictions on the batch, checked (the examples named on NaN / inf)."""
        with self.forward_context():
            logits = call_probe(self.network, self.inputs)
        _check_logits(self.network, self.taps, self.inputs, logits, self.ids, self.forward_context)
        return self.likelihood.predict(logits, self.ids, self.inputs)


def _exact_backwards(batch: _Batch, predictions: Predictions, weight: torch.Tensor) -> None:
    """One backward pass per term of the exact expectation, weighted by the term's factor."""
    terms = batch.likelihood.exact_terms(predictions)
    for k, (score, factor) in enumerate(terms):
        loss = (score * (factor * weight).sqrt()).sum()
        batch.taps.backward(loss, retain_graph=k < len(terms) - 1)


def _per_sample_backwards(batch: _Batch, predictions: Predictions, weight: torch.Tensor) -> None:
    """One backward pass per draw of labels, each weighted ``1 / mc_samples``."""
    draws = batch.mc_samples
    draw_weight = weight / draws
    for draw in range(draws):
        labels = batch.likelihood.sample(predictions, batch.ids, batch.seed, draw)
        picked = batch.likelihood.log_likelihood(predictions, labels)
        batch.taps.backward((picked * draw_weight.sqrt()).sum(), retain_graph=draw < draws - 1)


def _per_example_step(
    backwards: Callable[[_Batch, Predictions, torch.Tensor], None],
) -> Callable[[_Batch], Sums]:
    """A step that sums per-example squared gradient rows through the taps."""

    def step(batch: _Batch) -> Sums:
        predictions = batch.predict()
        backwards(batch, predictions, batch.valid.to(predictions.scores.device, torch.float32))
        batch.taps.check_all_fired()
        batch.taps.check_finite(batch.ids)
        return dict(batch.taps.batch_sums), int(batch.valid.sum())

    return step


def _batch_step(batch: _Batch) -> Sums:
    """The square of the batch's mean gradient: one batch counted."""
    return _batch_gradient_sums(batch), 1


ESTIMATOR_STEPS: dict[str, Callable[[_Batch], Sums]] = {
    "per_sample": _per_example_step(_per_sample_backwards),
    "batch": _batch_step,
    "exact": _per_example_step(_exact_backwards),
}
"""``estimator=`` value → its per-batch step (one per :data:`ESTIMATORS`)."""


def batch_filter_sums(
    network: nn.Module,
    taps: LayerFisherTaps,
    inputs: Inputs,
    ids: torch.Tensor,
    valid: torch.Tensor,
    estimator: Estimator,
    seed: int,
    mc_samples: int = 1,
    forward_context: Callable[[], AbstractContextManager[object]] = nullcontext,
    likelihood: Likelihood = "categorical",
) -> tuple[dict[str, torch.Tensor], int]:
    """Fisher sums of one batch for every tapped layer.

    Args:
        network: the network (inside ``taps``' context).
        taps: the hooks installed on ``network``'s embedded layers.
        inputs: a batch of inputs: a tensor, or a mapping of tensors passed to the network as
            keyword arguments (``input_ids``, ``attention_mask``, ...).
        ids: int64 id of each example (label sampling is seeded by it).
        valid: bool mask; rows that are padding or were already counted contribute nothing.
        estimator: ``"per_sample"``, ``"exact"`` or ``"batch"``.
        seed: seed of the label sampling.
        mc_samples: labels drawn per example (``per_sample``).
        forward_context: context for the forward pass (autocast of the Trainer's precision).
        likelihood: ``"categorical"`` (softmax over the logits) or ``"bernoulli"`` (one
            independent sigmoid per output: multi-label tasks).

    Returns:
        ``(sums, count)``: per layer, fp32 per-filter sums of squared gradient rows (not yet
        divided by the row size); ``count`` is the number of examples (``per_sample``,
        ``exact``) or of batches (``batch``) they sum over.
    """
    if int(valid.sum()) == 0:
        return {}, 0
    form = likelihood_object(likelihood)
    step = ESTIMATOR_STEPS[check_choice("estimator", estimator, ESTIMATORS)]
    taps.start_batch(int(ids.shape[0]))
    return step(_Batch(network, taps, inputs, ids, valid, form, seed, mc_samples, forward_context))


def eval_filter_sums(
    forward: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    grad_scale: float,
    inputs: Inputs,
    ids: torch.Tensor,
    valid: torch.Tensor,
    forward_context: Callable[[], AbstractContextManager[object]],
    *,
    estimator: Estimator,
    seed: int,
    mc_samples: int,
    likelihood: Likelihood,
) -> tuple[dict[str, torch.Tensor], int]:
    """:func:`batch_filter_sums` with ``layers`` tapped and ``forward`` in eval mode meanwhile.

    Frozen batch-norm statistics, no dropout (SPEC section 7); each module's own mode is put back
    afterwards (a user's module may keep parts of itself in eval mode). ``grad_scale`` multiplies
    the loss before backward (the taps divide it out).
    """
    modes = [(module, module.training) for module in forward.modules()]
    forward.eval()
    try:
        with torch.enable_grad(), LayerFisherTaps(forward, layers, grad_scale) as taps:
            return batch_filter_sums(
                forward,
                taps,
                inputs,
                ids,
                valid,
                estimator,
                seed,
                mc_samples,
                forward_context=forward_context,
                likelihood=likelihood,
            )
    finally:
        for module, training in modes:
            module.training = training


def _batch_weight(name: str, module: nn.Module) -> nn.Parameter:
    """The one weight whose mini-batch gradient the ``batch`` estimator squares."""
    try:
        return layer_weight(module)
    except UnsupportedLayerError:
        raise UnsupportedLayerError(
            f"estimator='batch' squares the gradient of one weight per layer, and {name!r} "
            f"({type(module).__name__}) has several: use estimator='per_sample' or "
            f"leave it out with exclude=[{name!r}]",
            layer=name,
        ) from None


def _batch_gradient_sums(batch: _Batch) -> dict[str, torch.Tensor]:
    taps, ids, valid, likelihood = batch.taps, batch.ids, batch.valid, batch.likelihood
    layers = taps.layers
    weights = [_batch_weight(name, module) for name, module in layers]
    # Each weight's gradient is reduced to its per-filter sums as soon as backward has it and
    # then released (the hook hands autograd a zero-stride stand-in), so the step never holds
    # every layer's gradient at once. A weight shared by several layers is hooked once.
    names_of: dict[nn.Parameter, list[str]] = {}  # tensors hash by identity
    for (name, _), weight in zip(layers, weights):
        names_of.setdefault(weight, []).append(name)
    sums: dict[str, torch.Tensor] = {}
    scale = taps.grad_scale

    def reducer(names: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad32 = unscaled(grad, scale)
            value = sq_norms_of_rows(grad32.reshape(grad32.shape[0], -1))
            for name in names:
                sums[name] = value
            return grad.new_zeros(()).expand_as(grad)

        return hook

    with _trainable(weights), taps.paused():
        predictions = batch.predict()
        labels = likelihood.sample(predictions, ids, batch.seed, 0)
        picked = likelihood.log_likelihood(predictions, labels)
        mask = valid.to(predictions.scores.device, torch.float32)
        loss = (picked * mask).sum() / mask.sum()
        handles = [weight.register_hook(reducer(names)) for weight, names in names_of.items()]
        try:
            torch.autograd.grad(
                loss * scale if scale != 1.0 else loss, list(names_of), allow_unused=True
            )
        finally:
            for handle in handles:
                handle.remove()
    for name, _ in layers:
        if name not in sums:
            raise FisherError(f"layer {name!r} received no gradient from the logits")
    sums = {name: sums[name] for name, _ in layers}
    finite = torch.stack([torch.isfinite(value).all() for value in sums.values()]).cpu()
    if not bool(finite.all()):
        broken = [name for name, ok in zip(sums, finite.tolist()) if not ok]
        batch_ids = ids[valid.cpu()].tolist()
        raise FisherError(
            f"non-finite mini-batch gradient (NaN or inf) at layer {broken[-1]!r} for the batch of "
            f"example ids {batch_ids[:5]}{'...' if len(batch_ids) > 5 else ''}; {len(broken)} "
            f"layer(s) affected: {broken[:5]}. The squared gradients overflow, or the probe's "
            "weights or activations hold NaN / inf" + precision_hint(weights[0].dtype),
            example_ids=batch_ids,
        )
    return sums


def filter_values(
    sums: dict[str, torch.Tensor], count: int, layers: Sequence[tuple[str, nn.Module]]
) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """Divide the sums by the count and the row sizes; concatenate in layer order.

    Returns:
        ``(hessian, layers)``: the 1-D filter-wise Fisher and each layer's ``(start, stop)``.
    """
    if count <= 0:
        raise FisherError("no examples were accumulated; the Fisher is undefined")
    pieces: list[torch.Tensor] = []
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for name, module in layers:
        if name not in sums:
            raise FisherError(f"no Fisher was accumulated for layer {name!r}")
        value = sums[name].detach().to("cpu", torch.float64) / (count * row_size(module))
        if not bool(torch.isfinite(value.to(torch.float32)).all()):
            bad = (~torch.isfinite(value.to(torch.float32))).nonzero().flatten()
            raise FisherError(
                f"the Fisher of layer {name!r} is not finite in float32 at {bad.numel()} of its "
                f"{value.numel()} filters (first: filter {int(bad[0])}); no embedding is made. "
                "Its squared gradients overflow (weights of extreme scale?) or hold NaN"
            )
        pieces.append(value)
        offsets[name] = (position, position + value.numel())
        position += value.numel()
    hessian = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)
    return hessian.to(torch.float32), offsets
