r"""Filter-wise diagonal Fisher information of a network, as pure tensor math plus module hooks.

For a probe with weights :math:`w`, examples :math:`x_n` and labels drawn from the model itself,

.. math::

    F = \frac{1}{N} \sum_n \mathbb{E}_{y \sim p_w(y|x_n)}
        \left[ \nabla_w \log p_w(y|x_n) ^{\odot 2} \right].

Task2Vec keeps one number per filter: the weight-Fisher of each layer reshaped to
``(out_channels, -1)`` and averaged over each row. Only the per-example squared *row norms*
:math:`\lVert g_n[o, :] \rVert^2` are needed, and they have closed forms in terms of each layer's
input :math:`a_n` and output gradient :math:`\delta_n` (SPEC section 3.1):

* linear, 2-D input: :math:`\delta_n[o]^2 \lVert a_n \rVert^2`;
* linear over a sequence / convolution: :math:`g_n[o] = \sum_p \delta_n[o, p]\, a_n(p)` over
  output positions :math:`p` (input patches :math:`a_n(p)` for a convolution), either
  materialised or through the Gram matrix :math:`\langle a_n(p), a_n(q) \rangle` (for a
  convolution, from copied patches or, on the CPU, from the Gram of the padded input summed over
  the kernel offsets), whichever is cheaper for the layer;
* batch norm (frozen statistics), group norm, layer norm: :math:`g_n = \sum_p \delta_n \hat x_n`.

So the backward pass computes input gradients only, never weight gradients. The output gradients
are read with tensor hooks on module outputs (module backward hooks break on the in-place
activations of real probes), and the per-example weights of the estimators enter the loss as
:math:`\sqrt{w_n}`, so that :math:`\lVert \sqrt{w_n} g_n \rVert^2 = w_n \lVert g_n \rVert^2`.

Estimators (``estimator=``):

* ``"per_sample"``: labels sampled from the model (``mc_samples`` draws per example);
* ``"exact"``: :math:`\sum_y p(y|x)\,\lVert g_{x,y} \rVert^2`, one backward pass per class;
* ``"batch"``: the 2019 reference's estimator, the square of the *mean* gradient of each
  mini-batch, averaged over batches; its expectation is :math:`F/B` for batch size :math:`B`.

Likelihoods (``likelihood=``): ``"categorical"`` (one class per example, softmax over the
logits) or ``"bernoulli"`` (multi-label: :math:`K` independent outputs,
:math:`q_k = \sigma(z_k)`, :math:`\log p(y|x) = \sum_k y_k \log q_k + (1 - y_k) \log(1 - q_k)`).
The outputs' scores :math:`s_k = \nabla \log p(y_k|x) = (y_k - q_k) \nabla z_k` are independent
with zero mean, so :math:`\mathbb{E}_y[(\sum_k s_k)^2] = \sum_k \mathbb{E}[s_k^2]` and the
exact expectation sums the two outcomes of each output:

.. math::

    \sum_k \sum_{y_k \in \{0, 1\}} p(y_k|x) \lVert \nabla \log p(y_k|x) \rVert^2
    = \sum_k q_k (1 - q_k) \lVert \nabla z_k \rVert^2,

one backward pass per output. ``per_sample`` draws every :math:`y_k` from
:math:`\text{Bernoulli}(q_k)` (seeded by example id, draw and output) and backpropagates
:math:`\log p(y|x)`.

Labels are sampled by example id (:func:`sample_labels`), so results do not depend on batch
order, batch size or the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from t2v_lightning.choices import (
    ESTIMATORS,
    LIKELIHOODS,
    Estimator,
    FisherError,
    Likelihood,
    UnsupportedLayerError,
)
from t2v_lightning.fisher.layers.rule import layer_weight, sq_norms_of_rows
from t2v_lightning.fisher.layers.table import embedded_layers, layer_rule, num_filters, row_size
from t2v_lightning.probe import call_probe, find_nonfinite_layer, nonfinite_rows

__all__ = [
    "Estimator",
    "ESTIMATORS",
    "Likelihood",
    "LIKELIHOODS",
    "FisherError",
    "UnsupportedLayerError",
    "LayerFisherTaps",
    "embedded_layers",
    "sample_labels",
    "sample_multilabels",
    "batch_filter_sums",
    "filter_values",
    "hash_seed",
    "layer_weight",
    "num_filters",
    "row_size",
]


def _precision_hint(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return (
            "; under float16 this is an overflow (values beyond 65504): use precision="
            "'bf16-mixed' or '32-true'"
        )
    return ""


def _nonfinite_ids(values: torch.Tensor, ids: torch.Tensor | None) -> list[int]:
    """Ids (or batch rows when ``ids`` is None) of the rows of ``values`` holding NaN / inf."""
    rows = nonfinite_rows(values)
    if ids is None:
        return rows.tolist()
    return ids.detach().cpu()[rows.cpu()].tolist()


def _ids_text(bad: list[int], ids: torch.Tensor | None) -> str:
    what = "example ids" if ids is not None else "batch rows"
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"{what} {bad[:5]}{more}"


# --------------------------------------------------------------------------------------------
# Label sampling by example id
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _to_signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_signed(0x9E3779B97F4A7C15)
_MIX1 = _to_signed(0xBF58476D1CE4E5B9)
_MIX2 = _to_signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic wraps around in torch, which is what the mixer needs.
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def hash_seed(*values: int) -> int:
    """A splitmix64 hash of integers, folded to a non-negative 63-bit seed (for a Generator)."""
    state = torch.tensor(_to_signed(0x243F6A8885A308D3), dtype=torch.int64)
    for value in values:
        state = _splitmix64(state ^ _to_signed(value))
    return int(state) & ((1 << 63) - 1)


def uniform_by_id(ids: torch.Tensor, seed: int, draw: int) -> torch.Tensor:
    """One U[0, 1) number per id, a pure function of ``(seed, id, draw)`` (float64, CPU)."""
    ids = ids.detach().to("cpu", torch.int64)
    key = _splitmix64(torch.full_like(ids, _to_signed(seed)))
    key = _splitmix64(key ^ ids)
    key = _splitmix64(key ^ _to_signed(draw))
    return _shift_right(key, 11).to(torch.float64) * 2.0**-53


def sample_labels(probs: torch.Tensor, ids: torch.Tensor, seed: int, draw: int = 0) -> torch.Tensor:
    """Draw one label per row of ``probs`` (B × C), seeded by each example's id.

    Inverse-CDF sampling with :func:`uniform_by_id`: the label of an example depends only on its
    predicted distribution, its id, ``seed`` and ``draw``, never on the batch it came in.
    """
    u = uniform_by_id(ids, seed, draw).to(probs.device)
    cdf = probs.detach().to(torch.float64).cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    labels = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return labels.clamp_(max=probs.shape[-1] - 1)


def sample_multilabels(
    probs: torch.Tensor, ids: torch.Tensor, seed: int, draw: int = 0
) -> torch.Tensor:
    """Draw a 0/1 vector per row of ``probs`` (B × K, independent output probabilities).

    Output ``k`` of draw ``d`` is 1 when :func:`uniform_by_id` with ``draw = d * K + k`` falls
    below its probability, so each label depends only on its example's id and predicted
    probability, ``seed``, ``draw`` and ``k``, never on the batch.

    Returns:
        float32 tensor of shape (B, K) on ``probs``' device.
    """
    outputs = probs.shape[-1]
    u = torch.stack(
        [uniform_by_id(ids, seed, draw * outputs + k) for k in range(outputs)], dim=-1
    ).to(probs.device)
    return (u < probs.detach().to(torch.float64)).to(torch.float32)


# --------------------------------------------------------------------------------------------
# Hooks that read layer inputs and output gradients
# --------------------------------------------------------------------------------------------


class LayerFisherTaps:
    """Hooks on the embedded layers of a network that turn output gradients into Fisher sums.

    Use as a context manager around forward/backward passes; every hook is removed on exit and
    the ``requires_grad`` flags of the network's parameters are restored. Inside the context all
    parameters are frozen, so backward passes compute input gradients only.

    After each backward pass through :meth:`backward`, ``batch_sums[name]`` holds (fp32, one
    value per filter) the sum over examples of the squared per-example gradient rows of that
    layer, summed over the backward passes since :meth:`start_batch`.

    Args:
        network: the network whose layers are tapped (a module, not a DDP wrapper).
        layers: ``(name, module)`` pairs from :func:`embedded_layers`.
        grad_scale: the loss is multiplied by this before backward and gradients are divided by
            it (in fp32) before they are squared; keeps fp16 gradients out of the underflow range.
    """

    def __init__(
        self, network: nn.Module, layers: Sequence[tuple[str, nn.Module]], grad_scale: float = 1.0
    ) -> None:
        self._network = network
        self._layers = list(layers)
        self._grad_scale = float(grad_scale)
        # The rule of each layer, chosen once here, never per hook call.
        self._rules = {name: layer_rule(name, module) for name, module in self._layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inputs: dict[str, torch.Tensor] = {}
        self._roots: list[torch.Tensor] = []
        self._calls: dict[str, int] = {}
        self._fired: set[str] = set()
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self.batch_sums: dict[str, torch.Tensor] = {}
        # Per layer, the batch rows whose per-example values were NaN / inf (kept on the device,
        # checked once per batch by check_finite), and the dtype of the gradients seen.
        self._nonfinite: dict[str, torch.Tensor] = {}
        self._grad_dtype = torch.float32
        self._active = True

    # context management ----------------------------------------------------------------------
    def __enter__(self) -> LayerFisherTaps:
        self._saved_flags = [(p, p.requires_grad) for p in self._network.parameters()]
        for param, _ in self._saved_flags:
            param.requires_grad_(False)
        try:
            for name, module in self._layers:
                self._install(name, module)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, flag in self._saved_flags:
            param.requires_grad_(flag)
        self._saved_flags.clear()
        self._inputs.clear()
        self._roots.clear()

    def _install(self, name: str, module: nn.Module) -> None:
        child = self._rules[name].output_child
        if child is not None:
            # The output gradient is read at the input of a child (timm's BatchNormAct2d: its
            # batch-norm output goes through ``drop``, then ``act``).
            self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            inner = module.get_submodule(child)
            self._handles.append(inner.register_forward_pre_hook(self._pre_output_hook(name)))
        else:
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    def _input_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if not self._active:
                return
            self._record_call(name)
            self._inputs[name] = args[0].detach()

        return hook

    def _pre_output_hook(self, name: str) -> Callable[..., tuple[torch.Tensor, ...] | None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
            if not self._active:
                return None
            tapped = self._tap(name, args[0])
            return None if tapped is args[0] else (tapped, *args[1:])

        return hook

    def _forward_hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if not self._active:
                return None
            self._record_call(name)
            self._inputs[name] = args[0].detach()
            tapped = self._tap(name, output)
            return None if tapped is output else tapped

        return hook

    def _record_call(self, name: str) -> None:
        self._calls[name] = self._calls.get(name, 0) + 1
        if self._calls[name] > 1:
            raise UnsupportedLayerError(
                f"layer {name!r} runs more than once per forward pass (shared weights); its "
                "per-example gradient is not a single closed form. Skip it or use another probe"
            )

    def _tap(self, name: str, output: torch.Tensor) -> torch.Tensor:
        """Hook the gradient of ``output``; returns the tensor the network should continue with."""
        if not isinstance(output, torch.Tensor):
            raise UnsupportedLayerError(f"layer {name!r} does not return a tensor")
        if output.requires_grad:
            output.register_hook(self._grad_hook(name))
            return output
        # Nothing before this layer needs a gradient: start the backward graph here. The clone
        # keeps in-place activations (ReLU(inplace=True)) off the leaf.
        root = output.detach().requires_grad_()
        root.register_hook(self._grad_hook(name))
        self._roots.append(root)
        return root.clone()

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        module = dict(self._layers)[name]
        rule = self._rules[name]

        def hook(grad: torch.Tensor) -> None:
            inputs = self._inputs[name]
            with torch.autocast(device_type=grad.device.type, enabled=False):
                grad32 = grad.float()
                if self._grad_scale != 1.0:
                    grad32 = grad32 / self._grad_scale
                per_example = rule.sq_norms(module, inputs, grad32)
                values = per_example.sum(0)
            bad = ~torch.isfinite(per_example).all(-1)
            seen = self._nonfinite.get(name)
            self._nonfinite[name] = bad if seen is None else seen | bad
            self._grad_dtype = grad.dtype
            self._fired.add(name)
            total = self.batch_sums.get(name)
            self.batch_sums[name] = values if total is None else total + values

        return hook

    # driving ---------------------------------------------------------------------------------
    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run forward passes without the taps (for the ``batch`` estimator's weight gradients)."""
        self._active = False
        try:
            yield
        finally:
            self._active = True

    def start_batch(self) -> None:
        """Forget the previous batch's inputs, roots and sums."""
        self._inputs.clear()
        self._roots.clear()
        self._calls.clear()
        self._fired.clear()
        self._nonfinite = {}
        self.batch_sums = {}

    def backward(self, loss: torch.Tensor, retain_graph: bool) -> None:
        """Backpropagate ``loss`` to the tapped layers (input gradients only)."""
        if not self._roots:
            raise FisherError(
                "no embedded layer was reached by the forward pass with a fresh gradient root; "
                "the input or the network's parameters may require gradients outside the taps"
            )
        torch.autograd.grad(
            loss * self._grad_scale if self._grad_scale != 1.0 else loss,
            self._roots,
            retain_graph=retain_graph,
            allow_unused=True,
        )

    @property
    def layers(self) -> list[tuple[str, nn.Module]]:
        """The tapped ``(name, module)`` pairs, in order."""
        return list(self._layers)

    @property
    def grad_scale(self) -> float:
        """The factor applied to losses before backward."""
        return self._grad_scale

    def check_all_fired(self) -> None:
        """Every embedded layer must have received a gradient; name those that did not."""
        missing = [name for name, _ in self._layers if name not in self._fired]
        if missing:
            raise FisherError(
                f"layers {missing} received no gradient from the logits (not called in forward, "
                "or called through a functional path that bypasses the module); they cannot be "
                "embedded"
            )

    def check_finite(self, ids: torch.Tensor | None = None) -> None:
        """Raise :class:`FisherError` if a per-example value of this batch was NaN or infinite.

        The message names the layers (the backward pass meets the one nearest the output first;
        the layers before it inherit its NaN / inf) and the examples (``ids`` of the batch rows).
        """
        names = [name for name, _ in self._layers if name in self._nonfinite]
        if not names:
            return
        flags = torch.stack([self._nonfinite[name].any() for name in names]).cpu()
        if not bool(flags.any()):
            return
        broken = [name for name, flag in zip(names, flags.tolist()) if flag]
        rows = self._nonfinite[broken[-1]].nonzero().flatten().cpu()
        bad = rows.tolist() if ids is None else ids.detach().cpu()[rows].tolist()
        raise FisherError(
            f"non-finite per-example gradients (NaN or inf) at layer {broken[-1]!r} for "
            f"{_ids_text(bad, ids)}; {len(broken)} layer(s) affected: {broken[:5]}. The squared "
            "gradients overflow, or the probe's weights or activations hold NaN / inf"
            + _precision_hint(self._grad_dtype)
            + (
                f" (or a smaller grad_scale than {self._grad_scale:g})"
                if self._grad_dtype == torch.float16 and self._grad_scale != 1.0
                else ""
            ),
            example_ids=bad if ids is not None else None,
        )


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


def _check_finite_logits(
    logits: torch.Tensor, ids: torch.Tensor | None, what: str = "logits"
) -> None:
    """Raise :class:`FisherError` naming the examples whose ``what`` hold NaN or inf."""
    if torch.isfinite(logits).all():
        return
    bad = _nonfinite_ids(logits, ids)
    raise FisherError(
        f"the network produced non-finite {what} (NaN or inf) for {_ids_text(bad, ids)}; the "
        "probe's weights or its head may hold NaN / inf, or its activations overflow"
        + _precision_hint(logits.dtype),
        example_ids=bad if ids is not None else None,
    )


def _check_logits(
    network: nn.Module,
    taps: LayerFisherTaps,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    logits: torch.Tensor,
    ids: torch.Tensor,
    forward_context: Callable[[], AbstractContextManager[object]],
) -> None:
    """Non-finite logits: raise naming the examples and the first layer that went non-finite."""
    if not isinstance(logits, torch.Tensor) or bool(torch.isfinite(logits).all()):
        return
    try:
        _check_finite_logits(logits, ids)
    except FisherError as err:
        row = _nonfinite_ids(logits, None)[:1]
        one = (
            {key: value[row] for key, value in inputs.items()}
            if isinstance(inputs, Mapping) else inputs[row]
        )
        with taps.paused(), forward_context():
            layer = find_nonfinite_layer(network, one)
        where = f"; first non-finite layer: {layer}" if layer else ""
        raise FisherError(f"{err}{where}", example_ids=err.example_ids) from None


def _log_probs(logits: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise FisherError(f"the network must return logits of shape (batch, classes), got {shape}")
    _check_finite_logits(logits, ids)
    log_probs = logits.float().log_softmax(-1)
    _check_finite_logits(log_probs, ids, "log-probabilities")
    return log_probs


def _bernoulli_logits(logits: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The logits in float32, checked: (batch, outputs), finite."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise FisherError(f"the network must return logits of shape (batch, outputs), got {shape}")
    _check_finite_logits(logits, ids)
    return logits.float()


def _bernoulli_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_k y_k \log \sigma(z_k) + (1 - y_k) \log \sigma(-z_k)` per row (float32)."""
    return -F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(-1)


def _bernoulli_backwards(
    taps: LayerFisherTaps,
    logits: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    estimator: Estimator,
    seed: int,
    mc_samples: int,
) -> None:
    probs = logits.detach().sigmoid()
    if estimator == "exact":
        # Σ_{y∈{0,1}} p(y)·(∂ log p(y)/∂z)² = q(1-q)² + (1-q)q² = q(1-q): one backward per output.
        variance = probs * (1.0 - probs)
        outputs = logits.shape[1]
        for k in range(outputs):
            loss = (logits[:, k] * (variance[:, k] * weight).sqrt()).sum()
            taps.backward(loss, retain_graph=k < outputs - 1)
    elif estimator == "per_sample":
        draw_weight = weight / mc_samples
        for draw in range(mc_samples):
            labels = sample_multilabels(probs, ids, seed, draw)
            picked = _bernoulli_log_likelihood(logits, labels)
            taps.backward((picked * draw_weight.sqrt()).sum(), retain_graph=draw < mc_samples - 1)
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def batch_filter_sums(
    network: nn.Module,
    taps: LayerFisherTaps,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
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
    count_valid = int(valid.sum())
    if count_valid == 0:
        return {}, 0
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    taps.start_batch()
    if estimator == "batch":
        sums = _batch_gradient_sums(
            network, taps, inputs, ids, valid, seed, forward_context, likelihood
        )
        return sums, 1
    with forward_context():
        logits = call_probe(network, inputs)
    _check_logits(network, taps, inputs, logits, ids, forward_context)
    if likelihood == "bernoulli":
        logits32 = _bernoulli_logits(logits, ids)
        weight = valid.to(logits32.device, torch.float32)
        _bernoulli_backwards(taps, logits32, ids, weight, estimator, seed, mc_samples)
        taps.check_all_fired()
        taps.check_finite(ids)
        return dict(taps.batch_sums), count_valid
    log_probs = _log_probs(logits, ids)
    weight = valid.to(log_probs.device, torch.float32)
    probs = log_probs.detach().exp()
    if estimator == "exact":
        classes = probs.shape[1]
        for label in range(classes):
            loss = (log_probs[:, label] * (probs[:, label] * weight).sqrt()).sum()
            taps.backward(loss, retain_graph=label < classes - 1)
    elif estimator == "per_sample":
        draw_weight = weight / mc_samples
        for draw in range(mc_samples):
            labels = sample_labels(probs, ids, seed, draw)
            picked = log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
            taps.backward((picked * draw_weight.sqrt()).sum(), retain_graph=draw < mc_samples - 1)
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    taps.check_all_fired()
    taps.check_finite(ids)
    return dict(taps.batch_sums), count_valid


def _batch_gradient_sums(
    network: nn.Module,
    taps: LayerFisherTaps,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    ids: torch.Tensor,
    valid: torch.Tensor,
    seed: int,
    forward_context: Callable[[], AbstractContextManager[object]],
    likelihood: Likelihood = "categorical",
) -> dict[str, torch.Tensor]:
    layers = taps.layers
    weights = [layer_weight(module) for _, module in layers]
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
            grad32 = grad.float() / scale if scale != 1.0 else grad.float()
            value = sq_norms_of_rows(grad32.reshape(grad32.shape[0], -1))
            for name in names:
                sums[name] = value
            return grad.new_zeros(()).expand_as(grad)

        return hook

    with _trainable(weights), taps.paused():
        with forward_context():
            logits = call_probe(network, inputs)
        _check_logits(network, taps, inputs, logits, ids, forward_context)
        if likelihood == "bernoulli":
            logits32 = _bernoulli_logits(logits, ids)
            multilabels = sample_multilabels(logits32.detach().sigmoid(), ids, seed, 0)
            picked = _bernoulli_log_likelihood(logits32, multilabels)
            mask = valid.to(logits32.device, torch.float32)
        else:
            log_probs = _log_probs(logits, ids)
            labels = sample_labels(log_probs.detach().exp(), ids, seed, 0)
            mask = valid.to(log_probs.device, torch.float32)
            picked = log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
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
            "weights or activations hold NaN / inf" + _precision_hint(weights[0].dtype),
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
