r"""Lookup tables (``nn.Embedding``): a token table, a position table.

A row :math:`v` of the table is used by the positions that look it up, so the per-example
gradient of that row is the sum of their output gradients,
:math:`g_n[v] = \sum_{t:\, id_{n,t} = v} \delta_n[t]`, and
:math:`\lVert g_n[v] \rVert^2` squares that *sum*: the contributions of a token repeated in one
example are added before squaring. They are added per distinct ``(example, id)`` pair (a
scatter-add over at most B·T pairs), so no per-example gradient of the table (B × V × D) is ever
materialised. Rows that no position of an example looks up get zero. The table's
``padding_idx`` row gets no gradient from PyTorch, and none here. No variational form.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from t2v_lightning.choices import FisherError, UnsupportedLayerError
from t2v_lightning.fisher.layers.rule import LayerRule, sq_norms_of_rows

__all__ = ["EmbeddingRule", "table_sq_norms"]


def table_sq_norms(
    ids: torch.Tensor, grad: torch.Tensor, num_rows: int, padding_idx: int | None = None
) -> torch.Tensor:
    """``(B, num_rows)``: squared norms of each example's gradient rows of a lookup table.

    Args:
        ids: the row looked up at each position, ``(B, ...)`` integers.
        grad: the gradient with respect to the looked-up vectors, ``(B, ..., D)`` float32.
        num_rows: rows of the table.
        padding_idx: a row that receives no gradient (``nn.Embedding``'s), or None.
    """
    batch = ids.shape[0]
    flat_ids = ids.reshape(batch, -1).to(torch.int64)
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= num_rows):
        raise FisherError(f"ids outside [0, {num_rows}) reached a table of {num_rows} rows")
    vectors = grad.reshape(-1, grad.shape[-1])
    if padding_idx is not None:
        vectors = torch.where((flat_ids.reshape(-1, 1) == padding_idx), 0.0, vectors)
    keys = (torch.arange(batch, device=ids.device).unsqueeze(1) * num_rows + flat_ids).reshape(-1)
    pairs, which = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(
        pairs.numel(), vectors.shape[-1], dtype=vectors.dtype, device=vectors.device
    )
    summed.index_add_(0, which, vectors)
    out = torch.zeros(batch * num_rows, dtype=vectors.dtype, device=vectors.device)
    out[pairs] = sq_norms_of_rows(summed)
    return out.reshape(batch, num_rows)


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: one value per row of the table (a token, a position)."""

    def check(self, name: str, module: nn.Module) -> None:
        table = cast(nn.Embedding, module)
        if table.max_norm is not None or table.scale_grad_by_freq:
            raise UnsupportedLayerError(
                f"layer {name!r} (nn.Embedding) uses max_norm or scale_grad_by_freq, which change "
                "its rows or their gradients during the pass; no closed form here"
            )

    def sq_norms(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        table = cast(nn.Embedding, module)
        return table_sq_norms(inputs, grad, table.num_embeddings, table.padding_idx)
