"""The Fisher callback for projects that import ``pytorch_lightning`` instead of ``lightning``.

``pytorch_lightning`` and ``lightning.pytorch`` are separate class hierarchies at run time.
With Lightning 2.6 a ``pytorch_lightning.Trainer`` also runs the plain
:class:`t2v_lightning.FisherCallback` (it calls hooks by name), but code that checks
``isinstance(callback, pytorch_lightning.Callback)`` (other callbacks, older or later versions,
LightningCLI's ``callbacks`` type checks) does not recognise it. This :class:`FisherCallback` is
:class:`t2v_lightning.FisherCallback` (same arguments, hooks, state and artifact; checkpoints
are interchangeable, the ``state_key`` is the same) that is also a
``pytorch_lightning.Callback``: use it with ``pytorch_lightning``.

Example:
    >>> import pytorch_lightning as pl
    >>> from t2v_lightning.fisher.pl_compat import FisherCallback
    >>> trainer = pl.Trainer(callbacks=[FisherCallback(head="classifier")])
"""

from __future__ import annotations

try:
    import pytorch_lightning
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "t2v_lightning.fisher.pl_compat needs the pytorch_lightning package; with the unified "
        "`lightning` package use t2v_lightning.FisherCallback"
    ) from err

from t2v_lightning.fisher.callback import FisherCallback as _FisherCallback

__all__ = ["FisherCallback"]


# The two Callback classes annotate their hooks with their own Trainer types, which mypy sees
# as incompatible signatures; at run time both are no-op hooks with the same parameters.
class FisherCallback(_FisherCallback, pytorch_lightning.Callback):  # type: ignore[misc]
    """:class:`t2v_lightning.FisherCallback` for a ``pytorch_lightning.Trainer``.

    The Trainer only calls hooks by name and reads ``state_key`` / ``state_dict``; the two
    Callback base classes define the same hooks, all no-ops, so the behaviour is exactly that of
    :class:`t2v_lightning.FisherCallback`.
    """
