"""Distances between task embeddings (SPEC section 4), vectorised.

Notation: for embeddings ``a`` and ``b``, ``h`` is the hessian (the filter-wise Fisher), ``s``
the scale (the prior precision) and ``v = 1 / h`` the variance; all operations are elementwise
over the ``d`` entries, and ``ε = 1e-8``.

==================== =============================================================================
``cosine``           ``h'_a = h_a / (h_a + h_b + ε)``, ``h'_b = h_b / (h_a + h_b + ε)``;
                     ``1 - cos(h'_a, h'_b)`` (the default)
``normalized_cosine`` ``1 - cos(s_a / h_a, s_b / h_b)``
``correlation``      ``1 - pearson(v_a, v_b)``
``entropy``          ``log 2 - mean(H(h'_a))`` with ``H(p) = -p log p - (1 - p) log(1 - p)``
``kl``               ``Σ max(kl0, kl1)`` with ``kl0 = ½ (v_a / v_b - 1 + log v_b - log v_a)`` and
                     ``kl1`` the same with ``a`` and ``b`` swapped
``asymmetric_kl``    ``Σ kl0`` (the KL divergence of ``N(0, v_a)`` from ``N(0, v_b)``)
``jsd``              ``v̄ = (v_a + v_b) / 2``; ``mean(½ (KL(v_a ‖ v̄) + KL(v_b ‖ v̄)))``
==================== =============================================================================

All but ``asymmetric_kl`` are symmetric (``entropy`` up to the ``ε`` in ``h'``); :func:`pdist`
returns a symmetric matrix with a zero diagonal, computing ``d(e_i, e_j)`` for ``i < j`` as the
2019 reference does, and the full matrix for ``asymmetric_kl``.

How it is computed. ``normalized_cosine``, ``correlation`` and ``asymmetric_kl`` separate into
matrix products (``Σ kl0 = ½ (v_a · h_b - d + Σ log v_b - Σ log v_a)``) and are computed in
float64. The other four need every pair's ``d`` entries; they run over tiles of pairs that fit
in the CPU cache, in float32, with formulas that avoid cancellation:

* the per-entry maximum in ``kl`` is the KL in the direction of the larger variance (``kl0 ≥
  kl1`` exactly when ``v_a ≥ v_b``): with ``R = max(v_a / v_b, v_b / v_a)`` the entry is
  ``½ (R - 1 - log R)``;
* ``jsd``'s entry is ``½ log cosh(t / 2) = ½ log1p((√v_a - √v_b)² / (2 √v_a √v_b))``;
* ``entropy``'s mean binary entropy is ``mean(log S - (h_a log h_a + (h_b + ε) log(h_b + ε)) / S)``
  with ``S = h_a + h_b + ε`` (one logarithm per pair and entry);
* every one of the four is unchanged when entry ``k`` of all hessians (and ``ε``) is divided by
  the same ``c_k``; dividing by the geometric mean of the entry over the embeddings keeps
  float32 far from overflow and cancellation. Where the values of one entry span more than
  ``e^60`` the computation falls back to float64.

The results agree with a float64 implementation of the formulas above to about ``1e-6``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Literal, get_args

import torch

from t2v_lightning.embedding import TaskEmbedding, check_comparable

__all__ = [
    "DISTANCES",
    "EPSILON",
    "Distance",
    "cdist",
    "check_distance_defined",
    "check_embeddings",
    "pairwise_distances",
    "pdist",
    "task_distance",
]

Distance = Literal[
    "cosine", "normalized_cosine", "correlation", "entropy", "kl", "asymmetric_kl", "jsd"
]
DISTANCES: tuple[str, ...] = get_args(Distance)
SYMMETRIC_DISTANCES: tuple[str, ...] = tuple(name for name in DISTANCES if name != "asymmetric_kl")

EPSILON = 1e-8
"""The ``ε`` of ``h_a / (h_a + h_b + ε)`` in ``cosine`` and ``entropy`` (the reference's value)."""

# Pairs are processed in tiles of about this many float entries (1 MiB in float32): small enough
# for the few temporaries of a tile to stay in cache, large enough to amortise Python overhead.
_TILE_ENTRIES = 1 << 18
# float32 is used while every rescaled value (and ε) lies within e^±_FLOAT32_LOG_RANGE of 1, which
# keeps squares, sums and exponentials of differences far from float32 overflow and underflow.
_FLOAT32_LOG_RANGE = 30.0
_LOG2 = math.log(2.0)
# Below this many pair-entries a thread pool costs more than it saves.
_PARALLEL_MIN_ENTRIES = 1 << 24
_TILED = ("cosine", "entropy", "kl", "jsd")


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


# --------------------------------------------------------------------------------------------
# Validation of the inputs
# --------------------------------------------------------------------------------------------


def _bad_entries_message(
    values: torch.Tensor,
    label: str,
    what: str,
    layers: dict[str, tuple[int, int]] | None,
    allow_zero: bool = False,
) -> str:
    finite = torch.isfinite(values)
    negative = values < 0 if allow_zero else values <= 0
    bad = ~finite | negative
    first = int(torch.nonzero(bad)[0, 0])
    where = f"index {first}"
    for name, (start, stop) in (layers or {}).items():
        if start <= first < stop:
            where += f" (layer {name!r})"
            break
    kinds = []
    if int((~finite).sum()):
        kinds.append(f"{int((~finite).sum())} non-finite")
    if int(negative.sum()):
        kinds.append(f"{int(negative.sum())} {'negative' if allow_zero else 'non-positive'}")
    need = (
        "finite, non-negative Fisher values"
        if allow_zero
        else "finite, strictly positive Fisher values (they divide by them); a zero marks a "
        "filter that received no gradient (a dead ReLU channel, for instance): use the cosine "
        "or entropy distance, which accept zeros"
    )
    return (
        f"{label} has {' and '.join(kinds)} {what} value(s), first at {where}: "
        f"{float(values[first])!r}. This distance needs {need}"
    )


def _check_positive(
    values: torch.Tensor,
    labels: Sequence[str],
    what: str,
    layers: Sequence[dict[str, tuple[int, int]] | None] | None = None,
    allow_zero: bool = False,
) -> None:
    """Raise ``ValueError`` naming the first row of ``values`` with a non-finite or ≤ 0 entry.

    With ``allow_zero`` only negative entries are refused: the cosine and entropy distances
    normalise by ``h_a + h_b + ε`` and are defined for filters whose Fisher is exactly zero.
    """
    ok = torch.isfinite(values) & ((values >= 0) if allow_zero else (values > 0))
    if bool(ok.all()):
        return
    row = int(torch.nonzero(~ok.all(dim=1))[0, 0])
    row_layers = layers[row] if layers is not None else None
    raise ValueError(_bad_entries_message(values[row], labels[row], what, row_layers, allow_zero))


_ZERO_TOLERANT = ("cosine", "entropy")


def _check_not_all_zero(values: torch.Tensor, labels: Sequence[str], distance: str) -> None:
    """Refuse an all-zero hessian for the cosine distance (it would be NaN), naming it.

    The cosine distance normalises each filter by ``h_a + h_b + ε``; a vector that is zero
    everywhere has no direction, so every distance to it is 0/0.
    """
    if distance != "cosine" or values.numel() == 0:
        return
    zero = ~(values != 0).any(dim=1)
    if bool(zero.any()):
        row = int(torch.nonzero(zero)[0, 0])
        raise ValueError(
            f"{labels[row]} is zero everywhere (its Fisher vanished: a probe whose embedded "
            "layers do not affect its output, or a head that predicts one class with certainty); "
            "the cosine distance to it is undefined (0/0): embed the task again or leave it out"
        )


def check_distance_defined(embedding: TaskEmbedding, distance: str, label: str) -> None:
    """Raise ``ValueError`` naming ``label`` when ``distance`` is undefined for ``embedding``.

    Args:
        embedding: one embedding.
        distance: one of :data:`DISTANCES`.
        label: how to name it (a file name, say).
    """
    _check_distance(distance)
    hessian = embedding.hessian.to(torch.float64)[None, :]
    _check_positive(
        hessian, [label], "hessian", [embedding.layers], allow_zero=distance in _ZERO_TOLERANT
    )
    _check_not_all_zero(hessian, [label], distance)


def _label(embedding: TaskEmbedding, argument: str, index: int | None) -> str:
    where = argument if index is None else f"{argument}[{index}]"
    return f"{where} ({embedding.name!r})" if embedding.name else where


def check_embeddings(
    embeddings: Sequence[TaskEmbedding],
    argument: str = "embeddings",
    assume_comparable: bool = False,
) -> list[TaskEmbedding]:
    """Check that ``embeddings`` is a non-empty sequence of mutually comparable embeddings.

    Args:
        embeddings: the embeddings.
        argument: the argument's name, used in error messages.
        assume_comparable: accept embeddings that record no probe fingerprint or layer table
            (see :func:`~t2v_lightning.embedding.check_comparable`).

    Returns:
        The embeddings as a list.

    Raises:
        TypeError: not a sequence of :class:`TaskEmbedding`.
        ValueError: the sequence is empty, or an embedding has no entries.
        IncompatibleEmbeddingsError: two embeddings of different probes or layer layouts, or
            one that cannot be checked (no fingerprint or layer table) without
            ``assume_comparable``.
    """
    if isinstance(embeddings, TaskEmbedding):
        raise TypeError(
            f"{argument} must be a sequence of TaskEmbedding, got a single TaskEmbedding "
            f"(wrap it in a list)"
        )
    if not isinstance(embeddings, Sequence):
        raise TypeError(
            f"{argument} must be a sequence of TaskEmbedding, got {type(embeddings).__name__}"
        )
    items = list(embeddings)
    if not items:
        raise ValueError(f"{argument} is empty; at least one embedding is needed")
    for index, item in enumerate(items):
        if not isinstance(item, TaskEmbedding):
            raise TypeError(
                f"{argument}[{index}] must be a TaskEmbedding, got {type(item).__name__}"
            )
        if len(item) == 0:
            raise ValueError(
                f"{_label(item, argument, index)} has no entries; there is nothing to compare"
            )
    warned = False  # one scale warning per call is enough
    for index in range(1, len(items)):
        warned = (
            check_comparable(
                items[0],
                items[index],
                names=(f"{argument}[0]", f"{argument}[{index}]"),
                warn_scale=not warned,
                assume_comparable=assume_comparable,
            )
            or warned
        )
    return items


def _stack(embeddings: Sequence[TaskEmbedding]) -> tuple[torch.Tensor, torch.Tensor]:
    hessians = torch.stack([e.hessian for e in embeddings]).to(torch.float64)
    scales = torch.stack([e.scale for e in embeddings]).to(torch.float64)
    return hessians, scales


# --------------------------------------------------------------------------------------------
# Distances that separate into matrix products (float64)
# --------------------------------------------------------------------------------------------


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def _cosine_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (1.0 - _unit_rows(x) @ _unit_rows(y).T).clamp_(0.0, 2.0)


def _centered_rows(v: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    centered = v - v.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(centered, dim=1)
    flat = norms <= 1e-12 * torch.linalg.vector_norm(v, dim=1)
    if bool(flat.any()):
        row = int(torch.nonzero(flat)[0, 0])
        raise ValueError(
            f"the correlation distance is undefined for {labels[row]}: all its variances are "
            f"equal (a constant vector has no Pearson correlation); use another distance"
        )
    return centered


def _separable(
    distance: str,
    ha: torch.Tensor,
    sa: torch.Tensor,
    hb: torch.Tensor,
    sb: torch.Tensor,
    labels_a: Sequence[str],
    labels_b: Sequence[str],
) -> torch.Tensor:
    if distance == "normalized_cosine":
        return _cosine_matrix(sa / ha, sb / hb)
    if distance == "correlation":
        va = _centered_rows(1.0 / ha, labels_a)
        vb = _centered_rows(1.0 / hb, labels_b)
        return _cosine_matrix(va, vb)
    # asymmetric_kl: Σ_k ½ (v_a/v_b - 1 + log v_b - log v_a), invariant to a common rescaling of
    # each entry; rescaling by the geometric mean keeps the matrix product well scaled.
    log_center = torch.cat([ha, hb]).log().mean(dim=0)
    log_ha, log_hb = ha.log() - log_center, hb.log() - log_center
    ratio = torch.exp(-log_ha) @ torch.exp(log_hb).T  # Σ_k v_a,k / v_b,k
    d = ha.shape[1]
    kl = 0.5 * (ratio - d + log_ha.sum(dim=1, keepdim=True) - log_hb.sum(dim=1)[None, :])
    return kl.clamp_(min=0.0)


# --------------------------------------------------------------------------------------------
# Distances that need every pair's entries (float32 tiles)
# --------------------------------------------------------------------------------------------

_Side = dict[str, torch.Tensor]
_Kernel = Callable[[_Side, _Side, torch.Tensor, torch.Tensor], torch.Tensor]


def _cosine_kernel(row: _Side, cols: _Side, buffer: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    # w = 1/S² with S = h_a + h_b + ε; cos = Σ w h_a h_b / sqrt(Σ w h_a² · Σ w h_b²).
    w = torch.add(cols["h"], row["h_eps"], out=buffer).reciprocal_().square_()
    norm_a = torch.mv(w, row["h_sq"])
    wb = w.mul_(cols["h"])
    dot = torch.mv(wb, row["h"])
    norm_b = wb.mul_(cols["h"]).sum(dim=1)
    return 1.0 - dot.double() / (norm_a.double() * norm_b.double()).sqrt()


def _entropy_kernel(
    row: _Side, cols: _Side, buffer: torch.Tensor, spare: torch.Tensor
) -> torch.Tensor:
    # mean H = mean(log S - (h_a log h_a) / S - ((h_b + ε) log(h_b + ε)) / S), S = h_a + h_b + ε.
    total = torch.add(cols["h_eps"], row["h"], out=buffer)
    log_total = torch.log(total, out=spare).sum(dim=1)
    inverse = total.reciprocal_()
    term_a = torch.mv(inverse, row["h_log_h"])
    term_b = inverse.mul_(cols["h_eps_log_h_eps"]).sum(dim=1)
    d = buffer.shape[1]
    mean_entropy = (log_total.double() - term_a.double() - term_b.double()) / d
    return _LOG2 - mean_entropy


def _kl_kernel(row: _Side, cols: _Side, buffer: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    # max(kl0, kl1) = ½ (R - 1 - log R) with R = max(v_a / v_b, v_b / v_a) ≥ 1.
    ratio = torch.mul(cols["h"], row["v"], out=buffer)  # v_a / v_b = v_a · h_b
    larger = torch.maximum(ratio, torch.reciprocal(ratio, out=spare), out=buffer)
    log_larger = torch.log(larger, out=spare)
    return 0.5 * larger.sub_(1.0).sub_(log_larger).sum(dim=1).double()


def _jsd_kernel(row: _Side, cols: _Side, buffer: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    # ½ (KL(v_a ‖ v̄) + KL(v_b ‖ v̄)) = ½ log1p((√v_a - √v_b)² / (2 √v_a √v_b)).
    gap = torch.sub(cols["sqrt_v"], row["sqrt_v"], out=buffer).square_()
    ratio = gap.div_(torch.mul(cols["sqrt_v"], row["two_sqrt_v"], out=spare))
    d = buffer.shape[1]
    return 0.5 * ratio.log1p_().sum(dim=1).double() / d


_KERNELS: dict[str, _Kernel] = {
    "cosine": _cosine_kernel,
    "entropy": _entropy_kernel,
    "kl": _kl_kernel,
    "jsd": _jsd_kernel,
}


def _tile_inputs(
    distance: str, ha: torch.Tensor, hb: torch.Tensor, same: bool
) -> tuple[_Side, _Side]:
    """The per-row quantities each kernel reads, rescaled entrywise, in the working precision.

    Each dimension is divided by the geometric mean of its positive entries; exact zeros (which
    only the cosine and entropy distances accept) stay zero and take no part in the scaling.
    """
    both = ha if same else torch.cat([ha, hb])
    positive = both > 0
    logs = torch.where(positive, both.clamp_min(torch.finfo(both.dtype).tiny).log(), 0.0)
    counts = positive.sum(dim=0)
    log_center = torch.where(counts > 0, logs.sum(dim=0) / counts.clamp_min(1), 0.0)
    unit = torch.exp(-log_center)

    def logs_of(h: torch.Tensor) -> torch.Tensor:
        scaled = h * unit
        return torch.where(scaled > 0, scaled.clamp_min(torch.finfo(h.dtype).tiny).log(), 0.0)

    log_ha, log_hb = logs_of(ha), logs_of(hb)
    log_eps = math.log(EPSILON) - log_center
    spread = max(float(log_ha.abs().max()), float(log_hb.abs().max()))
    if distance in ("cosine", "entropy"):
        spread = max(spread, float(log_eps.max()))
    dtype = torch.float32 if spread <= _FLOAT32_LOG_RANGE else torch.float64
    eps = torch.exp(log_eps)  # float64; entries far below the hessians vanish harmlessly
    a, b = ha * unit, hb * unit

    def cast(**tensors: torch.Tensor) -> _Side:
        return {k: v.to(dtype).contiguous() for k, v in tensors.items()}

    if distance == "cosine":
        return cast(h=a, h_eps=a + eps, h_sq=a * a), cast(h=b)
    if distance == "entropy":
        b_eps = b + eps
        return cast(h=a, h_log_h=a * log_ha), cast(h_eps=b_eps, h_eps_log_h_eps=b_eps * b_eps.log())
    if distance == "kl":
        return cast(v=torch.exp(-log_ha)), cast(h=b)
    # jsd
    sqrt_va, sqrt_vb = torch.exp(-0.5 * log_ha), torch.exp(-0.5 * log_hb)
    return cast(sqrt_v=sqrt_va, two_sqrt_v=2.0 * sqrt_va), cast(sqrt_v=sqrt_vb)


def _pool_size() -> int:
    """Threads working on the tiles: as many as torch would use within one operation."""
    return torch.get_num_threads()


@contextmanager
def _one_thread_per_op() -> Iterator[None]:
    """Run torch operations single-threaded for the duration (the previous setting is restored).

    The tiles are parallelised across rows by a thread pool instead: an intra-op parallel region
    per tile operation costs a barrier every ~100 µs, which collapses when the machine has fewer
    free cores than threads (measured 5-10× slower than one thread on a loaded 2-core machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _tiled(distance: str, ha: torch.Tensor, hb: torch.Tensor, upper_only: bool) -> torch.Tensor:
    kernel = _KERNELS[distance]
    rows, cols = _tile_inputs(distance, ha, hb, same=upper_only)
    m, n, d = ha.shape[0], hb.shape[0], ha.shape[1]
    dtype = next(iter(rows.values())).dtype
    width = max(1, min(n, _TILE_ENTRIES // d))
    out = torch.zeros(m, n, dtype=torch.float64)

    def run(first: int, step: int) -> None:
        buffer = torch.empty(width, d, dtype=dtype)
        spare = torch.empty(width, d, dtype=dtype)
        for i in range(first, m, step):
            row = {k: v[i] for k, v in rows.items()}
            for start in range(i + 1 if upper_only else 0, n, width):
                stop = min(n, start + width)
                block = {k: v[start:stop] for k, v in cols.items()}
                size = stop - start
                out[i, start:stop] = kernel(row, block, buffer[:size], spare[:size])

    workers = min(_pool_size(), m)
    if workers <= 1 or m * n * d < _PARALLEL_MIN_ENTRIES:
        run(0, 1)
    else:
        # Rows are interleaved across workers so that each gets a share of the long and the
        # short rows of the upper triangle.
        with _one_thread_per_op(), ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(run, w, workers) for w in range(workers)]:
                future.result()
    return out.clamp_(min=0.0)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def pairwise_distances(
    hessians: torch.Tensor,
    scales: torch.Tensor,
    other_hessians: torch.Tensor | None = None,
    other_scales: torch.Tensor | None = None,
    distance: Distance = "cosine",
) -> torch.Tensor:
    """Distances between the rows of hessian (and scale) matrices: the tensor core of pdist/cdist.

    Args:
        hessians: ``(m, d)`` hessians, one embedding per row (finite, > 0).
        scales: ``(m, d)`` scales (finite and > 0 for ``normalized_cosine``).
        other_hessians: ``(n, d)`` hessians to measure against; ``None`` means ``hessians``
            itself, with :func:`pdist`'s conventions (symmetric, zero diagonal).
        other_scales: ``(n, d)`` scales of ``other_hessians``.
        distance: one of :data:`DISTANCES`.

    Returns:
        The ``(m, n)`` float64 matrix with entry ``[i, j] = d(row i, other row j)``.
    """
    _check_distance(distance)
    same = other_hessians is None
    ha, sa = hessians.detach().cpu().to(torch.float64), scales.detach().cpu().to(torch.float64)
    if other_hessians is None:
        hb, sb = ha, sa
    else:
        if other_scales is None:
            raise ValueError("other_scales must be given with other_hessians")
        hb = other_hessians.detach().cpu().to(torch.float64)
        sb = other_scales.detach().cpu().to(torch.float64)
    for name, value in (
        ("hessians", ha),
        ("scales", sa),
        ("other_hessians", hb),
        ("other_scales", sb),
    ):
        if value.ndim != 2:
            raise ValueError(
                f"{name} must be a 2-D (embeddings × entries) tensor, got shape "
                f"{tuple(value.shape)}"
            )
    if sa.shape != ha.shape or sb.shape != hb.shape or ha.shape[1] != hb.shape[1]:
        raise ValueError(
            f"shapes do not match: hessians {tuple(ha.shape)}, scales {tuple(sa.shape)}, "
            f"other_hessians {tuple(hb.shape)}, other_scales {tuple(sb.shape)}"
        )
    if ha.shape[1] == 0:
        raise ValueError("embeddings have no entries (d = 0)")
    labels_a = [f"hessians row {i}" for i in range(ha.shape[0])]
    labels_b = labels_a if same else [f"other_hessians row {i}" for i in range(hb.shape[0])]
    zeros = distance in _ZERO_TOLERANT
    _check_positive(ha, labels_a, "hessian", allow_zero=zeros)
    _check_not_all_zero(ha, labels_a, distance)
    if not same:
        _check_positive(hb, labels_b, "hessian", allow_zero=zeros)
        _check_not_all_zero(hb, labels_b, distance)
    if distance == "normalized_cosine":
        _check_positive(sa, [s.replace("hessians", "scales") for s in labels_a], "scale")
        if not same:
            _check_positive(sb, [s.replace("hessians", "scales") for s in labels_b], "scale")
    return _distances(distance, ha, sa, hb, sb, same, labels_a, labels_b)


def _distances(
    distance: str,
    ha: torch.Tensor,
    sa: torch.Tensor,
    hb: torch.Tensor,
    sb: torch.Tensor,
    same: bool,
    labels_a: Sequence[str],
    labels_b: Sequence[str],
) -> torch.Tensor:
    symmetric = same and distance in SYMMETRIC_DISTANCES
    if distance in _TILED:
        matrix = _tiled(distance, ha, hb, upper_only=symmetric)
    else:
        matrix = _separable(distance, ha, sa, hb, sb, labels_a, labels_b)
        if symmetric:
            matrix = torch.triu(matrix, diagonal=1)
    if symmetric:
        matrix = matrix + matrix.T
    elif same:
        matrix.fill_diagonal_(0.0)
    return matrix


def _validated(
    items: Sequence[TaskEmbedding], labels: Sequence[str], distance: str
) -> tuple[torch.Tensor, torch.Tensor]:
    hessians, scales = _stack(items)
    layers = [e.layers for e in items]
    _check_positive(hessians, labels, "hessian", layers, allow_zero=distance in _ZERO_TOLERANT)
    _check_not_all_zero(hessians, labels, distance)
    if distance == "normalized_cosine":
        _check_positive(scales, labels, "scale", layers)
    return hessians, scales


def pdist(
    embeddings: Sequence[TaskEmbedding],
    distance: Distance = "cosine",
    assume_comparable: bool = False,
) -> torch.Tensor:
    """All pairwise distances between ``embeddings`` (SPEC section 4).

    Args:
        embeddings: embeddings made with the same probe and layer layout.
        distance: one of :data:`DISTANCES` (see the module docstring for the formulas).
        assume_comparable: compare embeddings that record no probe fingerprint or layer table
            (made by hand, or by other software); without it they are refused.

    Returns:
        The ``(n, n)`` float64 matrix ``D[i, j] = d(e_i, e_j)``: symmetric (``d(e_i, e_j)`` for
        ``i < j`` mirrored) with a zero diagonal, except for ``asymmetric_kl`` whose full
        matrix is returned (its diagonal is zero too).

    Raises:
        IncompatibleEmbeddingsError: embeddings of different probes or layer layouts.
        ValueError: an unknown distance, an empty sequence, or a non-finite or non-positive
            hessian (scale, for ``normalized_cosine``).

    Example:
        >>> import torch
        >>> from t2v_lightning import TaskEmbedding, pdist
        >>> a = TaskEmbedding(torch.tensor([1.0, 2.0]), torch.ones(2))  # no probe recorded
        >>> b = TaskEmbedding(torch.tensor([2.0, 1.0]), torch.ones(2))
        >>> pdist([a, b], assume_comparable=True).shape
        torch.Size([2, 2])
    """
    _check_distance(distance)
    items = check_embeddings(embeddings, "embeddings", assume_comparable)
    labels = [_label(e, "embeddings", i) for i, e in enumerate(items)]
    hessians, scales = _validated(items, labels, distance)
    return _distances(distance, hessians, scales, hessians, scales, True, labels, labels)


def cdist(
    from_embeddings: Sequence[TaskEmbedding],
    to_embeddings: Sequence[TaskEmbedding],
    distance: Distance = "cosine",
    assume_comparable: bool = False,
) -> torch.Tensor:
    """Distances from every embedding of one collection to every embedding of another.

    Args:
        from_embeddings: ``m`` embeddings (the first argument of the distance).
        to_embeddings: ``n`` embeddings (the second argument).
        distance: one of :data:`DISTANCES`.
        assume_comparable: as :func:`pdist`.

    Returns:
        The ``(m, n)`` float64 matrix ``D[i, j] = d(from_i, to_j)``.

    Raises:
        IncompatibleEmbeddingsError: embeddings of different probes or layer layouts.
        ValueError: as :func:`pdist`.
    """
    _check_distance(distance)
    items_a = check_embeddings(from_embeddings, "from_embeddings", assume_comparable)
    items_b = check_embeddings(to_embeddings, "to_embeddings", assume_comparable)
    check_comparable(
        items_a[0],
        items_b[0],
        names=("from_embeddings[0]", "to_embeddings[0]"),
        assume_comparable=assume_comparable,
    )
    labels_a = [_label(e, "from_embeddings", i) for i, e in enumerate(items_a)]
    labels_b = [_label(e, "to_embeddings", i) for i, e in enumerate(items_b)]
    ha, sa = _validated(items_a, labels_a, distance)
    hb, sb = _validated(items_b, labels_b, distance)
    return _distances(distance, ha, sa, hb, sb, False, labels_a, labels_b)


def task_distance(
    a: TaskEmbedding,
    b: TaskEmbedding,
    distance: Distance = "cosine",
    assume_comparable: bool = False,
) -> float:
    """The distance ``d(a, b)`` between two task embeddings (SPEC section 4).

    Args:
        a: the first embedding.
        b: the second embedding (same probe and layer layout as ``a``).
        distance: one of :data:`DISTANCES`.
        assume_comparable: as :func:`pdist`.

    Returns:
        ``d(a, b)`` as a Python float.

    Raises:
        IncompatibleEmbeddingsError: ``a`` and ``b`` come from different probes or layouts.
        ValueError: as :func:`pdist`.
    """
    for argument, value in (("a", a), ("b", b)):
        if not isinstance(value, TaskEmbedding):
            raise TypeError(f"{argument} must be a TaskEmbedding, got {type(value).__name__}")
        if len(value) == 0:
            raise ValueError(f"{argument} has no entries; there is nothing to compare")
    _check_distance(distance)
    check_comparable(a, b, names=("a", "b"), assume_comparable=assume_comparable)
    labels_a, labels_b = [_label(a, "a", None)], [_label(b, "b", None)]
    ha, sa = _validated([a], labels_a, distance)
    hb, sb = _validated([b], labels_b, distance)
    return float(_distances(distance, ha, sa, hb, sb, False, labels_a, labels_b)[0, 0])
