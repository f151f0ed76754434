r"""Attention (``nn.MultiheadAttention``): its input and its output projections.

The module computes :math:`q, k, v = x_q W_q^\top + b_q,\ x_k W_k^\top + b_k,\ x_v W_v^\top +
b_v` with :math:`[W_q; W_k; W_v]` = ``in_proj_weight`` (``3E × E``), attends, and projects the
heads' concatenation :math:`a` with ``out_proj`` (``E × E``), whose weight the functional
attention reads directly (``out_proj`` is never called as a module, so no hook of its own would
fire). The layer's values are the rows of ``in_proj_weight`` then the rows of
``out_proj.weight`` (``4E`` values, ``E`` entries per row). Per example :math:`n` the rows'
gradients are the vector-Jacobian product of the attention output with its output gradient
:math:`\delta_n`, taken with respect to both weights one example at a time
(:func:`torch.func.vmap` over the batch; per-example gradients of the two weights, ``4E × E``
per example, exist only inside a chunk). Batch-first or sequence-first inputs, key padding
masks, 2-D and per-example 3-D attention masks and ``is_causal`` are followed as the module
follows them. No variational form.
"""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from t2v_lightning.choices import FisherError, UnsupportedLayerError
from t2v_lightning.fisher.layers.rule import LayerRule, chunks, sq_norms_of_rows

__all__ = ["MultiheadAttentionRule"]


class MultiheadAttentionRule(LayerRule):
    """``nn.MultiheadAttention`` with one ``in_proj_weight`` (query, key and value of size E)."""

    whole_call = True

    def accepts(self, module: nn.Module, registered: type) -> bool:
        return type(module) is registered

    def check(self, name: str, module: nn.Module) -> None:
        attention = cast(nn.MultiheadAttention, module)
        if attention.in_proj_weight is None:
            raise UnsupportedLayerError(
                f"layer {name!r} (nn.MultiheadAttention) has separate query, key and value "
                "weights (kdim or vdim differ from embed_dim); no rule here"
            )

    def rows(self, module: nn.Module) -> int:
        attention = cast(nn.MultiheadAttention, module)
        return 4 * attention.embed_dim

    def row_size(self, module: nn.Module) -> int:
        return cast(nn.MultiheadAttention, module).embed_dim

    def sq_norms(self, module: nn.Module, inputs: Any, grad: torch.Tensor) -> torch.Tensor:
        attention = cast(nn.MultiheadAttention, module)
        args, kwargs = inputs
        call = inspect.signature(attention.forward).bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        query = given["query"]
        if query.dim() != 3:
            raise FisherError(
                "nn.MultiheadAttention called on an unbatched input: the Fisher needs a batch"
            )
        batch_dim = 0 if attention.batch_first else 1
        # One example at a time as an unbatched call: (L, E) inputs, (S,) padding mask.
        query, key, value = (
            cast(torch.Tensor, given[k]).movedim(batch_dim, 0).float()
            for k in ("query", "key", "value")
        )
        delta = grad.movedim(batch_dim, 0)
        batch = query.shape[0]
        padding = given["key_padding_mask"]
        mask = given["attn_mask"]
        per_example_mask = mask is not None and mask.dim() == 3
        if per_example_mask:
            mask = mask.reshape(batch, attention.num_heads, *mask.shape[1:])
        weights = (
            attention.in_proj_weight.detach().float(),
            attention.out_proj.weight.detach().float(),
        )
        fixed = {
            "in_proj_bias": _float(attention.in_proj_bias),
            "bias_k": _float(attention.bias_k),
            "bias_v": _float(attention.bias_v),
            "out_proj_bias": _float(attention.out_proj.bias),
        }

        def rows_of(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            d: torch.Tensor,
            pad: torch.Tensor | None,
            attn: torch.Tensor | None,
        ) -> torch.Tensor:
            def output(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
                out, _ = F.multi_head_attention_forward(
                    q,
                    k,
                    v,
                    attention.embed_dim,
                    attention.num_heads,
                    w_in,
                    fixed["in_proj_bias"],
                    fixed["bias_k"],
                    fixed["bias_v"],
                    attention.add_zero_attn,
                    0.0,
                    w_out,
                    fixed["out_proj_bias"],
                    training=False,
                    key_padding_mask=pad,
                    need_weights=False,
                    attn_mask=attn,
                    is_causal=bool(given["is_causal"]),
                )
                return out

            pullback = torch.func.vjp(output, *weights)[1]
            g_in, g_out = pullback(d)
            return torch.cat([sq_norms_of_rows(g_in), sq_norms_of_rows(g_out)])

        per_example = 4 * attention.embed_dim * attention.embed_dim
        out = torch.empty(batch, self.rows(module), dtype=torch.float32, device=query.device)
        for part in chunks(batch, per_example):
            out[part] = torch.func.vmap(
                rows_of,
                in_dims=(
                    0,
                    0,
                    0,
                    0,
                    None if padding is None else 0,
                    0 if per_example_mask else None,
                ),
            )(
                query[part],
                key[part],
                value[part],
                delta[part],
                None if padding is None else padding[part],
                mask[part] if per_example_mask else mask,
            )
        return out


def _float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().float()
