r"""The Fisher of a causal language model: layers over sequences and the token likelihood.

A language-model task is a set of token sequences :math:`x_n` (with an attention mask
:math:`m_n`). The log-likelihood of sampled next tokens of one sequence sums over its real
positions,

.. math::

    \ell_n = \sum_{t:\, m_{n,t} = 1} \log p(y_{n,t} \mid x_{n, \le t}),
    \qquad y_{n,t} \sim p(\cdot \mid x_{n, \le t}),

each :math:`y_{n,t}` drawn from the logits *at* position :math:`t` and scored there (SPEC
section 8, item 1). A sequence is one example: the per-sequence gradient of a weight sums over
positions, and the rules of the layer table (:mod:`t2v_lightning.fisher.layers.table`) give the
squared norms of its rows from ``(B, T, ...)`` inputs and output gradients — the token and
position tables (``nn.Embedding``, repeated tokens summed before squaring, no per-sequence table
gradient materialised), HF ``Conv1D`` (one row per input feature), ``nn.Linear``, ``LayerNorm``
and RMSNorm.

What is particular to sequences lives here:

* :class:`SequenceTaps`: the output-gradient hooks, with padded positions masked by the attention
  mask (their gradients set to zero before any rule runs, so how a sequence was padded does not
  change its Fisher), lookup tables as the roots of the backward graph, and the ``batch``
  estimator's mini-batch seen as one sequence (:func:`as_one_sequence`);
* :class:`TokenCategorical`: the likelihood object — label draws keyed by sequence id and real
  position, the score's gradient;
* :func:`position_ids_from_mask`: positions counted over real tokens, so that left padding does
  not shift them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from t2v_lightning.causal_lm import position_ids_from_mask
from t2v_lightning.choices import FisherError, UnsupportedLayerError
from t2v_lightning.fisher.layers.rule import LayerRule, layer_weight
from t2v_lightning.fisher.layers.table import layer_rule
from t2v_lightning.fisher.likelihoods import CategoricalLikelihood, OutputLikelihood, Predictions
from t2v_lightning.fisher.sampling import inverse_cdf, uniform_by_id
from t2v_lightning.fisher.taps import freeze_parameters, release, tap_output, unscaled

Inputs = torch.Tensor | Mapping[str, torch.Tensor]

__all__ = [
    "EXACT_REFUSED",
    "TOKEN_LIKELIHOOD",
    "sample_tokens",
    "SequenceLayer",
    "SequenceTaps",
    "TokenCategorical",
    "as_one_sequence",
    "position_ids_from_mask",
    "sequence_layers",
    "token_draw_ids",
]


@dataclass(frozen=True)
class SequenceLayer:
    """One embedded layer: its qualified name, module and rule (from the layer table)."""

    name: str
    module: nn.Module
    rule: LayerRule

    @property
    def weight(self) -> torch.Tensor:
        """The layer's weight parameter."""
        return layer_weight(self.module)

    @property
    def num_rows(self) -> int:
        """Values this layer contributes to the embedding."""
        return self.rule.rows(self.module)

    @property
    def row_size(self) -> int:
        """Entries per row of ``weight.reshape(weight.shape[0], -1)``."""
        return self.rule.row_size(self.module)


def sequence_layers(body: nn.Module, prefix: str = "") -> list[SequenceLayer]:
    """The modules of ``body`` whose weights enter the embedding, in ``named_modules`` order.

    Every module owning a ``weight`` parameter (biases are never embedded), with its rule.

    Args:
        body: the network without its LM head (the head is fitted per task, not embedded).
        prefix: prepended to the names (``"transformer."`` names layers as in the full model).

    Raises:
        UnsupportedLayerError: a module with a weight that the layer table has no rule for.
    """
    layers: list[SequenceLayer] = []
    for name, module in body.named_modules():
        if module._parameters.get("weight") is None:
            continue
        rule = layer_rule(prefix + name, module)
        if rule.output_child is not None:
            raise UnsupportedLayerError(
                f"layer {prefix + name!r} ({type(module).__name__}) reads its output gradient at "
                "a child; not supported in language models"
            )
        layers.append(SequenceLayer(prefix + name, module, rule))
    return layers


def token_draw_ids(sequence_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The key of each token's label draw: a function of its sequence's id and real position."""
    return sequence_ids.to(torch.int64) * (1 << 32) + positions.to(torch.int64)


def as_one_sequence(tensor: torch.Tensor) -> torch.Tensor:
    """A batch of sequences (B × T × ...) seen as one sequence (1 × B·T × ...).

    The ``batch`` estimator squares the gradient of a mini-batch's loss; the rules then give
    the squared rows of that one gradient.
    """
    return tensor.reshape(1, -1, *tensor.shape[2:])


EXACT_REFUSED = (
    "estimator='exact' is not offered for language models: the exact expectation over labels "
    "needs one backward pass per vocabulary entry at every position (V × positions per "
    "sequence); use 'per_sample' (unbiased, the default) or 'batch' (the published code's)"
)


class TokenCategorical(OutputLikelihood):
    r"""The likelihood of next tokens: one categorical distribution per real position.

    The logits are ``(B, T, V)`` and the batch's ``attention_mask`` says which positions are
    real; everything is over the M real positions, in order (:meth:`predict`). Labels are drawn
    by inverse CDF from uniforms keyed by ``(seed, token_draw_ids(sequence id, real position),
    draw)``, so a token's label does not depend on the batch, the padding or the order.

    The Fisher pass of :mod:`t2v_lightning.lm` needs the score's gradient at the final hidden
    state only: for a linear head :math:`W`, :math:`\nabla_h \log p_t(y) = W_y - \sum_k p_t(k)
    W_k` (:meth:`hidden_score_gradient`), so the logits never enter the autograd graph.
    """

    name = "token_categorical"

    def predict(
        self, logits: torch.Tensor, ids: torch.Tensor | None = None, inputs: Inputs | None = None
    ) -> Predictions:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise FisherError(
                f"a language model returns logits (batch, positions, vocabulary), got {shape}"
            )
        if not isinstance(inputs, Mapping) or "attention_mask" not in inputs:
            raise FisherError("the token likelihood needs the batch's attention_mask")
        real = inputs["attention_mask"].to(logits.device).bool()
        log_probs = self.log_probs(logits[real])
        return Predictions(log_probs, log_probs.detach().exp())

    def sample(
        self, predictions: Predictions, ids: torch.Tensor, seed: int, draw: int
    ) -> torch.Tensor:
        """One token per real position (``ids``: :func:`token_draw_ids` of those positions)."""
        return sample_tokens(predictions.probs, ids, seed, draw)

    # log p_t(y_t) per real position (M), as one categorical per row; a sequence's l_n sums its own.
    log_likelihood = CategoricalLikelihood.log_likelihood

    def exact_terms(self, predictions: Predictions) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        raise FisherError(EXACT_REFUSED)

    @staticmethod
    def hidden_score_gradient(
        probs: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor,
        expected_row: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:math:`\nabla_h \\log p_t(y_t) = W_{y_t} - \\sum_k p_t(k) W_k` for each real position (M × D).

        Args:
            probs: M × V probabilities from the head ``weight`` (V × D).
            labels: M tokens.
            weight: the head.
            expected_row: ``probs @ weight`` when already computed (several draws).
        """
        expected = probs @ weight if expected_row is None else expected_row
        return weight[labels] - expected

    @staticmethod
    def log_probs(logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities in float32, checked finite."""
        log_probs = logits.float().log_softmax(-1)
        if not bool(torch.isfinite(log_probs).all()):
            raise FisherError(
                "the language model produced non-finite logits (NaN or inf); its weights may hold "
                "NaN / inf, or its activations overflow"
            )
        return log_probs


def sample_tokens(
    probs: torch.Tensor, keys: torch.Tensor, seed: int, draw: int = 0, rows_per_chunk: int = 256
) -> torch.Tensor:
    """One token per row of ``probs`` (M × V): the distribution of the position it is scored at.

    Args:
        probs: next-token probabilities of M real positions.
        keys: :func:`token_draw_ids` of those positions (M).
        seed: the task's seed.
        draw: index of the draw (``mc_samples`` > 1).
        rows_per_chunk: rows whose float64 CDF is built at once (memory: × V × 8 bytes).
    """
    u = uniform_by_id(keys, seed, draw).to(probs.device)
    labels = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    for start in range(0, probs.shape[0], rows_per_chunk):
        part = slice(start, start + rows_per_chunk)
        labels[part] = inverse_cdf(probs[part], u[part])
    return labels.clamp_(max=probs.shape[-1] - 1)


TOKEN_LIKELIHOOD = TokenCategorical()
"""The likelihood object of language-model tasks."""


class SequenceTaps:
    """Hooks on a sequence model's embedded layers that turn output gradients into Fisher sums.

    Inside the context every parameter is frozen (backward computes input gradients only; the
    flags are restored on exit). Each forward records every embedded layer's input (a table's
    ids) and hooks its output's gradient; each backward adds, per layer, the sum over sequences
    of the squared per-sequence gradient rows (the layers' rules) to :attr:`sums`
    (float64).

    Args:
        network: the model whose layers are tapped.
        layers: from :func:`sequence_layers`.
        grad_scale: the factor the backward was scaled by (float16); gradients are divided by
            it in float32 before squaring.
    """

    def __init__(
        self, network: nn.Module, layers: Sequence[SequenceLayer], grad_scale: float = 1.0
    ) -> None:
        self._network = network
        self._grad_scale = float(grad_scale)
        self._layers = list(layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inputs: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self._mask: torch.Tensor | None = None
        self._one_sequence = False
        self._fired: set[str] = set()
        self.roots: list[torch.Tensor] = []
        self.sums: dict[str, torch.Tensor] = {}
        # Per layer, whether a value was NaN / inf: kept on the device (no wait for it in the
        # backward pass), read together by `nonfinite`.
        self._nonfinite: dict[str, torch.Tensor] = {}

    @property
    def nonfinite(self) -> set[str]:
        """The layers whose values held NaN or inf so far (one device sync for all)."""
        if not self._nonfinite:
            return set()
        names = list(self._nonfinite)
        flags = torch.stack([self._nonfinite[name] for name in names]).cpu().tolist()
        return {name for name, flag in zip(names, flags) if flag}

    def __enter__(self) -> SequenceTaps:
        self._saved_flags = freeze_parameters(self._network)
        for layer in self._layers:
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        release(self._handles, self._saved_flags)
        self._inputs.clear()
        self.roots.clear()

    def start_batch(self, attention_mask: torch.Tensor, one_sequence: bool = False) -> None:
        """Before a forward pass: the batch's mask (padded positions add nothing), and whether
        the batch is one sequence (the ``batch`` estimator)."""
        self._inputs.clear()
        self._calls.clear()
        self._fired.clear()
        self.roots.clear()
        self._mask = attention_mask.bool()
        self._one_sequence = one_sequence

    def check_all_fired(self) -> None:
        """Every embedded layer must have received a gradient; name those that did not."""
        missing = [layer.name for layer in self._layers if layer.name not in self._fired]
        if missing:
            raise FisherError(
                f"layers {missing[:5]} received no gradient from the logits; they cannot be "
                "embedded"
            )

    def _forward_hook(self, layer: SequenceLayer) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor | None:
            count = self._calls.get(layer.name, 0) + 1
            self._calls[layer.name] = count
            if count > 1:
                raise UnsupportedLayerError(
                    f"layer {layer.name!r} runs more than once per forward pass (shared weights); "
                    "its per-sequence gradient is not a single closed form"
                )
            self._inputs[layer.name] = args[0].detach()
            return tap_output(layer.name, output, self._grad_hook(layer), self.roots)

        return hook

    def _grad_hook(self, layer: SequenceLayer) -> Callable[[torch.Tensor], None]:
        rule, module = layer.rule, layer.module

        def hook(grad: torch.Tensor) -> None:
            inputs = self._inputs[layer.name]
            mask = self._mask
            with torch.autocast(device_type=grad.device.type, enabled=False):
                grad32 = unscaled(grad, self._grad_scale)
                if mask is not None:
                    keep = mask.reshape(*mask.shape, *([1] * (grad32.ndim - mask.ndim)))
                    grad32 = torch.where(keep, grad32, 0.0)
                if self._one_sequence:
                    grad32, inputs = as_one_sequence(grad32), as_one_sequence(inputs)
                values = rule.sq_norms(module, inputs, grad32).sum(0).to(torch.float64)
            bad = ~torch.isfinite(values).all()
            seen = self._nonfinite.get(layer.name)
            self._nonfinite[layer.name] = bad if seen is None else seen | bad
            self._fired.add(layer.name)
            total = self.sums.get(layer.name)
            self.sums[layer.name] = values if total is None else total + values

        return hook
