r"""Filter-wise Fisher of a causal language model: layer rules over sequences and the token likelihood.

A language-model task is a set of token sequences :math:`x_n` (with an attention mask
:math:`m_n`). The log-likelihood of sampled next tokens of one sequence sums over its real
positions,

.. math::

    \ell_n = \sum_{t:\, m_{n,t} = 1} \log p(y_{n,t} \mid x_{n, \le t}),
    \qquad y_{n,t} \sim p(\cdot \mid x_{n, \le t}),

each :math:`y_{n,t}` drawn from the logits *at* position :math:`t` and scored there (SPEC
section 8, item 1). The per-sequence gradient of a weight matrix is a sum over positions, so the
squared norm of one of its rows has closed forms in the layer's input :math:`a_{t}` and output
gradient :math:`\delta_{t}` (one sequence, positions :math:`t, s`):

* ``nn.Linear`` (weight ``(out, in)``, one value per output row):
  :math:`\lVert \sum_t \delta_t[o]\, a_t \rVert^2`;
* HF ``Conv1D`` (weight ``(in, out)``, one value per *input* row):
  :math:`\lVert \sum_t a_t[i]\, \delta_t \rVert^2`;
* token / position table (one value per row :math:`v`): :math:`\lVert \sum_{t:\, id_t = v}
  \delta_t \rVert^2` — the contributions of a token repeated in a sequence are summed *before*
  squaring (scatter-add by id over the distinct ``(sequence, id)`` pairs), and no per-sequence
  gradient of the table is ever materialised;
* ``LayerNorm`` / RMSNorm (one value per feature): :math:`(\sum_t \delta_t \odot \hat a_t)^2`
  with :math:`\hat a_t` the normalised input.

Both forms of the outer-product rows are computed either by materialising the per-sequence row
sums or through the Gram matrix :math:`\langle \cdot_t, \cdot_s \rangle` over positions,
whichever is cheaper for the layer. Padded positions are masked (their output gradients are set
to zero before any rule runs), so how a sequence was padded does not change its Fisher.

The ``batch`` estimator (the reference's squared token-mean gradient of a mini-batch) is the
same rules applied to the whole batch seen as one sequence (:func:`as_one_sequence`).

Everything here is shaped for a rule table keyed by module type: :data:`SEQUENCE_RULES` maps a
layer kind to a function ``(module, inputs, grad) -> (batch, rows)``, :func:`sequence_layers`
chooses the embedded modules and fails loudly on one it has no rule for, and
:class:`TokenCategorical` is the likelihood object (label sampling by sequence id and position,
the score of the sampled tokens, the exact expectation's terms for tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2v_lightning.fisher.estimators import (
    FisherError,
    UnsupportedLayerError,
    uniform_by_id,
)

__all__ = [
    "SEQUENCE_RULES",
    "SequenceLayer",
    "SequenceTaps",
    "TokenCategorical",
    "as_one_sequence",
    "conv1d_sq_norms",
    "layer_kind",
    "linear_sq_norms",
    "norm_sq_norms",
    "position_ids_from_mask",
    "rms_normalise",
    "sequence_layers",
    "table_sq_norms",
    "token_draw_ids",
]

# Intermediate tensors of one computation are kept under this many elements by splitting the
# batch (256 MiB of float32).
_CHUNK_ELEMENTS = 64 * 1024 * 1024


def _chunks(batch: int, per_example: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_example))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def _sq_norms_of_rows(rows: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(rows, dim=-1).square()


def _outer_row_sq_norms(rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    r"""``out[b, r] = ‖Σ_t rows[b, t, r] · other[b, t, :]‖²`` (B × R), without per-row loops.

    Materialises the per-sequence sums (B × R × O) when that is cheaper than the Gram matrix of
    ``other`` over positions (B × T × T), else uses
    :math:`\sum_{t,s} r_t r_s \langle o_t, o_s \rangle`.
    """
    batch, positions, size_r = rows.shape
    size_o = other.shape[-1]
    out = torch.empty(batch, size_r, dtype=rows.dtype, device=rows.device)
    if size_r * size_o <= positions * (size_r + size_o):
        for part in _chunks(batch, size_r * size_o):
            out[part] = _sq_norms_of_rows(torch.bmm(rows[part].transpose(1, 2), other[part]))
    else:
        for part in _chunks(batch, positions * (positions + size_r)):
            gram = torch.bmm(other[part], other[part].transpose(1, 2))  # B, T, T
            out[part] = (torch.bmm(gram, rows[part]) * rows[part]).sum(1)
    return out


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ..., C) as (B, T, C): every middle dimension is a position."""
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def linear_sq_norms(module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``nn.Linear`` (weight ``(out, in)``): per-sequence squared norms of the output rows (B × out)."""
    return _outer_row_sq_norms(_flat(grad), _flat(inputs))


def conv1d_sq_norms(module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """HF ``Conv1D`` (weight ``(in, out)``): per-sequence squared norms of the *input* rows (B × in).

    A row of ``weight.reshape(weight.shape[0], -1)`` is one input feature: its per-sequence
    gradient is :math:`\\sum_t a_t[i]\\, \\delta_t`.
    """
    return _outer_row_sq_norms(_flat(inputs), _flat(grad))


def table_sq_norms(module: nn.Module, ids: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``nn.Embedding``: per-sequence squared norms of the table's rows (B × num_embeddings).

    Args:
        module: the table.
        ids: the row looked up at each position (B × T, int64).
        grad: the gradient of the loss with respect to the looked-up vectors (B × T × D).

    The per-sequence gradient of row ``v`` is the sum of the output gradients of the positions
    that looked ``v`` up. They are summed per distinct ``(sequence, id)`` pair (a scatter-add over
    at most B·T pairs, never a B × V × D tensor) before being squared.
    """
    rows = int(module._parameters["weight"].shape[0])  # type: ignore[union-attr]
    batch = ids.shape[0]
    flat_ids = ids.reshape(batch, -1).to(torch.int64)
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= rows):
        raise FisherError(f"token ids outside [0, {rows}) reached a table of {rows} rows")
    keys = (torch.arange(batch, device=ids.device).unsqueeze(1) * rows + flat_ids).reshape(-1)
    pairs, which = torch.unique(keys, return_inverse=True)
    vectors = grad.reshape(-1, grad.shape[-1])
    summed = torch.zeros(pairs.numel(), vectors.shape[-1], dtype=vectors.dtype, device=vectors.device)
    summed.index_add_(0, which, vectors)
    out = torch.zeros(batch * rows, dtype=vectors.dtype, device=vectors.device)
    out[pairs] = _sq_norms_of_rows(summed)
    return out.reshape(batch, rows)


def rms_normalise(inputs: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last dimension (RMSNorm without its weight)."""
    return inputs * torch.rsqrt(inputs.square().mean(-1, keepdim=True) + eps)


def _norm_eps(module: nn.Module) -> float:
    for attribute in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attribute, None)
        if isinstance(value, (int, float)):
            return float(value)
    if isinstance(module, nn.RMSNorm) and module.eps is None:
        return float(torch.finfo(torch.float32).eps)
    raise UnsupportedLayerError(
        f"{type(module).__name__}: cannot find its epsilon (variance_epsilon / eps)"
    )


def norm_sq_norms(module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``LayerNorm`` / RMSNorm over the last dimension: per-sequence squared weight gradients (B × D).

    The weight multiplies the normalised input elementwise, so a sequence's gradient of feature
    ``j`` is :math:`\\sum_t \\delta_t[j]\\, \\hat a_t[j]` (one value per row of the 1-D weight).
    A ``(1 + weight)`` parametrisation (Gemma) has the same gradient.
    """
    if isinstance(module, nn.LayerNorm):
        normalised = F.layer_norm(inputs, module.normalized_shape, eps=module.eps)
        if len(module.normalized_shape) != 1:
            raise UnsupportedLayerError("LayerNorm over more than the last dimension")
    else:
        normalised = rms_normalise(inputs, _norm_eps(module))
    return _flat(grad * normalised).sum(1).square()


SequenceRule = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

SEQUENCE_RULES: dict[str, SequenceRule] = {
    "linear": linear_sq_norms,
    "conv1d": conv1d_sq_norms,
    "table": table_sq_norms,
    "norm": norm_sq_norms,
}
"""Rule of each layer kind: ``(module, inputs, output grad) -> (batch, rows)`` squared norms of
the per-sequence gradient rows (for a table, ``inputs`` are the looked-up ids)."""


def _is_rmsnorm(module: nn.Module) -> bool:
    # Llama's LlamaRMSNorm, Mistral's, Qwen's...: classes named *RMSNorm with a 1-D weight.
    return isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")


def _is_hf_conv1d(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")


def layer_kind(module: nn.Module) -> str | None:
    """The key of :data:`SEQUENCE_RULES` that applies to ``module``, or None."""
    if isinstance(module, nn.Embedding):
        return "table"
    if _is_hf_conv1d(module):
        return "conv1d"
    if type(module) is nn.Linear:
        return "linear"
    if isinstance(module, nn.LayerNorm) or _is_rmsnorm(module):
        weight = module._parameters.get("weight")
        return "norm" if weight is not None and weight.ndim == 1 else None
    return None


@dataclass(frozen=True)
class SequenceLayer:
    """One embedded layer: its qualified name, module and rule kind."""

    name: str
    module: nn.Module
    kind: str

    @property
    def weight(self) -> torch.Tensor:
        """The layer's weight parameter."""
        weight = self.module._parameters.get("weight")
        assert weight is not None  # sequence_layers only keeps modules with a weight
        return weight

    @property
    def num_rows(self) -> int:
        """Values this layer contributes: rows of ``weight.reshape(weight.shape[0], -1)``."""
        return int(self.weight.shape[0])

    @property
    def row_size(self) -> int:
        """Entries per row of ``weight.reshape(weight.shape[0], -1)``."""
        return int(self.weight.numel() // self.weight.shape[0])


def sequence_layers(body: nn.Module, prefix: str = "") -> list[SequenceLayer]:
    """The modules of ``body`` whose weights enter the embedding, in ``named_modules`` order.

    Every module owning a ``weight`` parameter (biases are never embedded).

    Args:
        body: the network without its LM head (the head is fitted per task, not embedded).
        prefix: prepended to the names (``"transformer."`` names layers as in the full model).

    Raises:
        UnsupportedLayerError: a module with a weight that no rule covers (named).
    """
    layers: list[SequenceLayer] = []
    for name, module in body.named_modules():
        if module._parameters.get("weight") is None:
            continue
        kind = layer_kind(module)
        if kind is None:
            raise UnsupportedLayerError(
                f"layer {prefix + name!r} ({type(module).__name__}) has weights but no "
                "filter-wise Fisher rule for language models; supported: nn.Embedding, HF Conv1D, "
                "nn.Linear, LayerNorm and RMSNorm over the last dimension"
            )
        layers.append(SequenceLayer(prefix + name, module, kind))
    return layers


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among its sequence's real tokens (0 at padded positions).

    Left, right or no padding give a real token the same position, so the model sees the same
    positions (``position_ids`` passed to it) and labels are drawn with the same keys.
    """
    mask = attention_mask.to(torch.int64)
    return (mask.cumsum(-1) - 1).clamp_(min=0) * mask


def token_draw_ids(sequence_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The key of each token's label draw: a function of its sequence's id and real position."""
    return sequence_ids.to(torch.int64) * (1 << 32) + positions.to(torch.int64)


def as_one_sequence(tensor: torch.Tensor) -> torch.Tensor:
    """A batch of sequences (B × T × ...) seen as one sequence (1 × B·T × ...).

    The ``batch`` estimator squares the gradient of a mini-batch's loss; the rules then give
    the squared rows of that one gradient.
    """
    return tensor.reshape(1, -1, *tensor.shape[2:])


class TokenCategorical:
    """The likelihood of next tokens: one categorical distribution per real position.

    Labels are drawn by inverse CDF from uniforms keyed by ``(seed, sequence id, real position,
    draw)``, so a token's label does not depend on the batch, the padding or the order.
    """

    name = "token_categorical"

    @staticmethod
    def sample(
        probs: torch.Tensor, keys: torch.Tensor, seed: int, draw: int = 0, rows_per_chunk: int = 256
    ) -> torch.Tensor:
        """One token per row of ``probs`` (M × V): ``probs`` of the position it is scored at.

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
            cdf = probs[part].detach().to(torch.float64).cumsum(-1)
            target = (u[part] * cdf[:, -1]).unsqueeze(-1)
            labels[part] = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        return labels.clamp_(max=probs.shape[-1] - 1)

    @staticmethod
    def score_gradient(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gradient of ``log p(label)`` with respect to the logits: ``onehot(label) - probs``."""
        grad = -probs.detach().to(torch.float32)
        grad[torch.arange(labels.numel(), device=labels.device), labels] += 1.0
        return grad

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


class SequenceTaps:
    """Hooks on a sequence model's embedded layers that turn output gradients into Fisher sums.

    Inside the context every parameter is frozen (backward computes input gradients only; the
    flags are restored on exit). Each forward records every embedded layer's input (a table's
    ids) and hooks its output's gradient; each backward adds, per layer, the sum over sequences
    of the squared per-sequence gradient rows (:data:`SEQUENCE_RULES`) to :attr:`sums`
    (float64).

    Args:
        network: the model whose layers are tapped.
        layers: from :func:`sequence_layers`.
    """

    def __init__(self, network: nn.Module, layers: Sequence[SequenceLayer]) -> None:
        self._network = network
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
        self.nonfinite: set[str] = set()

    def __enter__(self) -> SequenceTaps:
        self._saved_flags = [(p, p.requires_grad) for p in self._network.parameters()]
        for param, _ in self._saved_flags:
            param.requires_grad_(False)
        for layer in self._layers:
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, flag in self._saved_flags:
            param.requires_grad_(flag)
        self._saved_flags.clear()
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
            if not isinstance(output, torch.Tensor):
                raise UnsupportedLayerError(f"layer {layer.name!r} does not return a tensor")
            self._inputs[layer.name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(self._grad_hook(layer))
                return None
            # Nothing before this layer needs a gradient (a lookup table): start the graph here.
            root = output.detach().requires_grad_()
            root.register_hook(self._grad_hook(layer))
            self.roots.append(root)
            return root.clone()  # keeps in-place operations downstream off the leaf

        return hook

    def _grad_hook(self, layer: SequenceLayer) -> Callable[[torch.Tensor], None]:
        rule = SEQUENCE_RULES[layer.kind]

        def hook(grad: torch.Tensor) -> None:
            inputs = self._inputs[layer.name]
            mask = self._mask
            with torch.autocast(device_type=grad.device.type, enabled=False):
                grad32 = grad.float()
                if mask is not None:
                    keep = mask.reshape(*mask.shape, *([1] * (grad32.ndim - mask.ndim)))
                    grad32 = torch.where(keep, grad32, 0.0)
                if layer.kind != "table":
                    inputs = inputs.float()
                if self._one_sequence:
                    grad32, inputs = as_one_sequence(grad32), as_one_sequence(inputs)
                values = rule(layer.module, inputs, grad32).sum(0).to(torch.float64)
            if not bool(torch.isfinite(values).all()):
                self.nonfinite.add(layer.name)
            self._fired.add(layer.name)
            total = self.sums.get(layer.name)
            self.sums[layer.name] = values if total is None else total + values

        return hook
