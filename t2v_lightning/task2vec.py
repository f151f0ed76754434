"""Task2Vec: the user's entry point, from a labelled dataset to a :class:`TaskEmbedding`.

One :meth:`Task2Vec.embed` runs, in order (SPEC section 2):

1. read the labels and check them; choose ``max_samples`` examples (class-balanced draws with
   replacement, as the reference does, when ``balanced_sampling``);
2. copy the probe (the caller's object is never touched), freeze it, put it in eval mode and
   give it a fresh head with one output per class (``reset_head``);
3. run the first ``skip_layers`` top-level children once and cache their outputs;
4. fit the head on cached penultimate features (a Lightning Trainer);
5. run the Fisher pass (a Lightning Trainer with :class:`FisherCallback`) over the rest of the
   network and return the filter-wise Fisher as a :class:`TaskEmbedding`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import signal
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import t2v_lightning
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.features import (
    DatasetError,
    SelectedInputs,
    TensorInputs,
    head_inputs,
    is_mapping_input,
    run_network,
)
from t2v_lightning.fisher.callback import FisherCallback
from t2v_lightning.fisher.estimators import (
    ESTIMATORS,
    LIKELIHOODS,
    Estimator,
    FisherError,
    Likelihood,
    embedded_layers,
)
from t2v_lightning.fisher.module import (
    FisherPassCheckpoint,
    FisherPassModule,
    restore_fisher_pass,
)
from t2v_lightning.head import HeadClassifier
from t2v_lightning.input_checks import check_inputs_fit
from t2v_lightning.probe import (
    ProbeError,
    check_split,
    find_head,
    get_submodule,
    probe_fingerprint,
    probe_name,
    set_submodule,
    split_prefix,
)
from t2v_lightning.safety import check_seed, keyboard_interrupts_kept

__all__ = ["Task2Vec", "DatasetError"]

log = logging.getLogger(__name__)

Method = Literal["montecarlo", "variational"]
METHODS: tuple[str, ...] = ("montecarlo", "variational")


class _PhaseProgressBar(TQDMProgressBar):
    """Lightning's progress bar, titled with the phase it measures."""

    def __init__(self, phase: str) -> None:
        super().__init__()
        self._phase = phase

    def _description(self, trainer: pl.Trainer) -> str:
        epochs = trainer.max_epochs or 1
        suffix = f" {trainer.current_epoch + 1}/{epochs}" if epochs > 1 else ""
        return f"{self._phase}{suffix}"

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.set_description(self._phase, refresh=False)
        return bar

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # Lightning's version titles the bar "Epoch N" and draws it once before we can retitle.
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        total = self.total_train_batches
        self.train_progress_bar.reset()
        self.train_progress_bar.total = None if total == float("inf") else total
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(self._description(trainer))


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's advice that does not apply to these internal Trainers."""
    with warnings.catch_warnings():
        for pattern in (
            ".*does not have many workers.*",
            ".*configure_optimizers.*returned `None`.*",
            ".*`training_step` returns `None`.*",
            ".*The number of training batches.*is smaller than the logging interval.*",
            ".*GPU available but not used.*",
            ".*Found keys that are.*",
            ".*module\\(s\\) in eval mode at the start of training.*",
            ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ):
            warnings.filterwarnings("ignore", message=pattern)
        loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(max(logger.level, logging.WARNING))
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Task2Vec:
    """Embed labelled datasets ("tasks") with the filter-wise Fisher of a probe network.

    Args:
        probe: the probe network (e.g. from :func:`~t2v_lightning.get_probe`). It is copied; the
            object passed here is never modified.
        head: qualified name of the classifier module; ``None`` finds it (``get_classifier()``,
            then ``fc``, ``classifier``, the last ``nn.Linear``).
        method: ``"montecarlo"`` (Fisher by sampling labels from the model) or
            ``"variational"`` (the paper's method; see ``fisher/variational.py``).
        estimator: Monte Carlo estimator: ``"per_sample"`` (default), ``"exact"`` or
            ``"batch"`` (the 2019 reference's squared mini-batch gradients).
        mc_samples: labels drawn per example by the ``per_sample`` estimator.
        likelihood: ``"categorical"`` (one integer class per example) or ``"bernoulli"``
            (multi-label: each label is a float 0/1 vector of K outputs; the head has K outputs
            fitted with binary cross-entropy, and Fisher labels are drawn per output from its
            sigmoid). ``"bernoulli"`` needs ``balanced_sampling=False`` (class weights are not
            defined for label vectors) and ``method="montecarlo"``.
        variational_epochs: epochs of variance training (``method="variational"``).
        variational_lr: Adam learning rate of the per-filter log-variances and per-layer log
            prior variances (``method="variational"``).
        variational_head_lr: Adam learning rate of the head while the variances train
            (``method="variational"``).
        variational_beta: weight of the KL term (``method="variational"``). The variational
            embedding covers conv and linear layers only (no batch norm), so its ``layers``
            differ from Monte Carlo's.
        max_samples: number of examples used (``None``: as many as the dataset has).
        skip_layers: the first ``k`` top-level children of the probe run once, are cached and
            are left out of the embedding (ResNet: 6 skips conv1 … layer2).
        balanced_sampling: draw examples with weight 1/(size of their class), with replacement.
        batch_size: examples per step (head fitting, caching and the Fisher pass).
        reset_head: replace the head by a fresh linear layer with one output per class; with
            ``False`` the probe's head is kept (its outputs must cover the labels).
        head_epochs: epochs of head fitting (0 keeps the head as it is).
        head_lr: learning rate of head fitting.
        head_weight_decay: weight decay of head fitting.
        head_optimizer: ``"adam"`` or ``"sgd"``.
        seed: seed of example selection, head initialisation, shuffling and label sampling.
        accelerator: Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
        devices: Lightning devices.
        strategy: Lightning strategy (``"auto"``, ``"ddp"``, ``"ddp_spawn"``, ...).
        precision: Lightning precision (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``).
        num_nodes: Lightning nodes (machines) of a multi-node run (``torchrun`` / SLURM).
        num_workers: data-loading worker processes.
        progress_bar: show Lightning progress bars for head fitting and the Fisher pass.
        checkpoint_dir: folder of the Fisher pass's Lightning checkpoint (``None``: none). The
            checkpoint is removed when the pass completes.
        checkpoint_every_n_steps: Fisher-pass batches (per process) between two checkpoints.
        resume_from: a Fisher-pass checkpoint to resume from, or ``"last"``: the one in
            ``checkpoint_dir`` if an interrupted pass left one (else start afresh).

    Under DDP (``strategy="ddp"`` or ``"ddp_spawn"``, any ``devices`` / ``num_nodes``) the
    embedding equals the one-process result: every rank fits the same head on the cached
    features (DDP then broadcasts rank 0's network), each example id is visited by exactly one
    rank, and the Fisher sums and counts are summed across ranks.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from t2v_lightning import Task2Vec, get_probe
        >>> data = [(torch.randn(3, 32, 32), i % 2) for i in range(40)]
        >>> t2v = Task2Vec(get_probe("resnet18"), max_samples=40, head_epochs=1,
        ...                progress_bar=False)
        >>> embedding = t2v.embed(data)
        >>> list(embedding.layers)[:2]
        ['conv1', 'bn1']
    """

    def __init__(
        self,
        probe: nn.Module,
        head: str | None = None,
        method: Method = "montecarlo",
        estimator: Estimator = "per_sample",
        mc_samples: int = 1,
        likelihood: Likelihood = "categorical",
        variational_epochs: int = 2,
        variational_lr: float = 1e-2,
        variational_head_lr: float = 5e-4,
        variational_beta: float = 1e-7,
        max_samples: int | None = 10000,
        skip_layers: int = 0,
        balanced_sampling: bool = True,
        batch_size: int = 100,
        reset_head: bool = True,
        head_epochs: int = 10,
        head_lr: float = 4e-4,
        head_weight_decay: float = 1e-4,
        head_optimizer: Literal["adam", "sgd"] = "adam",
        seed: int = 0,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = 1,
        strategy: str = "auto",
        precision: str = "32-true",
        num_nodes: int = 1,
        num_workers: int = 0,
        progress_bar: bool = True,
        checkpoint_dir: str | None = None,
        checkpoint_every_n_steps: int = 50,
        resume_from: str | None = None,
    ) -> None:
        if not isinstance(probe, nn.Module):
            raise TypeError(f"probe must be a torch.nn.Module, got {type(probe).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood == "bernoulli" and balanced_sampling:
            raise ValueError(
                "balanced_sampling=True weights examples by 1/(size of their class), which is not "
                "defined for multi-label tasks (likelihood='bernoulli'); pass "
                "balanced_sampling=False"
            )
        if likelihood == "bernoulli" and method != "montecarlo":
            raise ValueError(
                f"likelihood='bernoulli' is implemented for method='montecarlo' only, got "
                f"method={method!r}"
            )
        if not _is_int(mc_samples) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if not _is_int(variational_epochs) or variational_epochs < 1:
            raise ValueError(
                f"variational_epochs must be a positive integer, got {variational_epochs!r}"
            )
        if not variational_lr > 0:
            raise ValueError(f"variational_lr must be positive, got {variational_lr!r}")
        if not variational_head_lr >= 0:
            raise ValueError(f"variational_head_lr must be >= 0, got {variational_head_lr!r}")
        if not variational_beta >= 0:
            raise ValueError(f"variational_beta must be >= 0, got {variational_beta!r}")
        if max_samples is not None and (not _is_int(max_samples) or max_samples <= 0):
            raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
        if not _is_int(skip_layers) or skip_layers < 0:
            raise ValueError(f"skip_layers must be a non-negative integer, got {skip_layers!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not _is_int(head_epochs) or head_epochs < 0:
            raise ValueError(f"head_epochs must be a non-negative integer, got {head_epochs!r}")
        if not head_lr > 0:
            raise ValueError(f"head_lr must be positive, got {head_lr!r}")
        if not head_weight_decay >= 0:
            raise ValueError(f"head_weight_decay must be >= 0, got {head_weight_decay!r}")
        if head_optimizer not in ("adam", "sgd"):
            raise ValueError(f"head_optimizer must be 'adam' or 'sgd', got {head_optimizer!r}")
        check_seed(seed)
        if not _is_int(num_workers) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if not _is_int(num_nodes) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        if not _is_int(checkpoint_every_n_steps) or checkpoint_every_n_steps < 1:
            raise ValueError(
                f"checkpoint_every_n_steps must be a positive integer, got {checkpoint_every_n_steps!r}"
            )
        if resume_from == "last" and checkpoint_dir is None:
            raise ValueError("resume_from='last' needs checkpoint_dir (where the checkpoint is)")
        self.head = find_head(probe, head)
        children = [name for name, _ in probe.named_children()]
        if skip_layers >= len(children):
            raise ProbeError(
                f"skip_layers={skip_layers} but the probe has only {len(children)} top-level "
                f"children ({children}); at least the head must remain"
            )
        skipped = children[:skip_layers]
        if any(self.head == name or self.head.startswith(name + ".") for name in skipped):
            raise ProbeError(f"skip_layers={skip_layers} would skip the head {self.head!r}")
        self.probe = probe
        self.method = method
        self.estimator = estimator
        self.mc_samples = mc_samples
        self.likelihood: Likelihood = likelihood
        self.variational_epochs = variational_epochs
        self.variational_lr = float(variational_lr)
        self.variational_head_lr = float(variational_head_lr)
        self.variational_beta = float(variational_beta)
        self.max_samples = max_samples
        self.skip_layers = skip_layers
        self.balanced_sampling = balanced_sampling
        self.batch_size = batch_size
        self.reset_head = reset_head
        self.head_epochs = head_epochs
        self.head_lr = head_lr
        self.head_weight_decay = head_weight_decay
        self.head_optimizer = head_optimizer
        self.seed = seed
        self.accelerator = accelerator
        self.devices = devices
        self.strategy = strategy
        self.precision = precision
        self.num_nodes = num_nodes
        self.num_workers = num_workers
        self.progress_bar = progress_bar
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.resume_from = resume_from
        if method == "variational":
            from t2v_lightning.fisher import variational  # noqa: F401  (fails clearly if absent)

    # ---------------------------------------------------------------------------- data
    def _read_labels(self, dataset: Dataset) -> torch.Tensor:
        size = _dataset_size(dataset)
        targets = getattr(dataset, "targets", None)
        labels: torch.Tensor | None = None
        if targets is not None:
            try:
                labels = torch.as_tensor(targets)
            except (TypeError, ValueError, RuntimeError):
                labels = None
            if labels is not None and (labels.ndim != 1 or labels.numel() != size):
                labels = None
        if labels is None:
            collected: list[torch.Tensor] = []
            loader = DataLoader(
                dataset,  # type: ignore[arg-type]
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                collate_fn=_labels_only,
            )
            for batch in loader:
                collected.append(batch)
            labels = torch.cat(collected)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DatasetError(
                f"labels must be integers (class indices), got dtype {labels.dtype} (first "
                f"label: {labels.reshape(-1)[0].item()!r})"
            )
        labels = labels.to(torch.int64)
        if labels.ndim != 1:
            raise DatasetError(f"each label must be a single integer, got shape {tuple(labels.shape[1:])}")
        if (labels < 0).any():
            first = int((labels < 0).nonzero()[0])
            raise DatasetError(
                f"labels must be non-negative class indices; example {first} has label "
                f"{int(labels[first])}"
            )
        if labels.unique().numel() < 2:
            raise DatasetError(
                f"the dataset has a single class ({int(labels[0])}); a task needs at least two"
            )
        return labels

    def _read_multilabels(self, dataset: Dataset) -> torch.Tensor:
        """The (N, K) float 0/1 targets of a multi-label dataset."""
        _dataset_size(dataset)
        loader = DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_multilabels_only,
        )
        labels = torch.cat(list(loader))
        if labels.ndim != 2 or labels.shape[1] < 1:
            raise DatasetError(
                "likelihood='bernoulli' needs each label to be a 0/1 vector of K outputs, got "
                f"labels of shape {tuple(labels.shape[1:])}"
            )
        if not bool(((labels == 0) | (labels == 1)).all()):
            row = int((~((labels == 0) | (labels == 1))).any(-1).nonzero()[0])
            raise DatasetError(
                f"multi-label targets must be 0 or 1; example {row} has {labels[row].tolist()}"
            )
        return labels

    def _select(self, labels: torch.Tensor) -> torch.Tensor:
        """Indices of the examples used, in the order they are visited (ids = positions)."""
        size = int(labels.shape[0])
        count = size if self.max_samples is None else self.max_samples
        generator = torch.Generator().manual_seed(self.seed)
        if self.balanced_sampling:
            classes = torch.unique(labels, return_inverse=True)[1]  # labels may be 0 and 2**40
            weights = 1.0 / torch.bincount(classes)[classes].to(torch.float64)
            return torch.multinomial(weights, count, replacement=True, generator=generator)
        if count >= size:
            return torch.arange(size)
        return torch.randperm(size, generator=generator)[:count].sort().values

    # ---------------------------------------------------------------------------- network
    def _working_copy(self, num_classes: int) -> nn.Module:
        network = copy.deepcopy(self.probe)
        network.eval()
        for param in network.parameters():
            param.requires_grad_(False)
        head = get_submodule(network, self.head)
        if self.reset_head:
            if not isinstance(head, nn.Linear):
                raise ProbeError(
                    f"reset_head=True needs an nn.Linear head; {self.head!r} is a "
                    f"{type(head).__name__} (pass head=<name of the linear layer>)"
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                fresh = nn.Linear(head.in_features, num_classes)
            reference = head.weight
            fresh = fresh.to(device=reference.device, dtype=reference.dtype).requires_grad_(False)
            set_submodule(network, self.head, fresh)
        else:
            outputs = getattr(head, "out_features", None)
            if self.likelihood == "bernoulli" and outputs is not None and outputs != num_classes:
                raise ProbeError(
                    f"reset_head=False keeps the head {self.head!r} with {outputs} outputs, but "
                    f"the multi-label targets have {num_classes}"
                )
            if outputs is not None and outputs < num_classes:
                raise ProbeError(
                    f"reset_head=False keeps the head {self.head!r} with {outputs} outputs, but the "
                    f"labels go up to {num_classes - 1}"
                )
            if self.head_epochs > 0 and not isinstance(head, nn.Linear):
                raise ProbeError(
                    f"head fitting needs an nn.Linear head; {self.head!r} is a "
                    f"{type(head).__name__} (use head_epochs=0)"
                )
        return network

    def _trainer(
        self, phase: str, max_epochs: int, callbacks: list[pl.Callback], local: bool = False
    ) -> pl.Trainer:
        """A Trainer with this object's settings; ``local=True``: this process's device only."""
        accelerator: str = self.accelerator
        devices: list[int] | str | int = (
            self.devices if isinstance(self.devices, (int, str)) else list(self.devices)
        )
        strategy, num_nodes, progress_bar = self.strategy, self.num_nodes, self.progress_bar
        if local:
            # Every rank runs the same computation on its own device: no process group, no
            # sharding, the one-process result on every rank.
            device = self._device()
            accelerator = device.type if device.type in ("cpu", "cuda", "mps") else accelerator
            devices = [device.index] if device.type == "cuda" and device.index is not None else 1
            strategy, num_nodes = "auto", 1
            progress_bar = progress_bar and getattr(rank_zero_only, "rank", 0) == 0
        bar: list[pl.Callback] = [_PhaseProgressBar(phase)] if progress_bar else []
        return pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            precision=self.precision,  # type: ignore[arg-type]
            max_epochs=max_epochs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
            num_sanity_val_steps=0,
            callbacks=bar + callbacks,
            log_every_n_steps=1,
        )

    # ---------------------------------------------------------------------------- embed
    def embed(self, dataset: Dataset, task_name: str | None = None) -> TaskEmbedding:
        """Embed one task.

        Args:
            dataset: a map-style dataset of ``(input, label)``. The input is a tensor, or a
                mapping of tensors (tokenised text: ``input_ids``, ``attention_mask``) that the
                probe receives as keyword arguments; the label is an int class, or a float 0/1
                vector with ``likelihood="bernoulli"``.
            task_name: recorded in the embedding's metadata.

        Returns:
            The task's :class:`TaskEmbedding`.

        Raises:
            DatasetError, ProbeError: bad data or probe (the examples and layers are named).
            FisherError: the Fisher pass met NaN / inf (examples named by dataset index).
            SIGTERMException: the process received SIGTERM (Lightning stops after the current
                batch); its exit status is 143, not 0, and nothing is returned or written.
            KeyboardInterrupt: Ctrl-C (Lightning's ``SystemExit(1)`` is turned back into it).
        """
        try:
            if self.method == "variational":
                from t2v_lightning.fisher.variational import embed_variational

                with _quiet_lightning(), keyboard_interrupts_kept():
                    return embed_variational(self, dataset, task_name)
            with _quiet_lightning(), keyboard_interrupts_kept():
                return self._embed_montecarlo(dataset, task_name)
        except SIGTERMException:
            # Lightning's SystemExit carries no code, so a killed script would exit with 0.
            raise SIGTERMException(128 + signal.SIGTERM) from None
        except FisherError as err:
            if not err.example_ids:
                raise
            indices = self._dataset_indices(dataset, err.example_ids)
            raise FisherError(
                f"{err} [dataset indices {indices[:5]}]", example_ids=err.example_ids
            ) from err

    def _dataset_indices(self, dataset: Dataset, ids: Sequence[int]) -> list[int]:
        """Dataset indices of Fisher-pass example ids (positions in the selection)."""
        labels = (
            self._read_multilabels(dataset)
            if self.likelihood == "bernoulli"
            else self._read_labels(dataset)
        )
        selection = self._select(labels)
        return [int(selection[i]) for i in ids if 0 <= i < selection.numel()]

    def prepare(
        self, dataset: Dataset, task_name: str | None = None
    ) -> tuple[nn.Module, Dataset, torch.Tensor, dict[str, Any]]:
        """Labels, selection, working network with its fitted head, and the tail's inputs.

        The shared first half of every method: returns ``(network, inputs, labels, meta)`` where
        ``network`` is the copy of the probe whose skipped prefix is replaced by identities,
        ``inputs`` a dataset of ``(tail input, position)`` over the selected examples and
        ``labels`` their (remapped) labels.
        """
        if self.likelihood == "bernoulli":
            labels = self._read_multilabels(dataset)
        else:
            labels = self._read_labels(dataset)
        selection = self._select(labels)
        if self.likelihood == "bernoulli":
            remapped, num_classes = labels, int(labels.shape[1])
        elif self.reset_head:
            classes, remapped = torch.unique(labels, return_inverse=True)
            num_classes = int(classes.numel())
        else:
            remapped = labels
            num_classes = int(labels.max()) + 1
        selected_labels = remapped[selection]
        network = self._working_copy(num_classes)
        device = self._device()
        network.to(device)
        unique, inverse = torch.unique(selection, return_inverse=True)
        check_inputs_fit(network, dataset, int(unique[0]), device)  # dtype, rank, channels
        prefix, tail, skipped = split_prefix(network, self.skip_layers)
        # Each distinct example runs through the network once (the selection may repeat some).
        distinct: Dataset = SelectedInputs(dataset, unique)
        if self.skip_layers > 0:
            sample = distinct[0][0]
            if is_mapping_input(sample):
                raise DatasetError(
                    f"skip_layers={self.skip_layers} caches the output of the first top-level "
                    "children, which take a single tensor; this dataset's inputs are mappings "
                    f"({sorted(sample)}) passed to the probe as keyword arguments. Use "
                    "skip_layers=0 (text probes leave their token embeddings out by themselves)"
                )
            rows = [distinct[i][0] for i in range(min(4, len(distinct)))]  # type: ignore[arg-type]
            first = torch.stack(rows).to(device)
            check_split(network, prefix, tail, first)
            cached = run_network(
                prefix, distinct, self.batch_size, device, self.num_workers, "prefix"
            )
            distinct = TensorInputs(cached)
            tail_inputs: Dataset = TensorInputs(cached[inverse])
        else:
            tail_inputs = SelectedInputs(dataset, selection)
        features = head_inputs(tail, self.head, distinct, self.batch_size, device, self.num_workers)
        head_accuracy = self._fit_head(tail, features[inverse], selected_labels, num_classes)
        meta = {
            "probe": probe_name(self.probe),
            "probe_class": type(self.probe).__name__,
            "probe_fingerprint": probe_fingerprint(self.probe, exclude=self.head),
            "head": self.head,
            "num_classes": num_classes,
            "skip_layers": self.skip_layers,
            "skipped": skipped,
            "max_samples": self.max_samples,
            "balanced_sampling": self.balanced_sampling,
            "likelihood": self.likelihood,
            "dataset_size": int(labels.shape[0]),
            "batch_size": self.batch_size,
            "reset_head": self.reset_head,
            "head_epochs": self.head_epochs,
            "head_optimizer": self.head_optimizer,
            "head_lr": self.head_lr,
            "head_weight_decay": self.head_weight_decay,
            "head_train_accuracy": head_accuracy,
            "versions": {
                "t2v_lightning": t2v_lightning.__version__,
                "torch": torch.__version__,
                "lightning": lightning.__version__,
            },
        }
        if task_name is not None:
            meta["task_name"] = str(task_name)
        return tail, tail_inputs, selected_labels, meta

    def _device(self) -> torch.device:
        trainer = self._trainer("setup", 1, [])
        return trainer.strategy.root_device

    def _fit_head(
        self, network: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> float | None:
        if self.head_epochs == 0:
            return None
        head = get_submodule(network, self.head)
        assert isinstance(head, nn.Linear)  # checked in _working_copy
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            module = HeadClassifier(
                head.in_features,
                head.out_features,
                optimizer=self.head_optimizer,
                lr=self.head_lr,
                weight_decay=self.head_weight_decay,
                init=head,
                likelihood=self.likelihood,
            )
        generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(
            TensorDataset(features, labels),
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
        )
        # Fitted on every rank alike (not sharded), so that the head, and so the embedding, do
        # not depend on the number of processes; the Fisher pass then broadcasts rank 0's.
        trainer = self._trainer("head fitting", self.head_epochs, [], local=True)
        trainer.fit(module, loader)
        with torch.no_grad():
            head.weight.copy_(module.head.weight.to(head.weight))
            if head.bias is not None:
                head.bias.copy_(module.head.bias.to(head.bias))
        accuracy = trainer.callback_metrics.get("head/accuracy")
        return None if accuracy is None else float(accuracy)

    def _embed_montecarlo(self, dataset: Dataset, task_name: str | None) -> TaskEmbedding:
        network, inputs, labels, meta = self.prepare(dataset, task_name)
        layers = embedded_layers(network, self.head)
        if not layers:
            raise ProbeError("nothing to embed: no layer with weights after the skipped prefix")
        meta.update(method="montecarlo", batch_size=self.batch_size)
        # Ties a Fisher-pass checkpoint to the task it was made for.
        meta["labels_fingerprint"] = hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16]
        callback = FisherCallback(
            estimator=self.estimator,
            mc_samples=self.mc_samples,
            likelihood=self.likelihood,
            seed=self.seed,
            num_examples=len(inputs),  # type: ignore[arg-type]
            head=self.head,
            network="network",
            meta=meta,
        )
        module = FisherPassModule(network, inputs, self.batch_size, self.num_workers)
        callbacks: list[pl.Callback] = [callback]
        checkpoint = self._fisher_checkpoint(task_name)
        if checkpoint is not None:
            callbacks.append(FisherPassCheckpoint(checkpoint, self.checkpoint_every_n_steps))
        resume = self._resume_path(checkpoint)
        if resume is not None:
            skip = restore_fisher_pass(resume, module, callback)
            module = FisherPassModule(network, inputs, self.batch_size, self.num_workers, skip)
            rank_zero_info(f"Resuming the Fisher pass from {resume}")
        trainer = self._trainer("Fisher pass", 1, callbacks)
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            # Spawned workers (ddp_spawn) return nothing to this process: rank 0 writes the
            # artifact to a temporary file that is read back here.
            with tempfile.TemporaryDirectory(prefix="t2v-fisher-") as folder:
                callback.output = os.path.join(folder, "embedding.safetensors")
                trainer.fit(module)
                embedding = (
                    TaskEmbedding.load(callback.output) if os.path.isfile(callback.output) else None
                )
        else:
            trainer.fit(module)
            embedding = callback.embedding
        if embedding is None:
            raise RuntimeError("the Fisher pass ended without producing an embedding")
        if checkpoint is not None and trainer.is_global_zero and os.path.isfile(checkpoint):
            os.remove(checkpoint)  # the pass is complete; nothing left to resume
        return embedding

    def _fisher_checkpoint(self, task_name: str | None) -> str | None:
        """The Fisher pass's checkpoint file for this task (``None`` without checkpoint_dir)."""
        if self.checkpoint_dir is None:
            return None
        name = "fisher-pass" if task_name is None else f"fisher-pass-{task_name}"
        return os.path.join(self.checkpoint_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".ckpt")

    def _resume_path(self, checkpoint: str | None) -> str | None:
        if self.resume_from is None:
            return None
        if self.resume_from == "last":
            if checkpoint is not None and os.path.isfile(checkpoint):
                return checkpoint
            rank_zero_info(f"No Fisher-pass checkpoint at {checkpoint}; starting afresh")
            return None
        if not os.path.isfile(self.resume_from):
            raise FileNotFoundError(f"resume_from={self.resume_from!r}: no such checkpoint file")
        return self.resume_from


def _multilabels_only(batch: list[Any]) -> torch.Tensor:
    rows: list[torch.Tensor] = []
    for item in batch:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DatasetError(
                f"dataset items must be (input, label) pairs, got {type(item).__name__}"
            )
        label = torch.as_tensor(item[1])
        if label.ndim != 1:
            raise DatasetError(
                "likelihood='bernoulli' needs each label to be a 1-D 0/1 vector (K outputs), got "
                f"shape {tuple(label.shape)}"
            )
        rows.append(label.to(torch.float32))
    if len({row.numel() for row in rows}) > 1:
        raise DatasetError("multi-label targets must all have the same number of outputs")
    return torch.stack(rows)


def _dataset_size(dataset: Dataset) -> int:
    """The length of a map-style dataset; empty or unsized datasets are refused."""
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise DatasetError("the dataset must be a map-style Dataset with a length") from err
    if size == 0:
        raise DatasetError("the dataset is empty")
    return size


def _labels_only(batch: list[Any]) -> torch.Tensor:
    labels: list[int] = []
    for item in batch:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DatasetError(
                f"dataset items must be (input, label) pairs, got {type(item).__name__}"
            )
        label = item[1]
        if isinstance(label, torch.Tensor):
            if label.numel() != 1:
                raise DatasetError(
                    f"each label must be a single integer, got a tensor of shape {tuple(label.shape)}"
                )
            if label.is_floating_point() or label.dtype == torch.bool:
                raise DatasetError(f"labels must be integers (class indices), got {label.item()!r}")
            label = int(label.item())
        elif hasattr(label, "__index__") and not isinstance(label, bool):
            label = int(label.__index__())
        else:
            raise DatasetError(f"labels must be integers (class indices), got {label!r}")
        labels.append(label)
    return torch.tensor(labels, dtype=torch.int64)

