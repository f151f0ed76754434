r"""What a layer type must say to enter the embedding: the :class:`LayerRule` interface.

A rule describes one layer type for both Fisher methods, from one place for its geometry:

* the Monte Carlo methods need, for every example :math:`n` of a batch, the squared norm of each
  row of the per-example weight gradient, :math:`\lVert g_n[r, :] \rVert^2` with rows those of
  ``weight.reshape(weight.shape[0], -1)`` (:meth:`LayerRule.sq_norms`), from the layer's input
  and the gradient of the loss with respect to its output;
* the variational method needs the variance of the layer's output under per-row weight noise,
  :math:`\text{layer}(x^2 + 0.01;\ \sigma^2)` (:meth:`LayerRule.receptive_field_sums` and
  :meth:`LayerRule.grouped`).

The table of :mod:`t2v_lightning.fisher.layers.table` maps each module type to its rule.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Size, Tensor, nn

from t2v_lightning.choices import UnsupportedLayerError

__all__ = [
    "Grouped",
    "INPUT_NOISE_FLOOR",
    "LayerRule",
    "chunks",
    "sq_norms_of_rows",
    "layer_weight",
]

INPUT_NOISE_FLOOR = 0.01
"""Added to :math:`x^2` in the variance pass (the reference's ``input ** 2 + 1e-2``)."""

Grouped = tuple[Tensor, Tensor, tuple[int, ...]]
"""A receptive-field sum and a per-row vector viewed to broadcast, and the output's grouped shape."""

# Intermediate tensors of one per-example computation are kept under this many elements by
# splitting the batch (about 256 MiB of float32).
CHUNK_ELEMENTS = 64 * 1024 * 1024


def chunks(batch: int, per_example: int) -> Iterator[slice]:
    """Slices of ``range(batch)`` whose intermediates of ``per_example`` elements stay small."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_example))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def sq_norms_of_rows(rows: torch.Tensor) -> torch.Tensor:
    """Sum of squares over the last dimension, in one pass (5-6x faster than square + sum)."""
    return torch.linalg.vector_norm(rows, dim=-1).square()


def layer_weight(module: nn.Module) -> nn.Parameter:
    """The ``weight`` parameter of an embedded layer."""
    weight = module._parameters.get("weight")
    if weight is None:
        raise UnsupportedLayerError(f"{type(module).__name__} has no weight parameter")
    return weight


class LayerRule:
    """How one layer type enters the embedding. Subclass it and override what applies.

    Attributes:
        monte_carlo: the layer has a Monte Carlo form (:meth:`sq_norms`).
        variational: the layer has a variational form (:meth:`receptive_field_sums`,
            :meth:`grouped`).
        output_child: where the output gradient is read. ``None``: the module's output. Else the
            name of a child module whose *input* is the layer's output (timm's
            ``BatchNormAct2d`` runs its activation inside the module: its batch-norm output is
            the input of its ``drop`` child).
        whole_call: the layer needs every argument of its call, not its first input, and its
            output is the first element of what it returns. :meth:`sq_norms` then receives
            ``(args, kwargs)`` as ``inputs`` (``nn.MultiheadAttention``: query, key, value and
            masks). Such a layer owns no ``weight``; its rule covers its submodules too (their
            weights are rows of its embedding, not layers of their own).
    """

    monte_carlo: bool = True
    variational: bool = False
    output_child: str | None = None
    whole_call: bool = False

    def accepts(self, module: nn.Module, registered: type) -> bool:
        """Whether the rule holds for ``module``, an instance of ``registered`` or a subclass.

        By default a subclass is accepted when it keeps the registered type's ``forward`` (so
        it computes the same function); one that rewrites ``forward`` is unknown and refused.
        """
        kind = type(module)
        return kind is registered or getattr(kind, "forward", None) is getattr(
            registered, "forward", None
        )

    def check(self, name: str, module: nn.Module) -> None:
        """Raise :class:`UnsupportedLayerError` (naming ``name``) if this instance is unusable."""

    def rows(self, module: nn.Module) -> int:
        """Values of the layer in the embedding: rows of ``weight.reshape(weight.shape[0], -1)``."""
        return int(layer_weight(module).shape[0])

    def row_size(self, module: nn.Module) -> int:
        """Entries per row of ``weight.reshape(weight.shape[0], -1)``."""
        weight = layer_weight(module)
        return int(weight.numel() // weight.shape[0])

    def sq_norms(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        r"""``(B, rows)``: :math:`\lVert g_n[r, :] \rVert^2` for each example ``n`` and row ``r``.

        Args:
            module: the layer.
            inputs: the layer's first input in the forward pass, detached, as the layer received
                it (any dtype: integer ids for a table lookup; cast what you use to float32).
            grad: float32 gradient of the (per-example weighted) loss with respect to the
                layer's output (or, with :attr:`output_child`, to that child's input). Rows of
                an example that the loss does not see (padding, masked positions) are zero.
        """
        raise UnsupportedLayerError(f"no Monte Carlo form for {type(module).__name__}")

    def receptive_field_sums(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        r"""The sums :math:`s` with :math:`\text{layer}(x^2 + 0.01;\ \sigma^2)[o] = \sigma^2_o s[g(o)]`.

        Computed in float32; see :func:`~t2v_lightning.fisher.variational.output_variance`.
        """
        raise UnsupportedLayerError(f"no variational form for {type(module).__name__}")

    def output_variance(
        self, module: nn.Module, inputs: torch.Tensor, variance: torch.Tensor
    ) -> torch.Tensor:
        r""":math:`\text{layer}(x^2 + 0.01;\ \sigma^2)` for per-row ``variance``, float32."""
        raise UnsupportedLayerError(f"no variational form for {type(module).__name__}")

    def grouped(
        self, module: nn.Module, field: Tensor, per_filter: Tensor, output_shape: Size
    ) -> Grouped:
        """Views of ``field`` and a per-row vector that broadcast to the layer's output.

        Returns:
            ``(field, per_filter, shape)`` whose product has ``shape``, a view of the output.
        """
        raise UnsupportedLayerError(f"no variational form for {type(module).__name__}")
