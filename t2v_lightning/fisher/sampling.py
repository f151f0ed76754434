"""Labels drawn by example id: seeded, independent of batches, batch sizes and ranks.

Every draw is a pure function of ``(seed, example id, draw)`` through splitmix64, a 64-bit
mixing function, so an example gets the same labels whichever rank sees it, in whichever batch.
"""

from __future__ import annotations

import torch

__all__ = ["hash_seed", "inverse_cdf", "sample_labels", "sample_multilabels", "uniform_by_id"]

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
    return inverse_cdf(probs, u).clamp_(max=probs.shape[-1] - 1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``probs`` (B × C), the first class whose float64 CDF exceeds ``u`` of the total.

    Unclamped: rounding can give ``C`` for ``u`` next to 1 (callers clamp).
    """
    cdf = probs.detach().to(torch.float64).cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


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
