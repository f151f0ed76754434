"""Running the frozen part of a probe once over the data and keeping its outputs.

Two uses: the prefix of ``skip_layers`` top-level children (its outputs become the inputs of the
rest of the network), and the penultimate features on which the classifier head is fitted.
Both run with gradients off, in eval mode, in chunks, and report progress through the logger.

Inputs are tensors, or mappings of tensors (tokenised text: ``input_ids``, ``attention_mask``)
that the probe receives as keyword arguments (:func:`~t2v_lightning.probe.call_probe`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from t2v_lightning.probe import (
    ProbeError,
    call_probe,
    find_nonfinite_layer,
    get_submodule,
    nonfinite_rows,
)

__all__ = [
    "DatasetError",
    "SelectedInputs",
    "check_finite",
    "check_same_shape",
    "TensorInputs",
    "run_network",
    "head_inputs",
    "is_mapping_input",
]

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be embedded (empty, bad labels, non-tensor or non-finite inputs)."""


Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def _as_tensor(value: object, index: int) -> Inputs:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping) and value:
        for key, entry in value.items():
            if not isinstance(entry, torch.Tensor):
                raise DatasetError(
                    f"example {index} of the dataset has a mapping input whose entry {key!r} is "
                    f"a {type(entry).__name__}; every entry must be a tensor"
                )
        return value
    raise DatasetError(
        f"example {index} of the dataset has an input of type {type(value).__name__}; inputs "
        "must be tensors (add a transform such as torchvision.transforms.ToTensor()) or "
        "mappings of tensors passed to the probe as keyword arguments"
    )


def is_mapping_input(value: Any) -> bool:
    """Whether an input (or a batch of inputs) is a mapping of tensors."""
    return isinstance(value, Mapping)


def _to_device(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, Mapping):
        return {key: value.to(device) for key, value in inputs.items()}
    return inputs.to(device)


class SelectedInputs(Dataset):
    """The inputs of ``dataset`` at ``indices`` (labels dropped), with their position as id."""

    def __init__(self, dataset: Dataset, indices: Sequence[int] | torch.Tensor) -> None:
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self._first: tuple[int, tuple[int, ...], torch.dtype] | None = None  # shape of the first

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, position: int) -> tuple[Inputs, int]:
        index = int(self.indices[position])
        item = self.dataset[index]
        value = item[0] if isinstance(item, (tuple, list)) else item
        inputs = _as_tensor(value, index)
        if isinstance(inputs, torch.Tensor):  # a stack of mixed shapes would name no example
            self._first = check_same_shape(inputs, index, self._first)
        return inputs, position


class TensorInputs(Dataset):
    """Rows of a tensor, with their position as id."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        return self.inputs[position], position


def _examples(data: Dataset, positions: torch.Tensor) -> str:
    """Name examples by their index in the user's dataset where ``data`` knows it."""
    if isinstance(data, SelectedInputs):
        return f"dataset indices {data.indices[positions.cpu()][:5].tolist()}"
    return f"selected examples {positions[:5].tolist()}"


def check_finite(
    inputs: Inputs, positions: torch.Tensor, what: str, data: Dataset | None = None
) -> None:
    """Raise :class:`DatasetError` naming the examples of a batch whose inputs hold NaN / inf.

    Args:
        inputs: a batch of inputs (a tensor or a mapping of tensors).
        positions: the position of each row in ``data``.
        what: how to name the inputs in the message.
        data: the dataset the positions index (names dataset indices where it knows them).
    """
    if isinstance(inputs, Mapping):
        for key, value in inputs.items():
            check_finite(value, positions, f"{what} {key!r}", data)
        return
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        bad = positions[nonfinite_rows(inputs).to(positions.device)]
        where = (
            _examples(data, bad) if data is not None else f"selected examples {bad[:5].tolist()}"
        )
        raise DatasetError(f"{what} contains NaN or infinite values (at {where})")


@torch.no_grad()
def run_network(
    network: nn.Module,
    data: Dataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    description: str = "caching",
    check_inputs: bool = True,
) -> torch.Tensor:
    """Outputs of ``network`` on every item of ``data`` (``(input, id)`` pairs), stacked on CPU.

    Raises:
        DatasetError: an input is not a tensor or holds NaN / inf (its position is named).
        ProbeError: the network's output holds NaN / inf on finite inputs (the examples and the
            first layer whose output is not finite are named).
    """
    network.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    outputs: list[torch.Tensor] = []
    total = len(loader)
    step = max(1, math.ceil(total / 10))
    for number, (inputs, positions) in enumerate(loader, start=1):
        if check_inputs:
            check_finite(inputs, positions, "the dataset's input", data)
        output = call_probe(network, _to_device(inputs, device)).float().cpu()
        if not bool(torch.isfinite(output).all()):
            rows = nonfinite_rows(output)
            layer = find_nonfinite_layer(network, _to_device(_rows_of(inputs, rows[:1]), device))
            raise ProbeError(
                f"{description}: the probe's output holds NaN or inf for "
                f"{_examples(data, positions[rows])} although the inputs are finite; first "
                f"non-finite layer: {layer or 'unknown'}. Check the probe's weights (and, under "
                "float16, overflow)"
            )
        outputs.append(output)
        if number % step == 0 or number == total:
            log.info("%s: %d/%d batches", description, number, total)
    return torch.cat(outputs)


def _rows_of(inputs: Inputs, rows: torch.Tensor) -> Inputs:
    if isinstance(inputs, Mapping):
        return {key: value[rows] for key, value in inputs.items()}
    return inputs[rows]


@torch.no_grad()
def head_inputs(
    network: nn.Module,
    head: str,
    data: Dataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    check_inputs: bool = True,
) -> torch.Tensor:
    """The inputs of the module ``head`` (penultimate features) on every item of ``data``."""
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach().float().cpu())

    handle = get_submodule(network, head).register_forward_pre_hook(grab)
    try:
        run_network(
            network, data, batch_size, device, num_workers, "penultimate features", check_inputs
        )
    finally:
        handle.remove()
    features = torch.cat(captured)
    if features.ndim != 2:
        raise ProbeError(
            f"the head {head!r} receives inputs of shape {tuple(features.shape[1:])} per example; "
            "a classifier head on flat features is needed (pass head=<name> of the linear layer)"
        )
    return features


def check_same_shape(
    value: torch.Tensor, index: int, first: tuple[int, tuple[int, ...], torch.dtype] | None
) -> tuple[int, tuple[int, ...], torch.dtype]:
    """Raise :class:`DatasetError` unless ``value`` has the shape and dtype of the first input.

    Args:
        value: the input of dataset index ``index``.
        index: its index in the user's dataset.
        first: ``(index, shape, dtype)`` of the first input seen, or None (``value`` is it).

    Returns:
        ``first``, or the description of ``value`` when it is the first.
    """
    if first is None:
        return index, tuple(value.shape), value.dtype
    first_index, shape, dtype = first
    if tuple(value.shape) != shape or value.dtype != dtype:
        raise DatasetError(
            f"dataset index {index}: the input has shape {tuple(value.shape)} and dtype "
            f"{value.dtype}, but dataset index {first_index} has shape {shape} and dtype {dtype}; "
            "every input must have the same shape (resize the images to one size)"
        )
    return first
