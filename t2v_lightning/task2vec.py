"""Task2Vec: the user's entry point, from a labelled dataset to a :class:`TaskEmbedding`.

:class:`Task2Vec` checks its arguments into one settings object per concern and runs, for each
task, two steps:

1. :func:`~t2v_lightning.prepare.prepare_task`: labels, example selection, working copy of the
   probe with its head, prefix cache and (``head_epochs > 0``) head fitting;
2. the Fisher of the chosen method, :func:`~t2v_lightning.fisher.montecarlo.embed_montecarlo` or
   :func:`~t2v_lightning.fisher.variational.embed_variational`, in one Lightning Trainer built by
   :class:`~t2v_lightning.trainers.TrainerSpec` (whose device the preparation also uses).
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import Dataset

from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.features import DatasetError
from t2v_lightning.fisher.estimators import Estimator, FisherError, Likelihood
from t2v_lightning.fisher.montecarlo import MonteCarloSettings, embed_montecarlo
from t2v_lightning.fisher.variational import (
    VariationalSettings,
    check_variational_probe,
    embed_variational,
)
from t2v_lightning.prepare import PreparedTask, TaskSettings, check_probe, prepare_task
from t2v_lightning.safety import is_int, keyboard_interrupts_kept
from t2v_lightning.trainers import TrainerSpec, quiet_lightning

__all__ = ["Task2Vec", "DatasetError"]

Method = Literal["montecarlo", "variational"]
METHODS: tuple[str, ...] = ("montecarlo", "variational")

# The options of each method; passing one with the other method is an error that names it.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "montecarlo": (
        "estimator", "mc_samples", "checkpoint_dir", "checkpoint_every_n_steps", "resume_from"
    ),
    "variational": (
        "variational_epochs", "variational_lr", "variational_head_lr", "variational_beta"
    ),
}


class Task2Vec:
    """Embed labelled datasets ("tasks") with the filter-wise Fisher of a probe network.

    Args:
        probe: the probe network (e.g. from :func:`~t2v_lightning.get_probe`). It is copied; the
            object passed here is never modified.
        head: qualified name of the classifier module; ``None`` finds it (``get_classifier()``,
            then ``fc``, ``classifier``, the last ``nn.Linear``).
        method: ``"montecarlo"`` (Fisher by sampling labels from the model) or
            ``"variational"`` (the paper's method; see ``fisher/variational.py``).
        estimator: Monte Carlo estimator: ``"per_sample"`` (``None``: this default), ``"exact"``
            or ``"batch"`` (the 2019 reference's squared mini-batch gradients).
        mc_samples: labels drawn per example by the ``per_sample`` estimator (``None``: 1).
        likelihood: ``"categorical"`` (one integer class per example) or ``"bernoulli"``
            (multi-label: each label is a float 0/1 vector of K outputs; the head has K outputs
            fitted with binary cross-entropy, and Fisher labels are drawn per output from its
            sigmoid). ``"bernoulli"`` needs ``balanced_sampling=False`` (class weights are not
            defined for label vectors) and ``method="montecarlo"``.
        variational_epochs: epochs of variance training (``method="variational"``; ``None``: 2).
        variational_lr: Adam learning rate of the per-filter log-variances and per-layer log
            prior variances (``method="variational"``; ``None``: 1e-2).
        variational_head_lr: Adam learning rate of the head while the variances train
            (``method="variational"``; ``None``: 5e-4).
        variational_beta: weight of the KL term (``method="variational"``; ``None``: 1e-7). The
            variational embedding covers conv and linear layers only (no batch norm), so its
            ``layers`` differ from Monte Carlo's.
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
            checkpoint is removed when the pass completes (``method="montecarlo"``).
        checkpoint_every_n_steps: Fisher-pass batches (per process) between two checkpoints
            (``method="montecarlo"``; ``None``: 50).
        resume_from: a Fisher-pass checkpoint to resume from, or ``"last"``: the one in
            ``checkpoint_dir`` if an interrupted pass left one (else start afresh;
            ``method="montecarlo"``).

    The options of one method are refused with the other (``ValueError`` naming the option):
    ``estimator``, ``mc_samples``, ``checkpoint_dir``, ``checkpoint_every_n_steps`` and
    ``resume_from`` belong to ``"montecarlo"``, the ``variational_*`` options to
    ``"variational"``.

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
        estimator: Estimator | None = None,
        mc_samples: int | None = None,
        likelihood: Likelihood = "categorical",
        variational_epochs: int | None = None,
        variational_lr: float | None = None,
        variational_head_lr: float | None = None,
        variational_beta: float | None = None,
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
        checkpoint_every_n_steps: int | None = None,
        resume_from: str | None = None,
    ) -> None:
        if not isinstance(probe, nn.Module):
            raise TypeError(f"probe must be a torch.nn.Module, got {type(probe).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        chosen: dict[str, Any] = {
            "estimator": estimator,
            "mc_samples": mc_samples,
            "checkpoint_dir": checkpoint_dir,
            "checkpoint_every_n_steps": checkpoint_every_n_steps,
            "resume_from": resume_from,
            "variational_epochs": variational_epochs,
            "variational_lr": variational_lr,
            "variational_head_lr": variational_head_lr,
            "variational_beta": variational_beta,
        }
        given = {name: value for name, value in chosen.items() if value is not None}
        for other, names in _OPTIONS.items():
            ignored = [name for name in names if other != method and name in given]
            if ignored:
                raise ValueError(
                    f"{ignored[0]}={given[ignored[0]]!r} is an option of method={other!r}, which "
                    f"this Task2Vec does not run (method={method!r}); leave it out"
                )
        if likelihood == "bernoulli" and method != "montecarlo":
            raise ValueError(
                f"likelihood='bernoulli' is implemented for method='montecarlo' only, got "
                f"method={method!r}"
            )
        if not is_int(skip_layers) or skip_layers < 0:
            raise ValueError(f"skip_layers must be a non-negative integer, got {skip_layers!r}")
        self.method: Method = method
        self.probe = probe
        self.head = check_probe(probe, head, skip_layers)
        self.task = TaskSettings(
            head=self.head,
            likelihood=likelihood,
            max_samples=max_samples,
            skip_layers=skip_layers,
            balanced_sampling=balanced_sampling,
            batch_size=batch_size,
            reset_head=reset_head,
            head_epochs=head_epochs,
            head_lr=head_lr,
            head_weight_decay=head_weight_decay,
            head_optimizer=head_optimizer,
            seed=seed,
            num_workers=num_workers,
        )
        options = {name: given[name] for name in _OPTIONS[method] if name in given}
        self.settings: MonteCarloSettings | VariationalSettings
        if method == "montecarlo":
            self.settings = MonteCarloSettings(**options)
        else:
            self.settings = VariationalSettings(
                **{name.removeprefix("variational_"): value for name, value in options.items()}
            )
        self.trainer_spec = TrainerSpec(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            precision=precision,
            num_nodes=num_nodes,
            progress_bar=progress_bar,
        )

    def prepare(self, dataset: Dataset, task_name: str | None = None) -> PreparedTask:
        """Labels, selection, working network with its fitted head, and the network's inputs.

        The shared first half of every method (:func:`~t2v_lightning.prepare.prepare_task`), on
        the device of this object's Trainers (a Trainer is built to find it; :meth:`embed` runs
        the method in that same Trainer). The result also unpacks as ``network, inputs, labels,
        meta``.

        Args:
            dataset: the task, as for :meth:`embed`.
            task_name: the name recorded in the metadata (``None``: none).
        """
        with quiet_lightning(), keyboard_interrupts_kept():
            trainer = self._pass_trainer()
            return self._prepare(dataset, task_name, trainer.strategy.root_device)

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
            if isinstance(self.settings, VariationalSettings):
                check_variational_probe(self.probe, self.head, self.task.skip_layers)
            with quiet_lightning(), keyboard_interrupts_kept():
                # One Trainer runs the method; its device is where the preparation runs too.
                trainer = self._pass_trainer()
                prepared = self._prepare(dataset, task_name, trainer.strategy.root_device)
                try:
                    if isinstance(self.settings, VariationalSettings):
                        return embed_variational(prepared, trainer, self.settings)
                    return embed_montecarlo(prepared, trainer, self.settings)
                except FisherError as err:
                    if not err.example_ids:
                        raise
                    indices = prepared.dataset_indices(err.example_ids)
                    raise FisherError(
                        f"{err} [dataset indices {indices[:5]}]", example_ids=err.example_ids
                    ) from err
        except SIGTERMException:
            # Lightning's SystemExit carries no code, so a killed script would exit with 0.
            raise SIGTERMException(128 + signal.SIGTERM) from None

    def _pass_trainer(self) -> pl.Trainer:
        if isinstance(self.settings, VariationalSettings):
            return self.trainer_spec.build("variational", self.settings.epochs)
        return self.trainer_spec.build("Fisher pass", 1)

    def _prepare(
        self, dataset: Dataset, task_name: str | None, device: torch.device
    ) -> PreparedTask:
        local = self.trainer_spec.local(device)
        return prepare_task(self.probe, dataset, self.task, device, local, task_name)
