r"""Normalisation layers: batch norm (frozen statistics), timm's ``BatchNormAct2d``, group norm,
layer norm. Their weight is a per-channel scale, so the per-example gradient of channel
:math:`c` is :math:`\sum_p \delta_n[c, p]\, \hat x_n[c, p]` over positions :math:`p`, with
:math:`\hat x` the normalised input. They get no variance in the variational method (a 1-D
weight), as in the reference.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from t2v_lightning.choices import UnsupportedLayerError
from t2v_lightning.fisher.layers.rule import LayerRule, sq_norms_of_rows

__all__ = [
    "BatchNormActRule",
    "BatchNormRule",
    "GroupNormRule",
    "LayerNormRule",
    "RMSNormRule",
    "rms_normalise",
]


def _sum_over_positions(values: torch.Tensor, channels_dim: int = 1) -> torch.Tensor:
    """Sum a B × C × ... tensor over everything but batch and channels."""
    return values.reshape(values.shape[0], values.shape[channels_dim], -1).sum(-1)


class BatchNormRule(LayerRule):
    r"""Batch norm of any dimension with frozen running statistics (and its subclasses).

    :math:`\sum_p \delta_n[c, p] (x_n[c, p] - \mu_c) / \sigma_c`, folded as
    :math:`(\sum_p \delta x - \mu \sum_p \delta) / \sigma`: two reductions over positions and no
    normalised copy of the input (2.3x faster on EfficientNet-Lite0's layers). The subtraction
    loses about ``|μ| / σ`` times fp32's rounding when the running mean dwarfs the spread; the
    sums are formed in fp32 with pairwise summation.
    """

    def accepts(self, module: nn.Module, registered: type) -> bool:
        # A batch norm that carries its activation inside (``act``) has another output gradient;
        # only the types registered for that (timm's) are known.
        return type(module) is registered or not hasattr(module, "act")

    def check(self, name: str, module: nn.Module) -> None:
        if not cast(_BatchNorm, module).track_running_stats:
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(module).__name__}) normalises with batch statistics "
                "(track_running_stats=False), so per-example gradients are not defined"
            )

    def sq_norms(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        inputs = inputs.float()
        batch, channels = inputs.shape[0], inputs.shape[1]
        x = inputs.reshape(batch, channels, -1)
        d = grad.reshape(batch, channels, -1)
        norm = cast(_BatchNorm, module)
        assert norm.running_mean is not None and norm.running_var is not None  # see check()
        mean = norm.running_mean.to(inputs.dtype)
        inv_std = torch.rsqrt(norm.running_var.to(inputs.dtype) + norm.eps)
        return ((d * x).sum(-1) - mean * d.sum(-1)).mul_(inv_std).square_()


class BatchNormActRule(BatchNormRule):
    """timm's ``BatchNormAct2d``: batch norm, then ``drop`` and ``act`` inside the same module.

    The output gradient needed is the batch-norm output's, which is the input of ``drop``.
    """

    output_child = "drop"

    def accepts(self, module: nn.Module, registered: type) -> bool:
        return isinstance(getattr(module, "drop", None), nn.Module) and (
            LayerRule.accepts(self, module, registered)
        )


class GroupNormRule(LayerRule):
    """``nn.GroupNorm``: the input normalised per group, then scaled per channel."""

    def sq_norms(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        norm = cast(nn.GroupNorm, module)
        normalised = F.group_norm(inputs.float(), norm.num_groups, eps=norm.eps)
        return _sum_over_positions(grad * normalised).square()


class LayerNormRule(LayerRule):
    """``nn.LayerNorm``: one scale per normalised feature, shared over the leading positions."""

    def sq_norms(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        norm = cast(nn.LayerNorm, module)
        inputs = inputs.float()
        normalised = F.layer_norm(inputs, norm.normalized_shape, eps=norm.eps)
        dims = len(norm.normalized_shape)
        per_example = (grad * normalised).reshape(inputs.shape[0], -1, *inputs.shape[-dims:]).sum(1)
        rows = per_example.reshape(inputs.shape[0], self.rows(module), -1)
        return sq_norms_of_rows(rows)


def rms_normalise(inputs: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last dimension (RMSNorm without its weight)."""
    return inputs * torch.rsqrt(inputs.square().mean(-1, keepdim=True) + eps)


class RMSNormRule(LayerRule):
    r"""RMSNorm over the last dimension: ``nn.RMSNorm`` and the language models' own classes
    (Llama's ``LlamaRMSNorm``, ...). The weight scales :math:`\hat x = x / \sqrt{\overline{x^2} +
    \epsilon}` per feature, so :math:`g_n = \sum_t \delta_n[t] \odot \hat x_n[t]`. Gemma's
    ``(1 + weight)`` has the same gradient."""

    def check(self, name: str, module: nn.Module) -> None:
        weight = module._parameters.get("weight")
        if weight is None or weight.ndim != 1:
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(module).__name__}): not a 1-D scale"
            )
        self._eps(module)

    @staticmethod
    def _eps(module: nn.Module) -> float:
        for attribute in ("variance_epsilon", "eps", "epsilon"):
            value = getattr(module, attribute, None)
            if isinstance(value, (int, float)):
                return float(value)
        if isinstance(module, nn.RMSNorm):  # eps=None: the input dtype's machine epsilon
            return float(torch.finfo(torch.float32).eps)
        raise UnsupportedLayerError(
            f"{type(module).__name__}: no epsilon found (variance_epsilon / eps)"
        )

    def sq_norms(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        normalised = rms_normalise(inputs.float(), self._eps(module))
        per_example = grad * normalised
        return per_example.reshape(inputs.shape[0], -1, per_example.shape[-1]).sum(1).square()
