"""Keep freed memory in the process: glibc's malloc set up for passes of same-sized steps.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's default settings,
memory freed at the end of a step (the activations of a forward and backward pass) is often
handed back to the system, by trimming the top of the heap or unmapping large blocks, and the
next step faults it in again page by page, whenever a step frees more at once than glibc's trim
threshold (which glibc raises by itself, as large blocks are freed, to at most 64 MiB).

:func:`keep_freed_memory` sets glibc's mmap and trim thresholds (``mallopt``) so that freed
memory stays in the process for the next step. It changes the allocator of the whole process for
good (glibc's own adjustment of the thresholds is switched off, and up to 2 GiB of freed heap
stays with the process instead of going back to the system), so the library never calls it on
its own account: the ``t2v`` command and ``python -m t2v_lightning.demo`` call it at start-up,
in processes that are theirs. A script of your own can call it first thing to get the same.

Without it, the Fisher pass still meets glibc half way with :func:`settle_thresholds`, which
uses glibc's own documented rule (``mallopt(3)``, "dynamic mmap threshold"): freeing a block
that was mmapped raises the mmap threshold to that block's size (up to 32 MiB) and the trim
threshold to twice that. A training loop raises them so as soon as it frees a large tensor; the
Fisher pass does it once, up front, with a 31 MiB block that is never touched, so that a step
whose memory stays under 62 MiB is not trimmed and faulted in again. glibc keeps adjusting its
thresholds as before. On the batch Fisher pass of ResNet-18 (``bench/embed_cost.py``, 1,000
examples of 32 px, batch 100), whose steps also release each gradient inside backward, this
took an embed from 170-215 thousand page faults to about 10 thousand and 6-12% off its time.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

import torch

__all__ = [
    "DEFAULT_MALLOC_ENV",
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "keep_freed_memory",
    "settle_thresholds",
]

logger = logging.getLogger(__name__)

# Blocks larger than this still come from (and go back to) mmap: 1 GiB.
MMAP_THRESHOLD = 1 << 30
# Free memory at the top of the heap up to this is kept rather than returned: the largest value
# mallopt takes (2 GiB - 1).
TRIM_THRESHOLD = (1 << 31) - 1
# Set to 1 to leave the allocator as it comes (the t2v command and the demo then do nothing).
DEFAULT_MALLOC_ENV = "T2V_DEFAULT_MALLOC"

# The largest block whose release still moves glibc's dynamic thresholds is 32 MiB (its
# DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems); this one stays under it with its header.
SETTLE_BYTES = 31 << 20

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The environment variables through which a user sets glibc's malloc up themselves.
_MALLOC_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)

# Whether settle_thresholds has run in this process.
_SETTLED = False


@functools.cache
def _is_glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def settle_thresholds() -> None:
    """Raise glibc's dynamic mmap and trim thresholds as a large free would (once a process).

    Allocates and frees one untouched 31 MiB block (no memory is written, so none is faulted
    in). Does nothing off glibc, and nothing where the thresholds are already at least that.
    """
    global _SETTLED
    if _SETTLED or not _is_glibc():
        return
    _SETTLED = True
    block = torch.empty(SETTLE_BYTES, dtype=torch.uint8)
    del block


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in this process (for the whole process, for good).

    Does nothing, and returns ``False``, where the C library is not glibc, where the environment
    already sets malloc up (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
    ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_`` or a ``glibc.malloc`` entry of ``GLIBC_TUNABLES``:
    the user's choice stands), or where ``T2V_DEFAULT_MALLOC`` is set to anything but ``0``.

    Returns:
        ``True`` when both thresholds were set.
    """
    if os.environ.get(DEFAULT_MALLOC_ENV, "0").strip() not in ("", "0"):
        return False
    if any(key in os.environ for key in _MALLOC_ENV):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if applied:
        logger.debug(
            "glibc malloc keeps freed memory in this process (mmap threshold %d, trim threshold "
            "%d; %s=1 leaves it as it comes)",
            MMAP_THRESHOLD,
            TRIM_THRESHOLD,
            DEFAULT_MALLOC_ENV,
        )
    return applied
