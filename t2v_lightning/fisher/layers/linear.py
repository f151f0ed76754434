r"""Linear layers: :math:`y = x W^\top + b`, on a 2-D input or over a sequence of positions.

Monte Carlo: for a 2-D input the per-example gradient of row :math:`o` is
:math:`\delta_n[o]\, a_n`, so :math:`\lVert g_n[o] \rVert^2 = \delta_n[o]^2 \lVert a_n \rVert^2`.
Over positions :math:`t` (``(B, T, in)``), :math:`g_n[o] = \sum_t \delta_n[t, o]\, a_n[t]`,
either materialised or through the Gram matrix :math:`\langle a_n(t), a_n(s) \rangle`, whichever
is cheaper for the layer.

Variational: :math:`\text{layer}(x^2 + 0.01;\ \sigma^2)[o] = \sigma^2_o (\sum_i x_i^2 + 0.01 \cdot
\text{fan\_in})`.
"""

from __future__ import annotations

import torch
from torch import Size, Tensor, nn

from t2v_lightning.choices import FisherError
from t2v_lightning.fisher.layers.rule import (
    INPUT_NOISE_FLOOR,
    Grouped,
    LayerRule,
    chunks,
    sq_norms_of_rows,
)

__all__ = ["Conv1DRule", "LinearRule", "linear_sq_norms", "outer_row_sq_norms"]


def linear_sq_norms(inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``(B, out)`` squared per-example gradient rows of a linear layer (float32 inputs)."""
    if inputs.ndim == 2:
        return grad.square() * inputs.square().sum(-1, keepdim=True)
    batch = inputs.shape[0]
    a = inputs.reshape(batch, -1, inputs.shape[-1])  # B, T, in
    d = grad.reshape(batch, -1, grad.shape[-1])  # B, T, out
    positions, fan_in, fan_out = a.shape[1], a.shape[2], d.shape[2]
    out = torch.empty(batch, fan_out, dtype=a.dtype, device=a.device)
    if fan_out * fan_in <= positions * (fan_in + fan_out):
        for part in chunks(batch, fan_out * fan_in):
            out[part] = sq_norms_of_rows(torch.einsum("bto,bti->boi", d[part], a[part]))
    else:
        for part in chunks(batch, positions * (positions + fan_out)):
            gram = torch.einsum("bti,bsi->bts", a[part], a[part])
            out[part] = torch.einsum("bto,bts,bso->bo", d[part], gram, d[part])
    return out


class LinearRule(LayerRule):
    """``nn.Linear`` and the subclasses that keep its ``forward``; timm's ``Linear``."""

    variational = True

    def sq_norms(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return linear_sq_norms(inputs.float(), grad)

    def receptive_field_sums(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        squared = inputs.float().square()
        fan_in = squared.shape[-1]
        return squared.sum(-1, keepdim=True) + INPUT_NOISE_FLOOR * fan_in

    def output_variance(
        self, module: nn.Module, inputs: torch.Tensor, variance: torch.Tensor
    ) -> torch.Tensor:
        return self.receptive_field_sums(module, inputs) * variance.float().reshape(-1)

    def grouped(
        self, module: nn.Module, field: Tensor, per_filter: Tensor, output_shape: Size
    ) -> Grouped:
        if field.shape[:-1] != output_shape[:-1]:
            raise FisherError(
                f"{type(module).__name__}: output {tuple(output_shape)} but input rows "
                f"{tuple(field.shape[:-1])}"
            )
        return field, per_filter, tuple(output_shape)


def outer_row_sq_norms(rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    r"""``(B, R)``: :math:`\lVert \sum_t \text{rows}[b, t, r]\ \text{other}[b, t, :] \rVert^2`.

    The per-example gradient of a weight whose row :math:`r` collects
    :math:`\text{rows}[t, r] \cdot \text{other}[t]` over positions :math:`t`. Materialises the
    per-example sums (B × R × O, one batched matmul) when that is cheaper than the Gram matrix
    of ``other`` over positions (B × T × T), else uses
    :math:`\sum_{t,s} r_t r_s \langle o_t, o_s \rangle` as two batched matmuls.
    """
    batch, positions, size_r = rows.shape
    size_o = other.shape[-1]
    out = torch.empty(batch, size_r, dtype=rows.dtype, device=rows.device)
    if size_r * size_o <= positions * (size_r + size_o):
        for part in chunks(batch, size_r * size_o):
            out[part] = sq_norms_of_rows(torch.bmm(rows[part].transpose(1, 2), other[part]))
    else:
        for part in chunks(batch, positions * (positions + size_r)):
            gram = torch.bmm(other[part], other[part].transpose(1, 2))  # B, T, T
            out[part] = (torch.bmm(gram, rows[part]) * rows[part]).sum(1)
    return out


class Conv1DRule(LayerRule):
    r"""Hugging Face's ``Conv1D`` (GPT-2's projections): a linear layer whose weight is stored
    ``(in, out)``, :math:`y = x W + b`.

    A row of ``weight.reshape(weight.shape[0], -1)`` is one *input* feature :math:`i`: over
    positions :math:`t`, :math:`g_n[i] = \sum_t a_n[t, i]\, \delta_n[t]`. No variational form.
    """

    def sq_norms(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        a = inputs.float()
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        return outer_row_sq_norms(a, grad.reshape(grad.shape[0], -1, grad.shape[-1]))
