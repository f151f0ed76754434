"""Checking a dataset's inputs against the probe before any work is done.

A probe's first layer fixes what each example must look like: a ``Conv2d`` with 3 input
channels takes float tensors of shape ``(3, H, W)``, a ``Linear`` with 64 inputs takes
``(64,)``. Inputs of another dtype (``uint8`` images), rank (2-D images) or channel count would
otherwise fail deep inside torch with a message that names neither the example nor the shape
that was expected. :func:`check_inputs_fit` names both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from t2v_lightning.features import DatasetError, check_same_shape
from t2v_lightning.probe import call_probe

__all__ = ["check_inputs_fit", "check_same_shape", "expected_example_shape"]

_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_SPATIAL = {1: "L", 2: "H, W", 3: "D, H, W"}
_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *_CONVS)


def expected_example_shape(layer: nn.Module) -> tuple[int, str] | None:
    """``(number of dimensions, shape in words)`` of one example for ``layer``, if it says."""
    for kind, spatial in _CONVS.items():
        if isinstance(layer, kind):
            channels = int(getattr(layer, "in_channels", 0))
            return spatial + 1, f"({channels}, {_SPATIAL[spatial]})"
    if isinstance(layer, nn.Linear):
        return 1, f"({layer.in_features},)"
    return None


def _first_layer(network: nn.Module, inputs: torch.Tensor) -> tuple[str, nn.Module, bool]:
    """The first convolution or linear layer ``network`` applies to ``inputs`` (one batch).

    Returns ``(name, layer, direct)``: ``direct`` says whether the layer received ``inputs`` as
    they are (not reshaped by earlier modules). The layer is found even when the forward pass
    fails (its pre-hook runs before it does); that failure is not reported here: mismatches
    are named by the caller, anything else surfaces unchanged when the network runs for real.
    """
    found: list[tuple[str, nn.Module, bool]] = []
    handles = []
    for name, candidate in network.named_modules():
        if isinstance(candidate, _LAYERS):
            def hook(layer: nn.Module, args: Any, name: str = name) -> None:
                if not found:
                    first = args[0] if args else None
                    direct = isinstance(first, torch.Tensor) and first.shape == inputs.shape
                    found.append((name, layer, direct))

            handles.append(candidate.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), contextlib.suppress(Exception):  # see the docstring
            call_probe(network, inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        return "", nn.Identity(), False
    return found[0]


def check_inputs_fit(
    network: nn.Module, dataset: Dataset, index: int, device: torch.device
) -> None:
    """Raise :class:`DatasetError` unless example ``index`` of ``dataset`` fits ``network``.

    When the first convolution or linear layer the network applies receives the example as it
    is, the example must be a floating-point tensor of the shape that layer takes (``(C, H, W)``
    with the right ``C`` for a ``Conv2d``); the network is run on it once to find that layer
    (eval mode, no gradients). Mapping inputs (tokenised text) are not checked here.

    Raises:
        DatasetError: naming the dataset index, the input's shape and dtype, and the expected
            example shape.
    """
    item = dataset[index]  # type: ignore[index]
    value = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(value, torch.Tensor) or isinstance(value, Mapping):
        return
    where = f"dataset index {index}: the input (shape {tuple(value.shape)}, dtype {value.dtype})"
    was_training = network.training
    network.eval()
    try:
        name, layer, direct = _first_layer(network, value.unsqueeze(0).to(device))
    finally:
        network.train(was_training)
    expected = expected_example_shape(layer)
    # Integer inputs are fine for a probe that starts with a lookup table (token ids); a
    # convolution or linear layer that receives them as they are needs floats.
    if not value.is_floating_point() and expected is not None and direct:
        shape = f" of shape {expected[1]}"
        raise DatasetError(
            f"{where} is not a float tensor; the probe takes float inputs{shape} (convert uint8 "
            "images with torchvision.transforms.ToTensor(), or .float() / 255, and normalise "
            "them)"
        )
    if expected is not None and direct:  # the layer sees the example as the dataset gives it
        ndim, shape = expected
        if isinstance(layer, nn.Linear):
            wrong = value.ndim < 1 or value.shape[-1] != layer.in_features
        else:
            wrong = value.ndim != ndim or value.shape[0] != getattr(layer, "in_channels", 0)
        if wrong:
            raise DatasetError(
                f"{where} does not fit the probe: its first layer {name!r} "
                f"({type(layer).__name__}) takes examples of shape {shape}"
            )
