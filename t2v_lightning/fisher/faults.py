"""How the Fisher pass reports non-finite values: which examples, and what to change."""

from __future__ import annotations

import torch

from t2v_lightning.choices import FisherError
from t2v_lightning.probe import nonfinite_rows

__all__ = ["check_finite_logits", "ids_text", "nonfinite_ids", "precision_hint"]


def precision_hint(dtype: torch.dtype, grad_scale: float = 1.0) -> str:
    """What to change when values of ``dtype`` overflow (float16), else nothing; with the loss
    scale ``grad_scale`` of the backward that overflowed."""
    if dtype != torch.float16:
        return ""
    hint = (
        "; under float16 this is an overflow (values beyond 65504): use precision="
        "'bf16-mixed' or '32-true'"
    )
    if grad_scale != 1.0:
        hint += f" (or a smaller grad_scale than {grad_scale:g})"
    return hint


def nonfinite_ids(values: torch.Tensor, ids: torch.Tensor | None) -> list[int]:
    """Ids (or batch rows when ``ids`` is None) of the rows of ``values`` holding NaN / inf."""
    rows = nonfinite_rows(values)
    if ids is None:
        return rows.tolist()
    return ids.detach().cpu()[rows.cpu()].tolist()


def ids_text(bad: list[int], ids: torch.Tensor | None) -> str:
    """``example ids [...]`` (or ``batch rows [...]``), the first five and how many more."""
    what = "example ids" if ids is not None else "batch rows"
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"{what} {bad[:5]}{more}"


def check_finite_logits(
    logits: torch.Tensor, ids: torch.Tensor | None, what: str = "logits"
) -> None:
    """Raise :class:`FisherError` naming the examples whose ``what`` hold NaN or inf."""
    if torch.isfinite(logits).all():
        return
    bad = nonfinite_ids(logits, ids)
    raise FisherError(
        f"the network produced non-finite {what} (NaN or inf) for {ids_text(bad, ids)}; the "
        "probe's weights or its head may hold NaN / inf, or its activations overflow"
        + precision_hint(logits.dtype),
        example_ids=bad if ids is not None else None,
    )
