r"""Convolutions (``Conv1d``, ``Conv2d``, ``Conv3d``, timm's ``Conv2dSame``): one geometry for both
methods.

:class:`ConvGeometry` holds what the two methods need to know about a convolution's layout:
kernel, stride, dilation, groups and padding (zeros, reflect / replicate / circular, ``"same"``,
and timm's ``Conv2dSame``, whose TensorFlow-style "same" padding is applied inside ``forward``,
so its ``padding`` attribute reads 0). A ``Conv1d`` is seen as a ``Conv2d`` of height 1.

Monte Carlo: :math:`g_n[o] = \sum_p \delta_n[o, p]\, a_n(p)` over output positions :math:`p`
(input patches :math:`a_n(p)`), either materialised or through the Gram matrix
:math:`\langle a_n(p), a_n(q) \rangle` of copied patches or, on the CPU, through the Gram of the
padded input summed over the kernel offsets; a depthwise convolution takes a form of its own.
The cheapest form is picked per layer (:func:`conv_sq_norms`).

Variational: since :math:`\sigma^2` is constant over a filter, :math:`\text{layer}(x^2 + 0.01;
\sigma^2)` is :math:`\sigma^2_o` times a convolution of the channel-summed :math:`x^2 + 0.01`
with a kernel of ones, one channel per group (:meth:`ConvRule.receptive_field_sums`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Size, Tensor, nn
from torch.nn.modules.conv import _ConvNd

from t2v_lightning.choices import FisherError
from t2v_lightning.fisher.layers.rule import (
    INPUT_NOISE_FLOOR,
    Grouped,
    LayerRule,
    chunks,
    sq_norms_of_rows,
)

__all__ = [
    "ConvGeometry",
    "ConvRule",
    "conv_patches",
    "conv_sq_norms",
    "depthwise_sq_norms",
    "im2col",
    "output_size",
    "padded_gram_sq_norms",
    "prefers_padded_gram",
    "same_padding",
    "tf_same_pads",
]


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def tf_same_pads(
    sizes: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> list[int]:
    """``F.pad`` amounts (last axis first) of TensorFlow's "same" padding over ``sizes``."""
    pads: list[int] = []
    for axis in reversed(range(len(sizes))):
        pads += same_padding(sizes[axis], kernel[axis], stride[axis], dilation[axis])
    return pads


@dataclass(frozen=True)
class ConvGeometry:
    """The layout of a 2-D convolution (a ``Conv1d`` as height 1), without its weights.

    Args:
        name: the module's class name (for messages).
        kernel_size, stride, dilation: per spatial axis.
        padding: per axis, or ``"same"`` / ``"valid"``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        groups: channel groups.
        reversed_padding: ``F.pad`` amounts of a non-zero padding mode (last axis first).
        tf_same: TensorFlow-style "same" padding computed from the input size (timm's
            ``Conv2dSame``), instead of ``padding``.
    """

    name: str
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: str | tuple[int, ...]
    padding_mode: str
    groups: int
    reversed_padding: tuple[int, ...]
    tf_same: bool = False

    @classmethod
    def of(cls, conv: Any, tf_same: bool = False) -> ConvGeometry:
        """The geometry of ``conv`` (a ``Conv1d`` or ``Conv2d``)."""
        pad = tuple(conv._reversed_padding_repeated_twice)
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        if len(conv.kernel_size) == 1:
            return cls(
                type(conv).__name__,
                (1, conv.kernel_size[0]),
                (1, conv.stride[0]),
                (1, conv.dilation[0]),
                padding if isinstance(padding, str) else (0, padding[0]),
                conv.padding_mode,
                conv.groups,
                (pad[0], pad[1], 0, 0),
                tf_same,
            )
        return cls(
            type(conv).__name__,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            tuple(conv.dilation),
            padding,
            conv.padding_mode,
            conv.groups,
            pad,
            tf_same,
        )

    def pad(self, inputs: torch.Tensor) -> torch.Tensor:
        """The input with the convolution's padding applied (zeros, reflect, "same"...)."""
        kernel, stride, dilation, padding = (
            self.kernel_size,
            self.stride,
            self.dilation,
            self.padding,
        )
        if self.tf_same:
            return F.pad(inputs, tf_same_pads(inputs.shape[-2:], kernel, stride, dilation))
        if padding == "same":
            pads: list[int] = []
            for k, d in zip(reversed(kernel), reversed(dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return F.pad(inputs, pads)
        if self.padding_mode != "zeros":
            return F.pad(inputs, self.reversed_padding, mode=self.padding_mode)
        if not isinstance(padding, str) and any(p != 0 for p in padding):
            pads = []
            for p in reversed(padding):
                pads += [p, p]
            return F.pad(inputs, pads)
        return inputs


def im2col(
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


def conv_patches(geometry: ConvGeometry, inputs: torch.Tensor) -> torch.Tensor:
    """Input patches of a 2-D convolution: B × (C_in·k_h·k_w) × L, padding applied."""
    padded = geometry.pad(inputs)
    return im2col(
        padded, tuple(geometry.kernel_size), tuple(geometry.dilation), tuple(geometry.stride)
    )


def depthwise_sq_norms(
    geometry: ConvGeometry, inputs: torch.Tensor, grad: torch.Tensor, by_offsets: bool | None = None
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
    padded = geometry.pad(inputs)
    kernel, stride, dilation = geometry.kernel_size, geometry.stride, geometry.dilation
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
        return sq_norms_of_rows(rows.reshape(batch, channels, -1))
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


def conv_sq_norms(geometry: ConvGeometry, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if inputs.ndim == 3:  # Conv1d as a 2-D convolution of height 1
        inputs, grad = inputs.unsqueeze(-2), grad.unsqueeze(-2)
    batch, out_channels = grad.shape[0], grad.shape[1]
    groups = geometry.groups
    kernel_area = geometry.kernel_size[0] * geometry.kernel_size[1]
    # Measured on CPU (EfficientNet-Lite0 shapes, 1 thread, 25 images at 224 px): the grouped
    # convolution takes 0.56 s where patches take 1.76 s over all depthwise layers, 3x3 and 5x5.
    # Off the CPU, the per-offset sum is used for kernels of 5x5 and more (1.7-2.3x faster than
    # patches on CPU when it was measured there; not measured on a GPU).
    direct = grad.device.type == "cpu" or kernel_area >= 25
    if groups > 1 and groups == out_channels == inputs.shape[1] and direct:
        padded_size = geometry.pad(inputs[:1, :1]).shape[-2:]
        if output_size(padded_size, geometry) == list(grad.shape[-2:]):
            return depthwise_sq_norms(geometry, inputs, grad)
    if prefers_padded_gram(geometry, inputs, grad):
        return padded_gram_sq_norms(geometry, inputs, grad)
    patches = conv_patches(geometry, inputs)  # B, G*K, L
    positions = patches.shape[-1]
    if positions != grad[0, 0].numel():
        raise FisherError(
            f"convolution {geometry.name} with input {tuple(inputs.shape[1:])}: its "
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
        for part in chunks(batch, groups * per_group_out * fan_in + groups * fan_in * positions):
            rows = torch.einsum("bgol,bgkl->bgok", deltas[part], patches[part])
            out[part] = sq_norms_of_rows(rows)
    else:
        for part in chunks(batch, groups * positions * positions * 2):
            gram = torch.einsum("bgkl,bgkm->bglm", patches[part], patches[part])
            mixed = torch.einsum("bglm,bgom->bgol", gram, deltas[part])
            out[part] = (mixed * deltas[part]).sum(-1)
    return out.reshape(batch, out_channels)


def output_size(padded_size: Sequence[int], geometry: ConvGeometry) -> list[int]:
    """Output height and width of a 2-D convolution over an input of ``padded_size``."""
    return [
        (size - dilation * (k - 1) - 1) // stride + 1
        for size, k, stride, dilation in zip(
            padded_size, geometry.kernel_size, geometry.stride, geometry.dilation
        )
    ]


def prefers_padded_gram(geometry: ConvGeometry, inputs: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether :func:`_padded_gram_sq_norms` is the cheaper form for this convolution.

    A cost in multiply-adds per example and group, each copied patch element counted as 16 of
    them (more when the output is narrower than 8 positions, where the copy moves short runs).
    Fitted on the 3x3 convolutions of ResNet-18/34/50 at 32, 64 and 224 px (CPU, 1 thread): it
    picks the faster form wherever the two differ by more than 15%. CPU only: on other devices,
    where copies are cheap and it has not been measured, the patch forms stay.
    """
    kernel_area = geometry.kernel_size[0] * geometry.kernel_size[1]
    out_h, out_w = grad.shape[-2], grad.shape[-1]
    positions = out_h * out_w
    if grad.device.type != "cpu" or kernel_area == 1 or positions < 2:
        return False
    padded_h, padded_w = geometry.pad(inputs[:1, :1]).shape[-2:]
    if output_size((padded_h, padded_w), geometry) != [out_h, out_w]:
        return False
    groups = geometry.groups
    fan_in = inputs.shape[1] // groups * kernel_area
    per_group_out = grad.shape[1] // groups
    copy_weight = 16 * max(1, 8 // min(out_h, out_w))
    patches = min(
        positions * per_group_out * fan_in, positions * positions * (fan_in + per_group_out)
    )
    patches += copy_weight * fan_in * positions
    padded = padded_h * padded_w
    gram = padded * padded * (inputs.shape[1] // groups) + positions * positions * per_group_out
    gram += 16 * kernel_area * positions * positions
    return gram <= patches


def padded_gram_sq_norms(
    geometry: ConvGeometry, inputs: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    r"""Per-example squared rows of a convolution through the Gram matrix of its padded input.

    The patch Gram :math:`\langle a_n(p), a_n(q) \rangle` is the sum over kernel offsets
    :math:`u` of :math:`A_n[s p + d u, s q + d u]`, where :math:`A_n = X_n^\top X_n` is the Gram
    of example ``n``'s padded input over its positions (per group). No patches are copied:
    cheaper than both patch forms for 3x3 kernels over small feature maps (ResNet layers 1-4 at
    32 px: 1.5-5x), where copying the patches costs more than the products.
    """
    padded = geometry.pad(inputs)
    batch, channels, height, width = padded.shape
    groups = geometry.groups
    out_channels, out_h, out_w = grad.shape[1], grad.shape[-2], grad.shape[-1]
    per_group_out = out_channels // groups
    kernel, stride, dilation = geometry.kernel_size, geometry.stride, geometry.dilation
    x = padded.reshape(batch, groups, channels // groups, height * width)
    deltas = grad.reshape(batch, groups, per_group_out, out_h * out_w)
    out = torch.empty(batch, groups, per_group_out, dtype=grad.dtype, device=grad.device)
    span_h, span_w = stride[0] * (out_h - 1) + 1, stride[1] * (out_w - 1) + 1
    per_example = groups * (
        (height * width) ** 2 + (out_h * out_w) ** 2 + per_group_out * out_h * out_w
    )
    for part in chunks(batch, per_example):
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


class ConvRule(LayerRule):
    """Convolutions that keep ``nn.ConvNd``'s ``forward``, and timm's ``Conv2dSame``.

    Args:
        tf_same: the padding is TensorFlow's "same", applied in ``forward`` (``Conv2dSame``).
        monte_carlo: whether the Monte Carlo form applies (1-D and 2-D convolutions).
    """

    variational = True

    def __init__(self, tf_same: bool = False, monte_carlo: bool = True) -> None:
        self.tf_same = tf_same
        self.monte_carlo = monte_carlo

    def geometry(self, module: nn.Module) -> ConvGeometry:
        """The layout of ``module`` as the Monte Carlo forms read it."""
        return ConvGeometry.of(module, self.tf_same)

    def sq_norms(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return conv_sq_norms(self.geometry(module), inputs.float(), grad)

    def receptive_field_sums(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """``(B, groups, *output positions)`` (no batch dimension for unbatched inputs)."""
        conv = cast(_ConvNd, module)
        squared = inputs.float().square()
        spatial = conv.weight.ndim - 2
        unbatched = squared.ndim == spatial + 1
        if unbatched:
            squared = squared.unsqueeze(0)
        batch, channels = squared.shape[0], squared.shape[1]
        groups = int(conv.groups)
        per_group_in = channels // groups
        summed = squared.reshape(batch, groups, per_group_in, *squared.shape[2:]).sum(2)
        summed = summed + INPUT_NOISE_FLOOR * per_group_in
        if self.tf_same:
            pads = tf_same_pads(summed.shape[2:], conv.kernel_size, conv.stride, conv.dilation)
            summed = F.pad(summed, pads)
        ones = torch.ones(groups, 1, *conv.kernel_size, dtype=summed.dtype, device=summed.device)
        field = conv._conv_forward(summed, ones, None)  # type: ignore[operator]
        return field.squeeze(0) if unbatched else field

    def output_variance(
        self, module: nn.Module, inputs: torch.Tensor, variance: torch.Tensor
    ) -> torch.Tensor:
        field = self.receptive_field_sums(module, inputs)
        per_filter = variance.float().reshape(-1)
        lead = field.ndim - (cast(torch.Tensor, module.weight).ndim - 2) - 1
        shape = (*field.shape[:lead], per_filter.numel(), *field.shape[lead + 1 :])
        field, per_filter, _ = self.grouped(module, field, per_filter, torch.Size(shape))
        return (field * per_filter).reshape(shape)

    def grouped(
        self, module: nn.Module, field: Tensor, per_filter: Tensor, output_shape: Size
    ) -> Grouped:
        """The output ``(B, out, *positions)`` viewed as ``(B, groups, out / groups,
        *positions)``; ``field`` as ``(B, groups, 1, *positions)``, ``per_filter`` as ``(groups,
        out / groups, 1, ...)``.

        Raises:
            FisherError: the receptive fields do not match the output positions (a layer whose
                ``forward`` pads or strides in a way the geometry here does not know).
        """
        groups = int(cast(_ConvNd, module).groups)
        spatial = cast(torch.Tensor, module.weight).ndim - 2
        lead = len(output_shape) - spatial - 1  # 1 batched, 0 unbatched
        expected = (*output_shape[:lead], groups, *output_shape[lead + 1 :])
        if tuple(field.shape) != expected:
            raise FisherError(
                f"{type(module).__name__}: its output has shape {tuple(output_shape)} but its "
                f"receptive fields give {tuple(field.shape)}; it pads or strides in a way the "
                "local reparametrization does not know"
            )
        per_group_out = per_filter.numel() // groups
        grouped = (*output_shape[:lead], groups, per_group_out, *output_shape[lead + 1 :])
        field = field.unsqueeze(lead + 1)
        per_filter = per_filter.reshape(groups, per_group_out, *([1] * spatial))
        return field, per_filter, grouped
