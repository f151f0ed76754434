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

import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from t2v_lightning.choices import (
    ESTIMATORS,
    LIKELIHOODS,
    Estimator,
    FisherError,
    Likelihood,
    UnsupportedLayerError,
)
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
]

# Intermediate tensors of one per-example computation are kept under this many elements by
# splitting the batch (about 256 MiB of float32).
_CHUNK_ELEMENTS = 64 * 1024 * 1024


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
# Which layers are embedded
# --------------------------------------------------------------------------------------------


def _is_same_padding_conv(module: nn.Module) -> bool:
    # timm's Conv2dSame pads inside forward() ("same" padding as in TensorFlow); its
    # ``padding`` attribute reads 0.
    return type(module).__name__ == "Conv2dSame"


def _is_batchnorm_act(module: nn.Module) -> bool:
    # timm's BatchNormAct2d: batch norm, then ``drop`` and ``act`` inside the same module.
    return isinstance(module, _BatchNorm) and hasattr(module, "act")


def _layer_kind(module: nn.Module) -> str | None:
    """The closed form that applies to ``module``, or None when it has none."""
    kind = type(module)
    if kind is nn.Linear or kind.__name__ == "NonDynamicallyQuantizableLinear":
        return "linear"
    if kind in (nn.Conv1d, nn.Conv2d) or _is_same_padding_conv(module):
        return "conv"
    if isinstance(module, _BatchNorm):
        if _is_batchnorm_act(module) and not isinstance(getattr(module, "drop", None), nn.Module):
            return None
        return "batchnorm"
    if kind is nn.GroupNorm:
        return "groupnorm"
    if kind is nn.LayerNorm:
        return "layernorm"
    return None


def check_exclude(exclude: Sequence[str] | str | None) -> tuple[str, ...]:
    """``exclude`` as a tuple of non-empty module names or globs (a lone string is one pattern)."""
    if exclude is None:
        return ()
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"exclude must hold module names or globs, got {pattern!r}")
    return patterns


def excluded_modules(network: nn.Module, exclude: Sequence[str]) -> list[str]:
    """Qualified names of the modules of ``network`` matched by the patterns of ``exclude``.

    Raises:
        ValueError: a pattern matches no module (named, with some of the module names).
    """
    names = [plain_name(name) for name, _ in network.named_modules() if name]
    matched: list[str] = []
    for pattern in exclude:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"exclude pattern {pattern!r} matches no module of the network; some of its "
                f"modules: {names[:12]}"
            )
        matched.extend(hit for hit in hits if hit not in matched)
    return matched


def plain_name(name: str) -> str:
    """A module's qualified name without the ``_orig_mod`` of ``torch.compile`` wrappers."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def embedded_layers(
    network: nn.Module, head: str | None, exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """The modules whose weights enter the embedding, in ``named_modules`` order.

    Every module that owns a ``weight`` parameter, except the head, the modules matched by
    ``exclude`` (names or :mod:`fnmatch` globs) and their submodules. Modules replaced by
    ``nn.Identity`` (a skipped prefix) own no weight and drop out by themselves.

    Raises:
        UnsupportedLayerError: a module with a weight has no closed form here (named); the
            caller adds how to leave it out with its own options.
        ValueError: an ``exclude`` pattern matches no module.
    """
    left_out = [head] if head is not None else []
    left_out += excluded_modules(network, exclude)
    layers: list[tuple[str, nn.Module]] = []
    for raw_name, module in network.named_modules():
        name = plain_name(raw_name)
        if any(name == out or name.startswith(out + ".") for out in left_out):
            continue
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if _layer_kind(module) is None:
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(module).__name__}) has weights but no filter-wise Fisher "
                "here; supported: Linear, Conv1d, Conv2d (incl. timm Conv2dSame), BatchNorm "
                "(incl. timm BatchNormAct2d), GroupNorm, LayerNorm",
                layer=name,
            )
        if isinstance(module, _BatchNorm) and not module.track_running_stats:
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(module).__name__}) normalises with batch statistics "
                "(track_running_stats=False), so per-example gradients are not defined",
                layer=name,
            )
        layers.append((name, module))
    return layers


def layer_weight(module: nn.Module) -> nn.Parameter:
    """The ``weight`` parameter of an embedded layer."""
    weight = module._parameters.get("weight")
    if weight is None:
        raise UnsupportedLayerError(f"{type(module).__name__} has no weight parameter")
    return weight


def num_filters(module: nn.Module) -> int:
    """Rows of the module's weight reshaped to ``(out_channels, -1)``."""
    return int(layer_weight(module).shape[0])


def row_size(module: nn.Module) -> int:
    """Entries per row of the module's weight reshaped to ``(out_channels, -1)``."""
    weight = layer_weight(module)
    return int(weight.numel() // weight.shape[0])


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
# Per-example squared row norms of weight gradients (closed forms)
# --------------------------------------------------------------------------------------------


def _chunks(batch: int, per_example: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_example))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def _sq_norms_of_rows(rows: torch.Tensor) -> torch.Tensor:
    """Sum of squares over the last dimension, in one pass (5-6x faster than square + sum)."""
    return torch.linalg.vector_norm(rows, dim=-1).square()


def _linear_sq_norms(inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if inputs.ndim == 2:
        return grad.square() * inputs.square().sum(-1, keepdim=True)
    batch = inputs.shape[0]
    a = inputs.reshape(batch, -1, inputs.shape[-1])  # B, T, in
    d = grad.reshape(batch, -1, grad.shape[-1])  # B, T, out
    positions, fan_in, fan_out = a.shape[1], a.shape[2], d.shape[2]
    out = torch.empty(batch, fan_out, dtype=a.dtype, device=a.device)
    if fan_out * fan_in <= positions * (fan_in + fan_out):
        for part in _chunks(batch, fan_out * fan_in):
            out[part] = _sq_norms_of_rows(torch.einsum("bto,bti->boi", d[part], a[part]))
    else:
        for part in _chunks(batch, positions * (positions + fan_out)):
            gram = torch.einsum("bti,bsi->bts", a[part], a[part])
            out[part] = torch.einsum("bto,bts,bso->bo", d[part], gram, d[part])
    return out


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _im2col(
    inputs: torch.Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
) -> torch.Tensor:
    """``F.unfold`` of a padded B × C × H × W input: B × (C·k_h·k_w) × L, same order.

    A strided view (B, C, k_h, k_w, H_out, W_out) of the input copied once by ``reshape``; a
    1×1 stride-1 kernel is a pure view. Same values as ``F.unfold``, but one copy kernel instead
    of ``unfold``'s many small parallel regions, which stall when the CPU threads are
    oversubscribed (seconds instead of milliseconds on a busy machine).
    """
    batch, channels, height, width = inputs.shape
    out_h = (height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    if kernel[0] == kernel[1] == 1:
        rows = slice(None, stride[0] * (out_h - 1) + 1, stride[0])
        cols = slice(None, stride[1] * (out_w - 1) + 1, stride[1])
        view = inputs[..., rows, cols]
        return view.reshape(batch, channels, out_h * out_w)
    inputs = inputs.contiguous()
    s_b, s_c, s_h, s_w = inputs.stride()
    view = inputs.as_strided(
        (batch, channels, kernel[0], kernel[1], out_h, out_w),
        (s_b, s_c, dilation[0] * s_h, dilation[1] * s_w, stride[0] * s_h, stride[1] * s_w),
    )
    return view.reshape(batch, channels * kernel[0] * kernel[1], out_h * out_w)


def _conv_patches(module: Any, inputs: torch.Tensor) -> torch.Tensor:
    """Input patches of a 2-D convolution: B × (C_in·k_h·k_w) × L, padding applied."""
    padded = _conv_padded(module, inputs)
    return _im2col(padded, tuple(module.kernel_size), tuple(module.dilation), tuple(module.stride))


def _conv_padded(module: Any, inputs: torch.Tensor) -> torch.Tensor:
    """The input of a 2-D convolution with its padding applied (zeros, reflect, "same"...)."""
    kernel = tuple(module.kernel_size)
    stride = tuple(module.stride)
    dilation = tuple(module.dilation)
    padding = module.padding
    if _is_same_padding_conv(module):
        pad_h = _same_padding(inputs.shape[-2], kernel[0], stride[0], dilation[0])
        pad_w = _same_padding(inputs.shape[-1], kernel[1], stride[1], dilation[1])
        inputs = F.pad(inputs, (*pad_w, *pad_h))
    elif padding == "same":
        pads: list[int] = []
        for k, d in zip(reversed(kernel), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        inputs = F.pad(inputs, pads)
    elif module.padding_mode != "zeros":
        inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    elif padding != "valid" and any(p != 0 for p in padding):
        pads = []
        for p in reversed(padding):
            pads += [p, p]
        inputs = F.pad(inputs, pads)
    return inputs


def _depthwise_sq_norms(
    module: Any, inputs: torch.Tensor, grad: torch.Tensor, by_offsets: bool | None = None
) -> torch.Tensor:
    r"""Depthwise convolution (one input and one output channel per group), without patches.

    :math:`g_n[c, (i, j)] = \sum_p \delta_n[c, p]\, x_n[c, s p + d (i, j)]` is a cross-correlation
    of example ``n``'s padded channel ``c`` with its own output gradient. On the CPU it runs as one
    convolution with ``B·C`` groups (the output gradient as the kernel, dilated by the stride):
    3-5x faster than the patch form on EfficientNet-Lite0's layers. Elsewhere it is one product and
    sum over output positions per kernel offset, on strided views of the padded input
    (``by_offsets``: force one or the other). Same values as the patch form, without its
    k_h·k_w copies of the input or B·C tiny matrix products.
    """
    padded = _conv_padded(module, inputs)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    batch, channels = grad.shape[0], grad.shape[1]
    out_h, out_w = grad.shape[-2], grad.shape[-1]
    if by_offsets is None:
        by_offsets = grad.device.type != "cpu"
    if not by_offsets:
        rows = F.conv2d(
            padded.reshape(1, batch * channels, *padded.shape[-2:]),
            grad.reshape(batch * channels, 1, out_h, out_w),
            stride=tuple(dilation),
            dilation=tuple(stride),
            groups=batch * channels,
        )
        # The output covers at least the k_h × k_w kernel offsets (one more row or column when
        # the stride does not divide the padded size evenly).
        rows = rows[..., : kernel[0], : kernel[1]]
        return _sq_norms_of_rows(rows.reshape(batch, channels, -1))
    out = torch.zeros(batch, channels, dtype=grad.dtype, device=grad.device)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            top, left = i * dilation[0], j * dilation[1]
            view = padded[
                ...,
                top : top + stride[0] * (out_h - 1) + 1 : stride[0],
                left : left + stride[1] * (out_w - 1) + 1 : stride[1],
            ]
            out += (view * grad).sum((-2, -1)).square()
    return out


def _conv_sq_norms(module: Any, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if inputs.ndim == 3:  # Conv1d as a 2-D convolution of height 1
        inputs, grad = inputs.unsqueeze(-2), grad.unsqueeze(-2)
        module = _Conv1dAs2d(module)
    batch, out_channels = grad.shape[0], grad.shape[1]
    groups = module.groups
    kernel_area = module.kernel_size[0] * module.kernel_size[1]
    # Measured on CPU (EfficientNet-Lite0 shapes, 1 thread, 25 images at 224 px): the grouped
    # convolution takes 0.56 s where patches take 1.76 s over all depthwise layers, 3x3 and 5x5.
    # Off the CPU, the per-offset sum is used for kernels of 5x5 and more (1.7-2.3x faster than
    # patches on CPU when it was measured there; not measured on a GPU).
    direct = grad.device.type == "cpu" or kernel_area >= 25
    if groups > 1 and groups == out_channels == inputs.shape[1] and direct:
        padded_size = _conv_padded(module, inputs[:1, :1]).shape[-2:]
        if _output_size(padded_size, module) == list(grad.shape[-2:]):
            return _depthwise_sq_norms(module, inputs, grad)
    if _prefers_padded_gram(module, inputs, grad):
        return _padded_gram_sq_norms(module, inputs, grad)
    patches = _conv_patches(module, inputs)  # B, G*K, L
    positions = patches.shape[-1]
    if positions != grad[0, 0].numel():
        raise FisherError(
            f"convolution {type(module).__name__} with input {tuple(inputs.shape[1:])}: its "
            f"output has {grad[0, 0].numel()} positions but its patches give {positions}; this "
            "convolution pads or strides in a way the Fisher closed form does not know"
        )
    per_group_out = out_channels // groups
    fan_in = patches.shape[1] // groups
    patches = patches.reshape(batch, groups, fan_in, positions)
    deltas = grad.reshape(batch, groups, per_group_out, positions)
    out = torch.empty(batch, groups, per_group_out, dtype=grad.dtype, device=grad.device)
    materialised = per_group_out * fan_in * positions
    via_gram = positions * positions * (fan_in + per_group_out)
    if materialised <= via_gram:
        for part in _chunks(batch, groups * per_group_out * fan_in + groups * fan_in * positions):
            rows = torch.einsum("bgol,bgkl->bgok", deltas[part], patches[part])
            out[part] = _sq_norms_of_rows(rows)
    else:
        for part in _chunks(batch, groups * positions * positions * 2):
            gram = torch.einsum("bgkl,bgkm->bglm", patches[part], patches[part])
            mixed = torch.einsum("bglm,bgom->bgol", gram, deltas[part])
            out[part] = (mixed * deltas[part]).sum(-1)
    return out.reshape(batch, out_channels)


def _output_size(padded_size: Sequence[int], module: Any) -> list[int]:
    """Output height and width of a 2-D convolution over an input of ``padded_size``."""
    return [
        (size - dilation * (k - 1) - 1) // stride + 1
        for size, k, stride, dilation in zip(
            padded_size, module.kernel_size, module.stride, module.dilation
        )
    ]


def _prefers_padded_gram(module: Any, inputs: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether :func:`_padded_gram_sq_norms` is the cheaper form for this convolution.

    A cost in multiply-adds per example and group, each copied patch element counted as 16 of
    them (more when the output is narrower than 8 positions, where the copy moves short runs).
    Fitted on the 3x3 convolutions of ResNet-18/34/50 at 32, 64 and 224 px (CPU, 1 thread): it
    picks the faster form wherever the two differ by more than 15%. CPU only: on other devices,
    where copies are cheap and it has not been measured, the patch forms stay.
    """
    kernel_area = module.kernel_size[0] * module.kernel_size[1]
    out_h, out_w = grad.shape[-2], grad.shape[-1]
    positions = out_h * out_w
    if grad.device.type != "cpu" or kernel_area == 1 or positions < 2:
        return False
    padded_h, padded_w = _conv_padded(module, inputs[:1, :1]).shape[-2:]
    if _output_size((padded_h, padded_w), module) != [out_h, out_w]:
        return False
    groups = module.groups
    fan_in = inputs.shape[1] // groups * kernel_area
    per_group_out = grad.shape[1] // groups
    copy_weight = 16 * max(1, 8 // min(out_h, out_w))
    patches = min(positions * per_group_out * fan_in, positions * positions * (fan_in + per_group_out))
    patches += copy_weight * fan_in * positions
    padded = padded_h * padded_w
    gram = padded * padded * (inputs.shape[1] // groups) + positions * positions * per_group_out
    gram += 16 * kernel_area * positions * positions
    return gram <= patches


def _padded_gram_sq_norms(module: Any, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    r"""Per-example squared rows of a convolution through the Gram matrix of its padded input.

    The patch Gram :math:`\langle a_n(p), a_n(q) \rangle` is the sum over kernel offsets
    :math:`u` of :math:`A_n[s p + d u, s q + d u]`, where :math:`A_n = X_n^\top X_n` is the Gram
    of example ``n``'s padded input over its positions (per group). No patches are copied:
    cheaper than both patch forms for 3x3 kernels over small feature maps (ResNet layers 1-4 at
    32 px: 1.5-5x), where copying the patches costs more than the products.
    """
    padded = _conv_padded(module, inputs)
    batch, channels, height, width = padded.shape
    groups = module.groups
    out_channels, out_h, out_w = grad.shape[1], grad.shape[-2], grad.shape[-1]
    per_group_out = out_channels // groups
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    x = padded.reshape(batch, groups, channels // groups, height * width)
    deltas = grad.reshape(batch, groups, per_group_out, out_h * out_w)
    out = torch.empty(batch, groups, per_group_out, dtype=grad.dtype, device=grad.device)
    span_h, span_w = stride[0] * (out_h - 1) + 1, stride[1] * (out_w - 1) + 1
    per_example = groups * ((height * width) ** 2 + (out_h * out_w) ** 2 + per_group_out * out_h * out_w)
    for part in _chunks(batch, per_example):
        rows = x[part]
        full = torch.matmul(rows.transpose(-1, -2), rows)
        full = full.reshape(rows.shape[0], groups, height, width, height, width)
        gram = torch.empty(
            rows.shape[0], groups, out_h, out_w, out_h, out_w, dtype=full.dtype, device=full.device
        )
        for i in range(kernel[0]):
            top = slice(i * dilation[0], i * dilation[0] + span_h, stride[0])
            for j in range(kernel[1]):
                left = slice(j * dilation[1], j * dilation[1] + span_w, stride[1])
                block = full[:, :, top, left, top, left]
                if i == 0 and j == 0:
                    gram.copy_(block)
                else:
                    gram.add_(block)
        gram = gram.reshape(rows.shape[0], groups, out_h * out_w, out_h * out_w)
        mixed = torch.matmul(deltas[part], gram)
        out[part] = (mixed * deltas[part]).sum(-1)
    return out.reshape(batch, out_channels)


class _Conv1dAs2d:
    """The geometry of a Conv1d seen as a Conv2d with a 1-high kernel (no weights)."""

    def __init__(self, conv: Any) -> None:
        self.kernel_size = (1, conv.kernel_size[0])
        self.stride = (1, conv.stride[0])
        self.dilation = (1, conv.dilation[0])
        self.padding = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
        self.padding_mode = conv.padding_mode
        self.groups = conv.groups
        pad = conv._reversed_padding_repeated_twice
        self._reversed_padding_repeated_twice = [pad[0], pad[1], 0, 0]


def _sum_over_positions(values: torch.Tensor, channels_dim: int = 1) -> torch.Tensor:
    """Sum a B × C × ... tensor over everything but batch and channels."""
    return values.reshape(values.shape[0], values.shape[channels_dim], -1).sum(-1)


def _batchnorm_sq_norms(module: _BatchNorm, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    r"""Per-example scale gradient :math:`\sum_p \delta_n[c, p] (x_n[c, p] - \mu_c) / \sigma_c`.

    Folded as :math:`(\sum_p \delta x - \mu \sum_p \delta) / \sigma`: two reductions over
    positions and no normalised copy of the input (2.3x faster on EfficientNet-Lite0's layers).
    The subtraction loses about ``|μ| / σ`` times fp32's rounding when the running mean dwarfs
    the spread; the sums are formed in fp32 with pairwise summation.
    """
    batch, channels = inputs.shape[0], inputs.shape[1]
    x = inputs.reshape(batch, channels, -1)
    d = grad.reshape(batch, channels, -1)
    mean = module.running_mean.to(inputs.dtype)  # type: ignore[union-attr]
    inv_std = torch.rsqrt(module.running_var.to(inputs.dtype) + module.eps)  # type: ignore[union-attr]
    return ((d * x).sum(-1) - mean * d.sum(-1)).mul_(inv_std).square_()


def _groupnorm_sq_norms(module: nn.GroupNorm, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    normalised = F.group_norm(inputs, module.num_groups, eps=module.eps)
    return _sum_over_positions(grad * normalised).square()


def _layernorm_sq_norms(module: nn.LayerNorm, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    normalised = F.layer_norm(inputs, module.normalized_shape, eps=module.eps)
    dims = len(module.normalized_shape)
    per_example = (grad * normalised).reshape(inputs.shape[0], -1, *inputs.shape[-dims:]).sum(1)
    rows = per_example.reshape(inputs.shape[0], num_filters(module), -1)
    return _sq_norms_of_rows(rows)


def per_example_sq_norms(module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """B × out_channels: squared norms of the per-example weight-gradient rows of ``module``.

    Args:
        module: an embedded layer (see :func:`embedded_layers`).
        inputs: the layer's input in the forward pass (B × ...).
        grad: the gradient of the (per-example weighted) loss with respect to the layer's output
            (for a timm ``BatchNormAct2d``: the batch-norm output, before its activation).
    """
    kind = _layer_kind(module)
    if kind == "linear":
        return _linear_sq_norms(inputs, grad)
    if kind == "conv":
        return _conv_sq_norms(module, inputs, grad)
    if kind == "batchnorm":
        return _batchnorm_sq_norms(module, inputs, grad)  # type: ignore[arg-type]
    if kind == "groupnorm":
        return _groupnorm_sq_norms(module, inputs, grad)  # type: ignore[arg-type]
    if kind == "layernorm":
        return _layernorm_sq_norms(module, inputs, grad)  # type: ignore[arg-type]
    raise UnsupportedLayerError(f"no filter-wise Fisher for {type(module).__name__}")


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
        if _is_batchnorm_act(module):
            # The output gradient we need is the batch-norm output's, which is the input of the
            # module's ``drop`` (then ``act``) submodule.
            self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            drop = module.get_submodule("drop")
            self._handles.append(drop.register_forward_pre_hook(self._pre_output_hook(name)))
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

        def hook(grad: torch.Tensor) -> None:
            inputs = self._inputs[name]
            with torch.autocast(device_type=grad.device.type, enabled=False):
                grad32 = grad.float()
                if self._grad_scale != 1.0:
                    grad32 = grad32 / self._grad_scale
                per_example = per_example_sq_norms(module, inputs.float(), grad32)
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
            value = _sq_norms_of_rows(grad32.reshape(grad32.shape[0], -1))
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
