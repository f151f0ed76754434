"""Checks that keep hostile or careless input from running code or failing late.

* :func:`check_checkpoint_path`: every checkpoint given to ``t2v fit / validate / embed`` is a
  local file read with ``torch.load(weights_only=True)`` before Lightning sees it; URLs (which
  Lightning would load with ``weights_only=False``) are refused.
* :func:`check_seed`: seeds that torch's generators cannot take.
* :func:`interrupted`: Lightning turns Ctrl-C into ``SystemExit(1)``; this recognises it so
  that it can become a ``KeyboardInterrupt`` again.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeGuard

__all__ = [
    "check_checkpoint_path",
    "check_seed",
    "interrupted",
    "is_int",
    "keyboard_interrupts_kept",
    "trainer_options_checked",
]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Names Lightning resolves itself ("registry" downloads from Lightning's model registry).
_LIGHTNING_NAMES = ("last", "best", "hpc", "registry")
# torch.Generator.manual_seed accepts [-2**63, 2**64 - 1].
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_checkpoint_path(
    path: str | os.PathLike[str], what: str = "--ckpt_path"
) -> dict[str, Any]:
    """Read a Lightning checkpoint safely, or refuse it in one line.

    Args:
        path: a local checkpoint file.
        what: how to name the argument in messages.

    Returns:
        The checkpoint, read with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: a URL or another non-local location (``http://``, ``file://``, ``s3://``,
            Lightning's ``registry``), a file that needs unpickling Python objects ("cannot be
            read safely"), a file that is not a PyTorch file, or one that is not a Lightning
            checkpoint (a plain state dict).
        FileNotFoundError: the file does not exist.
    """
    from t2v_lightning.probe import load_tensors_safely

    text = os.fspath(path)
    if _URL.match(text):
        raise ValueError(
            f"{what} {text!r} is a URL: checkpoints are read from local files only, with "
            "torch.load(weights_only=True); download it and pass the local file"
        )
    file = Path(text)
    if not file.exists():
        if text.split(":")[0] in _LIGHTNING_NAMES:
            raise ValueError(
                f"{what} {text!r}: give the path of a checkpoint file (Lightning's 'last', "
                "'best', 'hpc' and 'registry' names are not accepted: every checkpoint is checked "
                "before it is read)"
            )
        raise FileNotFoundError(f"{what} {text!r} does not exist")
    if not file.is_file():
        raise ValueError(f"{what} {text!r} is not a regular file")
    checkpoint = load_tensors_safely(file, "checkpoint")
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        kind = "a plain state dict" if isinstance(checkpoint, Mapping) and checkpoint and all(
            isinstance(key, str) and "." in key for key in checkpoint
        ) else f"a {type(checkpoint).__name__}"
        raise ValueError(
            f"{what} {text!r} is not a Lightning checkpoint (it holds {kind}, no 'state_dict'); "
            "pass a checkpoint written by 't2v fit'"
        )
    return dict(checkpoint)


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is a Python ``int`` (``True`` and ``False`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(seed: Any, name: str = "seed") -> None:
    """Raise a ValueError naming ``name`` unless ``seed`` is an integer torch can seed with."""
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise ValueError(f"{name} must be an integer, got {seed!r}")
    seed = operator.index(seed)
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise ValueError(
            f"{name}={seed} is out of range: seeds are 64-bit integers ({low} .. {high})"
        )


def interrupted(exit_: SystemExit) -> bool:
    """Whether ``exit_`` is the ``SystemExit(1)`` Lightning raises after catching Ctrl-C."""
    return exit_.code == 1 and isinstance(exit_.__context__, KeyboardInterrupt)


@contextmanager
def keyboard_interrupts_kept() -> Iterator[None]:
    """Turn Lightning's ``SystemExit(1)`` after Ctrl-C back into ``KeyboardInterrupt``.

    Lightning catches ``KeyboardInterrupt`` during ``fit``, ignores SIGINT from then on and
    calls ``sys.exit(1)``; a caller of the library would see its program exit with status 1.
    Here the SIGINT handler is restored and ``KeyboardInterrupt`` raised instead.
    """
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as exit_:
        if not interrupted(exit_):
            raise
        raise KeyboardInterrupt from None
    finally:
        if handler is not None and signal.getsignal(signal.SIGINT) != handler:
            # (ValueError outside the main thread, where the handler cannot have changed)
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, handler)


@contextmanager
def trainer_options_checked() -> Iterator[None]:
    """Report Lightning's refusal of Trainer options (``--trainer.*``) as a ValueError.

    Lightning checks ``devices``, ``accelerator``, ``max_epochs``... when the Trainer is built
    and raises ``MisconfigurationException`` or ``TypeError``; both are the user's options, so
    they become one line naming them instead of a traceback.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except (MisconfigurationException, TypeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"invalid --trainer options: {message}") from err
