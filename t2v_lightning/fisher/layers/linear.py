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
from torch import nn

from t2v_lightning.choices import FisherError
from t2v_lightning.fisher.layers.rule import INPUT_NOISE_FLOOR, LayerRule, chunks, sq_norms_of_rows

__all__ = ["LinearRule", "linear_sq_norms"]


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
        self,
        module: nn.Module,
        field: torch.Tensor,
        per_filter: torch.Tensor,
        output_shape: torch.Size,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        if field.shape[:-1] != output_shape[:-1]:
            raise FisherError(
                f"{type(module).__name__}: output {tuple(output_shape)} but input rows "
                f"{tuple(field.shape[:-1])}"
            )
        return field, per_filter, tuple(output_shape)
