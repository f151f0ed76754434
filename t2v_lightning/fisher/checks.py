"""What :class:`~t2v_lightning.fisher.callback.FisherCallback` refuses, with the message it gives.

Its arguments (at construction), the layers it embeds (a head or ``exclude`` pattern that names
nothing, an unsupported layer, nothing left to embed) and a checkpoint made with other settings
or for another task (when a run resumes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from t2v_lightning.choices import (
    ESTIMATORS,
    LIKELIHOODS,
    UnsupportedLayerError,
    check_choice,
    check_positive,
)
from t2v_lightning.fisher.layers.table import embedded_layers
from t2v_lightning.safety import is_int

__all__ = [
    "AT_CHOICES",
    "WEIGHTS_CHOICES",
    "check_arguments",
    "check_resume",
    "network_of",
    "pick_layers",
]

AT_CHOICES: tuple[str, ...] = ("fit_end", "train_batch")
WEIGHTS_CHOICES: tuple[str, ...] = ("last", "best")


def check_arguments(
    *,
    estimator: str,
    mc_samples: int,
    seed: int,
    num_examples: int | None,
    head: str | None,
    network: str | None,
    overwrite: bool,
    grad_scale: float | None,
    at: str,
    batch_size: int | None,
    logits_fn: object,
    likelihood: str,
    weights: str,
    **checked_elsewhere: Any,
) -> None:
    """Refuse a bad argument of ``FisherCallback`` (``ValueError`` / ``TypeError`` naming it);
    ``exclude`` and the artifact's arguments are checked where they are used."""
    check_choice("likelihood", likelihood, LIKELIHOODS)
    check_choice("estimator", estimator, ESTIMATORS)
    _check_count("mc_samples", mc_samples)
    _check_count("num_examples", num_examples, optional=True)
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if grad_scale is not None:
        check_positive("grad_scale", grad_scale)
    check_choice("at", at, AT_CHOICES)
    check_choice("weights", weights, WEIGHTS_CHOICES)
    if at == "train_batch" and num_examples is None:
        raise ValueError(
            "at='train_batch' needs num_examples (the number of distinct example ids its "
            "(inputs, ids) batches carry); to embed your own project's trained model leave "
            "at='fit_end'"
        )
    _check_count("batch_size", batch_size, optional=True)
    if logits_fn is not None and not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}")
    if head is not None and (not isinstance(head, str) or not head):
        raise ValueError(f"head must be a qualified module name, got {head!r}")
    if network is not None and (not isinstance(network, str) or not network):
        raise ValueError(f"network must be a submodule path, got {network!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")


def _check_count(name: str, value: object, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def network_of(pl_module: nn.Module, path: str | None) -> nn.Module:
    """The embedded network: ``pl_module``'s submodule at ``path`` (``None``: itself)."""
    if path is None:
        return pl_module
    try:
        return pl_module.get_submodule(path)
    except AttributeError as err:
        raise ValueError(
            f"FisherCallback(network={path!r}): the LightningModule has no such submodule"
        ) from err


def pick_layers(
    network: nn.Module, head: str | None, exclude: Sequence[str]
) -> list[tuple[str, nn.Module]]:
    """The embedded layers: every layer with weights but the head and ``exclude``."""
    if head is not None:
        try:
            network.get_submodule(head)
        except AttributeError as err:
            names = [name for name, _ in network.named_modules() if name][:20]
            raise ValueError(
                f"FisherCallback(head={head!r}): the network has no such module; some "
                f"of its modules: {names}"
            ) from err
    try:
        layers = embedded_layers(network, head, exclude)
    except UnsupportedLayerError as err:
        raise UnsupportedLayerError(
            f"FisherCallback: {err}; leave it out with FisherCallback(exclude=[{err.layer!r}])",
            layer=err.layer,
        ) from None
    except ValueError as err:  # an exclude pattern that matches nothing
        raise ValueError(f"FisherCallback(exclude={list(exclude)}): {err}") from None
    if not layers:
        raise ValueError(
            "FisherCallback: the network has no layer with weights to embed (after head= and "
            "exclude=)"
        )
    return layers


def check_resume(
    state_dict: Mapping[str, Any], settings: Mapping[str, Any], identity: Mapping[str, Any]
) -> None:
    """Refuse a checkpoint's Fisher state made with other ``settings`` or another ``identity``.

    Args:
        state_dict: the checkpoint's state of the callback.
        settings: this callback's ``likelihood``, ``estimator``, ``seed`` and ``mc_samples``.
        identity: the facts the checkpoint and this run must share.
    """
    if state_dict.get("likelihood", "categorical") != settings["likelihood"]:
        raise ValueError(
            "cannot resume: the checkpoint's Fisher state has "
            f"likelihood={state_dict.get('likelihood', 'categorical')!r} but this "
            f"FisherCallback has {settings['likelihood']!r}"
        )
    for key in ("estimator", "seed", "mc_samples"):
        if state_dict.get(key) != settings[key]:
            raise ValueError(
                f"cannot resume: the checkpoint's Fisher state has {key}={state_dict.get(key)!r}"
                f" but this FisherCallback has {settings[key]!r}"
            )
    # Checkpoints of earlier versions keep the identity under "meta".
    stored = state_dict.get("identity", state_dict.get("meta")) or {}
    for key, value in identity.items():
        if key in stored and stored[key] != value:
            raise ValueError(
                f"cannot resume: the checkpoint was made for {key}={stored[key]!r}, this "
                f"run has {key}={value!r} (another task, probe or setting)"
            )
