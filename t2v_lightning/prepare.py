"""The first half of every embedding: from a labelled dataset to a :class:`PreparedTask`.

:func:`prepare_task` runs, in order (SPEC section 2):

1. read the labels and check them; choose the examples (:mod:`t2v_lightning.labels`);
2. copy the probe (the caller's object is never touched), freeze it, put it in eval mode and
   give it a fresh head with one output per class (``reset_head``);
3. run the first ``skip_layers`` top-level children once over the distinct selected examples and
   cache their outputs;
4. when the head is fitted (``head_epochs > 0``): compute the penultimate features and fit the
   head on them with a Trainer on this process's device. Nothing of this runs otherwise.

The Fisher methods (:mod:`t2v_lightning.fisher.montecarlo`,
:mod:`t2v_lightning.fisher.variational`) take the result from there; :func:`artifact_meta` is
the one place where the facts recorded in an artifact are put together.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from t2v_lightning.choices import (
    LIKELIHOODS,
    Likelihood,
    check_choice,
    check_non_negative,
    check_positive,
)
from t2v_lightning.features import (
    DatasetError,
    SelectedInputs,
    TensorInputs,
    head_inputs,
    is_mapping_input,
    run_network,
)
from t2v_lightning.head import HeadClassifier
from t2v_lightning.input_checks import (
    check_input_batch_fits,
    check_inputs_fit,
    check_probe_takes,
)
from t2v_lightning.labels import read_labels, read_multilabels, select_examples
from t2v_lightning.probe import (
    ProbeError,
    check_split,
    drop_compiled,
    find_head,
    get_submodule,
    probe_fingerprint,
    probe_name,
    set_submodule,
    split_prefix,
)
from t2v_lightning.safety import check_seed, is_int
from t2v_lightning.trainers import TrainerSpec
from t2v_lightning.version import __version__

__all__ = ["PreparedTask", "TaskSettings", "artifact_meta", "check_probe", "prepare_task"]


@dataclass(frozen=True)
class TaskSettings:
    """How a task is read, sampled and given a head; shared by every Fisher method.

    Args:
        head: qualified name of the probe's classifier module (resolved by :func:`check_probe`).
        likelihood: ``"categorical"`` or ``"bernoulli"`` (multi-label 0/1 vectors).
        max_samples: number of examples used (``None``: all of them).
        skip_layers: top-level children of the probe that run once and are cached.
        balanced_sampling: draw examples with weight 1/(size of their class), with replacement.
        batch_size: examples per step.
        reset_head: replace the head by a fresh linear layer with one output per class.
        head_epochs: epochs of head fitting (0: the head is kept as it is).
        head_lr: learning rate of head fitting.
        head_weight_decay: weight decay of head fitting.
        head_optimizer: ``"adam"`` or ``"sgd"``.
        seed: seed of the selection, the fresh head, its fitting and the Fisher pass.
        num_workers: data-loading worker processes.
        exclude: qualified module names or globs left out of the embedding (with their
            submodules), besides the head.
    """

    head: str
    likelihood: Likelihood = "categorical"
    max_samples: int | None = 10000
    skip_layers: int = 0
    balanced_sampling: bool = True
    batch_size: int = 100
    reset_head: bool = True
    head_epochs: int = 10
    head_lr: float = 4e-4
    head_weight_decay: float = 1e-4
    head_optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = 0
    num_workers: int = 0
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice("likelihood", self.likelihood, LIKELIHOODS)
        if self.likelihood == "bernoulli" and self.balanced_sampling:
            raise ValueError(
                "balanced_sampling=True weights examples by 1/(size of their class), which is not "
                "defined for multi-label tasks (likelihood='bernoulli'); pass "
                "balanced_sampling=False"
            )
        if self.max_samples is not None and (not is_int(self.max_samples) or self.max_samples <= 0):
            raise ValueError(
                f"max_samples must be a positive integer or None, got {self.max_samples!r}"
            )
        if not is_int(self.skip_layers) or self.skip_layers < 0:
            raise ValueError(
                f"skip_layers must be a non-negative integer, got {self.skip_layers!r}"
            )
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not is_int(self.head_epochs) or self.head_epochs < 0:
            raise ValueError(
                f"head_epochs must be a non-negative integer, got {self.head_epochs!r}"
            )
        check_positive("head_lr", self.head_lr)
        check_non_negative("head_weight_decay", self.head_weight_decay)
        if self.head_optimizer not in ("adam", "sgd"):
            raise ValueError(f"head_optimizer must be 'adam' or 'sgd', got {self.head_optimizer!r}")
        check_seed(self.seed)
        if not is_int(self.num_workers) or self.num_workers < 0:
            raise ValueError(
                f"num_workers must be a non-negative integer, got {self.num_workers!r}"
            )


def check_probe(probe: nn.Module, head: str | None, skip_layers: int) -> str:
    """Find the head of ``probe`` and check that ``skip_layers`` leaves it (and more) in place.

    Returns:
        The qualified name of the head.

    Raises:
        ProbeError: no head, or a prefix that would take every child or the head.
    """
    name = find_head(probe, head)
    children = [child for child, _ in probe.named_children()]
    if skip_layers >= len(children):
        raise ProbeError(
            f"skip_layers={skip_layers} but the probe has only {len(children)} top-level "
            f"children ({children}); at least the head must remain"
        )
    if any(name == child or name.startswith(child + ".") for child in children[:skip_layers]):
        raise ProbeError(f"skip_layers={skip_layers} would skip the head {name!r}")
    return name


@dataclass
class PreparedTask:
    """What every Fisher method starts from.

    Attributes:
        network: the working copy of the probe (frozen, eval mode, its head fresh and fitted as
            asked) with the skipped prefix replaced by identities.
        inputs: a dataset of ``(network input, position)`` over the selected examples (the
            prefix's cached outputs when ``skip_layers > 0``).
        labels: the selected examples' labels, remapped to ``0..num_classes-1`` with a fresh
            head.
        num_classes: outputs of the head.
        selection: the dataset index of each selected example (positions are example ids).
        settings: the settings the task was prepared with.
        meta: the task's facts for the artifact (see :func:`artifact_meta`).
    """

    network: nn.Module
    inputs: Dataset
    labels: torch.Tensor
    num_classes: int
    selection: torch.Tensor
    settings: TaskSettings
    meta: dict[str, Any]

    def __iter__(self) -> Iterator[Any]:
        # ``network, inputs, labels, meta = t2v.prepare(data)`` keeps working.
        return iter((self.network, self.inputs, self.labels, self.meta))

    def dataset_indices(self, ids: Sequence[int]) -> list[int]:
        """Dataset indices of example ids (positions in the selection); others are dropped."""
        return [int(self.selection[i]) for i in ids if 0 <= i < self.selection.numel()]


def artifact_meta(task: dict[str, Any], method: str, **facts: Any) -> dict[str, Any]:
    """The facts recorded in an artifact: the task's, then the method and its own, in that order.

    Args:
        task: :attr:`PreparedTask.meta`.
        method: ``"montecarlo"`` or ``"variational"``.
        facts: the method's settings and measurements (a key of ``task`` keeps its place).
    """
    meta = dict(task)
    meta["method"] = method
    meta.update(facts)
    return meta


def _working_copy(probe: nn.Module, settings: TaskSettings, num_classes: int) -> nn.Module:
    # Compiled modules go: their copies would run the caller's own modules (see uncompiled).
    network = drop_compiled(copy.deepcopy(probe))
    network.eval()
    for param in network.parameters():
        param.requires_grad_(False)
    head = get_submodule(network, settings.head)
    if settings.reset_head:
        if not isinstance(head, nn.Linear):
            raise ProbeError(
                f"reset_head=True needs an nn.Linear head; {settings.head!r} is a "
                f"{type(head).__name__} (pass head=<name of the linear layer>)"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            fresh = nn.Linear(head.in_features, num_classes)
        reference = head.weight
        fresh = fresh.to(device=reference.device, dtype=reference.dtype).requires_grad_(False)
        set_submodule(network, settings.head, fresh)
        return network
    outputs = getattr(head, "out_features", None)
    if settings.likelihood == "bernoulli" and outputs is not None and outputs != num_classes:
        raise ProbeError(
            f"reset_head=False keeps the head {settings.head!r} with {outputs} outputs, but "
            f"the multi-label targets have {num_classes}"
        )
    if outputs is not None and outputs < num_classes:
        raise ProbeError(
            f"reset_head=False keeps the head {settings.head!r} with {outputs} outputs, but the "
            f"labels go up to {num_classes - 1}"
        )
    if settings.head_epochs > 0 and not isinstance(head, nn.Linear):
        raise ProbeError(
            f"head fitting needs an nn.Linear head; {settings.head!r} is a "
            f"{type(head).__name__} (use head_epochs=0)"
        )
    return network


def _fit_head(
    network: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    settings: TaskSettings,
    trainer_spec: TrainerSpec,
) -> float | None:
    head = get_submodule(network, settings.head)
    if not isinstance(head, nn.Linear):  # _working_copy refuses other heads when fitting
        raise ProbeError(f"head fitting needs an nn.Linear head; {settings.head!r} is not one")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        module = HeadClassifier(
            head.in_features,
            head.out_features,
            optimizer=settings.head_optimizer,
            lr=settings.head_lr,
            weight_decay=settings.head_weight_decay,
            init=head,
            likelihood=settings.likelihood,
        )
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(
        TensorDataset(features, labels),
        batch_size=settings.batch_size,
        shuffle=True,
        generator=generator,
    )
    # Fitted on every rank alike (not sharded), so that the head, and so the embedding, do not
    # depend on the number of processes; the Fisher pass then broadcasts rank 0's.
    trainer = trainer_spec.build("head fitting", settings.head_epochs)
    trainer.fit(module, loader)
    with torch.no_grad():
        head.weight.copy_(module.head.weight.to(head.weight))
        if head.bias is not None:
            head.bias.copy_(module.head.bias.to(head.bias))
    accuracy = trainer.callback_metrics.get("head/accuracy")
    return None if accuracy is None else float(accuracy)


def prepare_task(
    probe: nn.Module,
    dataset: Dataset,
    settings: TaskSettings,
    device: torch.device,
    head_trainer: TrainerSpec,
    task_name: str | None = None,
) -> PreparedTask:
    """Labels, selection, working network with its fitted head, and the network's inputs.

    Args:
        probe: the probe (copied, never modified).
        dataset: a map-style dataset of ``(input, label)``.
        settings: how the task is read, sampled and given a head.
        device: where the prefix, the features and the head run.
        head_trainer: placement of the head-fitting Trainer (this process's device only).
        task_name: recorded in the meta.

    Raises:
        DatasetError, ProbeError: bad data or probe (the examples and layers are named).
    """
    if settings.likelihood == "bernoulli":
        labels = read_multilabels(dataset, settings.batch_size, settings.num_workers)
    else:
        labels = read_labels(dataset, settings.batch_size, settings.num_workers)
    selection = select_examples(
        labels, settings.max_samples, settings.balanced_sampling, settings.seed
    )
    if settings.likelihood == "bernoulli":
        remapped, num_classes = labels, int(labels.shape[1])
    elif settings.reset_head:
        classes, remapped = torch.unique(labels, return_inverse=True)
        num_classes = int(classes.numel())
    else:
        remapped = labels
        num_classes = int(labels.max()) + 1
    selected_labels = remapped[selection]
    network = _working_copy(probe, settings, num_classes)
    network.to(device)
    unique, inverse = torch.unique(selection, return_inverse=True)
    batch = min(settings.batch_size, int(selection.numel()))  # the largest batch of the passes
    check_input_batch_fits(dataset, int(unique[0]), device, batch)  # memory, before any forward
    check_inputs_fit(network, dataset, int(unique[0]), device)  # dtype, rank, channels
    # the probe on one example (size, kind), and what one batch will need: before any pass
    check_probe_takes(network, dataset, int(unique[0]), device, batch)
    prefix, tail, skipped = split_prefix(network, settings.skip_layers)
    # Each distinct example runs through the network once (the selection may repeat some).
    distinct: Dataset = SelectedInputs(dataset, unique)
    if settings.skip_layers > 0:
        sample = distinct[0][0]
        if is_mapping_input(sample):
            raise DatasetError(
                f"skip_layers={settings.skip_layers} caches the output of the first top-level "
                "children, which take a single tensor; this dataset's inputs are mappings "
                f"({sorted(sample)}) passed to the probe as keyword arguments. Use "
                "skip_layers=0 (text probes leave their token embeddings out by themselves)"
            )
        rows = [distinct[i][0] for i in range(min(4, len(distinct)))]  # type: ignore[arg-type]
        check_split(network, prefix, tail, torch.stack(rows).to(device))
        cached = run_network(
            prefix, distinct, settings.batch_size, device, settings.num_workers, "prefix"
        )
        distinct = TensorInputs(cached)
        inputs: Dataset = TensorInputs(cached[inverse])
    else:
        inputs = SelectedInputs(dataset, selection)
    head_accuracy = None
    if settings.head_epochs > 0:
        features = head_inputs(
            tail, settings.head, distinct, settings.batch_size, device, settings.num_workers
        )
        head_accuracy = _fit_head(tail, features[inverse], selected_labels, settings, head_trainer)
    meta: dict[str, Any] = {
        "probe": probe_name(probe),
        "probe_class": type(probe).__name__,
        "probe_fingerprint": probe_fingerprint(probe, exclude=settings.head),
        "head": settings.head,
        "num_classes": num_classes,
        "skip_layers": settings.skip_layers,
        "skipped": skipped,
        "max_samples": settings.max_samples,
        "balanced_sampling": settings.balanced_sampling,
        "likelihood": settings.likelihood,
        "dataset_size": int(labels.shape[0]),
        "batch_size": settings.batch_size,
        "reset_head": settings.reset_head,
        "head_epochs": settings.head_epochs,
        "head_optimizer": settings.head_optimizer,
        "head_lr": settings.head_lr,
        "head_weight_decay": settings.head_weight_decay,
        "head_train_accuracy": head_accuracy,
        "versions": {
            "t2v_lightning": __version__,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
        },
    }
    if settings.exclude:
        meta["exclude"] = list(settings.exclude)
    if task_name is not None:
        meta["task_name"] = str(task_name)
    return PreparedTask(tail, inputs, selected_labels, num_classes, selection, settings, meta)
