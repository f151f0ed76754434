"""Checking a dataset's inputs against the probe before any work is done.

A probe's first layer fixes what each example must look like: a ``Conv2d`` with 3 input
channels takes float tensors of shape ``(3, H, W)``, a ``Linear`` with 64 inputs takes
``(64,)``. Inputs of another dtype (``uint8`` images), rank (2-D images) or channel count would
otherwise fail deep inside torch with a message that names neither the example nor the shape
that was expected. :func:`check_inputs_fit` names both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from t2v_lightning.features import DatasetError, check_same_shape
from t2v_lightning.probe import call_probe

__all__ = [
    "check_input_batch_fits",
    "check_inputs_fit",
    "check_probe_takes",
    "check_same_shape",
    "expected_example_shape",
]

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


def _available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None where it cannot be asked)."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError):
            return None
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    return 0


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def _example(dataset: Dataset, index: int) -> tuple[Any, str]:
    item = dataset[index]  # type: ignore[index]
    value = item[0] if isinstance(item, (tuple, list)) else item
    described = (
        f"shape {tuple(value.shape)}, dtype {value.dtype}"
        if isinstance(value, torch.Tensor)
        else type(value).__name__
    )
    return value, f"dataset index {index} (the input: {described})"


def check_input_batch_fits(
    dataset: Dataset, index: int, device: torch.device, batch_size: int
) -> None:
    """Refuse a batch whose inputs alone (``batch_size`` copies of example ``index``) cannot fit.

    Nothing is run: this comes before the probe sees any example (an input size of 4096 pixels
    makes one default batch of 100 RGB images 20 GB).

    Raises:
        DatasetError: naming the example, the batch's size in GiB and the memory available.
    """
    value, where = _example(dataset, index)
    available = _available_memory(device)
    needed = _bytes(value) * batch_size
    if available is not None and needed > available:
        raise DatasetError(
            f"one batch of {batch_size} inputs like {where} takes {_gib(needed)}, more than the "
            f"{_gib(available)} available on {device}; use a smaller batch_size or input_size (--data.batch_size, --data.input_size)"
        )


def check_probe_takes(
    network: nn.Module, dataset: Dataset, index: int, device: torch.device, batch_size: int
) -> None:
    """Run the probe once on example ``index`` and estimate what one batch will need.

    Before any pass over the data: a probe that cannot take the dataset's inputs (a ViT or
    Inception made for 224 or 299 pixels given 32, AlexNet's pooling shrunk to nothing, a text
    probe given images, float64 images for float32 weights) fails here, on one example, with a
    message naming the example and the probe's own words; and a batch whose activations will not
    fit in memory (measured on this example: the input and every layer's output, times the batch
    size) is refused before it is allocated.

    Raises:
        DatasetError: the probe fails on the example, or one batch would need more memory than
            the device has available.
    """
    value, where = _example(dataset, index)
    if not isinstance(value, (torch.Tensor, Mapping)):
        return  # not an input a probe takes: named by the checks of the passes
    available = _available_memory(device)
    example_bytes = _bytes(value)
    check_input_batch_fits(dataset, index, device, batch_size)
    parameter = next((p for p in network.parameters() if p.is_floating_point()), None)
    if (
        isinstance(value, torch.Tensor)
        and value.dtype == torch.float64
        and parameter is not None
        and parameter.dtype != torch.float64
    ):
        raise DatasetError(
            f"{where} is float64 but the probe's weights are {parameter.dtype}; convert the "
            "inputs with .float() (e.g. in the dataset's transform)"
        )
    outputs = [0]

    def measure(module: nn.Module, args: Any, output: Any) -> None:
        outputs[0] += _bytes(output)

    leaves = [m for m in network.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(measure) for m in leaves]
    was_training = network.training
    network.eval()
    batch: Any = (
        {
            k: v.unsqueeze(0).to(device) if isinstance(v, torch.Tensor) else v
            for k, v in value.items()
        }
        if isinstance(value, Mapping)
        else value.unsqueeze(0).to(device)
        if isinstance(value, torch.Tensor)
        else value
    )
    try:
        with torch.no_grad():
            call_probe(network, batch)
    except (RuntimeError, AssertionError, TypeError, ValueError, IndexError, KeyError) as err:
        words = " ".join(str(err).split()) or type(err).__name__
        raise DatasetError(
            f"the probe ({type(network).__name__}) cannot take {where}: {words[:300]}. Give it "
            "inputs of the kind and size it was made for (an image probe: images of its input "
            "size, e.g. --data.input_size 224 / input_size=224; a text probe: tokenised text)"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
        network.train(was_training)
    # What a training step keeps for its backward pass: the input and every layer's output.
    # Measured against the passes (EfficientNet-Lite0 at 224 px, batch 50: 4.7 GiB estimated,
    # 4.7-5.2 GiB at peak), in-place activations counted twice cover the gradients.
    needed = batch_size * (example_bytes + outputs[0])
    if available is not None and needed > available:
        raise DatasetError(
            f"one batch of {batch_size} examples like {where} needs about {_gib(needed)} "
            f"(measured on this example: {_gib(example_bytes + outputs[0])} of inputs and layer "
            f"outputs, kept for the backward pass), more than the {_gib(available)} available "
            f"on {device}; use a smaller batch_size or input_size (--data.batch_size, "
            "--data.input_size)"
        )
