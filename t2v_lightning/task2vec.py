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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import Dataset

from t2v_lightning.choices import (
    LIKELIHOODS,
    METHODS,
    Estimator,
    FisherError,
    Likelihood,
    Method,
    check_choice,
)
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.features import DatasetError
from t2v_lightning.fisher.layers.table import check_exclude, excluded_modules
from t2v_lightning.fisher.montecarlo import MonteCarloSettings, embed_montecarlo
from t2v_lightning.fisher.variational import (
    VariationalSettings,
    check_variational_probe,
    embed_variational,
)
from t2v_lightning.lm import (
    LM_TASK2VEC_OPTIONS,
    LMSettings,
    embed_lm,
    is_language_model,
    lm_settings,
)
from t2v_lightning.prepare import PreparedTask, TaskSettings, check_probe, prepare_task
from t2v_lightning.probe import uncompiled
from t2v_lightning.safety import is_int, keyboard_interrupts_kept
from t2v_lightning.trainers import TrainerSpec, quiet_lightning

__all__ = ["Task2Vec", "DatasetError"]


@dataclass(frozen=True)
class _MethodRunner:
    """How :class:`Task2Vec` runs one method: its options, settings, Trainer and Fisher."""

    options: tuple[str, ...]
    """Its ``Task2Vec`` arguments; passing one with another method is an error that names it."""
    settings: Callable[[dict[str, Any]], MonteCarloSettings | VariationalSettings]
    """The method's settings object from the options given."""
    stage: str
    """The name of its Trainer (progress bars, messages)."""
    epochs: Callable[[Any], int]
    """Epochs of its Trainer, from its settings."""
    embed: Callable[[PreparedTask, pl.Trainer, Any], TaskEmbedding]
    """The method itself: a prepared task to its embedding."""
    check_probe: Callable[[nn.Module, str, int], None] | None = None
    """Refuses an unusable probe before any data is read."""
    likelihoods: tuple[str, ...] = LIKELIHOODS
    """The likelihoods it implements."""


_METHODS: dict[str, _MethodRunner] = {
    "montecarlo": _MethodRunner(
        options=(
            "estimator",
            "mc_samples",
            "checkpoint_dir",
            "checkpoint_every_n_steps",
            "resume_from",
        ),
        settings=lambda options: MonteCarloSettings(**options),
        stage="Fisher pass",
        epochs=lambda settings: 1,
        embed=embed_montecarlo,
    ),
    "variational": _MethodRunner(
        options=("variational_epochs", "variational_lr", "variational_head_lr", "variational_beta"),
        settings=lambda options: VariationalSettings(
            **{name.removeprefix("variational_"): value for name, value in options.items()}
        ),
        stage="variational",
        epochs=lambda settings: settings.epochs,
        embed=embed_variational,
        check_probe=check_variational_probe,
        likelihoods=("categorical",),
    ),
}
"""``method=`` value → how it runs (one per :data:`~t2v_lightning.choices.METHODS`)."""


class Task2Vec:
    """Embed labelled datasets ("tasks") with the filter-wise Fisher of a probe network.

    Args:
        probe: the probe network (e.g. from :func:`~t2v_lightning.get_probe`). It is copied; the
            object passed here is never modified. A causal language model from
            ``get_probe("lm:...")`` embeds tasks of token sequences (mappings with
            ``input_ids`` and ``attention_mask``, no label) by :func:`t2v_lightning.lm.embed_lm`,
            with SPEC section 8's defaults where an argument is left at ``None``; the arguments
            that do not apply to it are refused.
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
        balanced_sampling: draw examples with weight 1/(size of their class), with replacement
            (``None``: True; not for language models).
        batch_size: examples per step (head fitting, caching and the Fisher pass; ``None``: 100,
            8 sequences for language models).
        reset_head: (``None``: True) replace the head by a fresh linear layer with one output
            per class (language models always start from a copy of their LM head); with
            ``False`` the probe's head is kept (its outputs must cover the labels).
        head_epochs: epochs of head fitting (0 keeps the head as it is; ``None``: 10, 5 for
            language models).
        head_lr: learning rate of head fitting (``None``: 4e-4, 5e-5 for language models).
        head_weight_decay: weight decay of head fitting.
        head_optimizer: ``"adam"`` or ``"sgd"`` (``None``: adam); ``"adamw"`` (eps 1e-8), the
            only one for language models and their default.
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
        exclude: qualified module names or globs (``"encoder.layers.*.norm1"``) of layers left
            out of the embedding with their submodules, besides the head; a pattern that
            matches no module of the probe is an error. The same rule as
            ``FisherCallback(exclude=...)``.

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
        balanced_sampling: bool | None = None,
        batch_size: int | None = None,
        reset_head: bool | None = None,
        head_epochs: int | None = None,
        head_lr: float | None = None,
        head_weight_decay: float = 1e-4,
        head_optimizer: Literal["adam", "sgd", "adamw"] | None = None,
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
        exclude: Sequence[str] | None = None,
    ) -> None:
        arguments = dict(locals())  # the arguments as given, by name
        if not isinstance(probe, nn.Module):
            raise TypeError(f"probe must be a torch.nn.Module, got {type(probe).__name__}")
        runner = _METHODS[check_choice("method", method, METHODS)]
        # A language model (get_probe("lm:...")) is embedded by its own pass (SPEC section 8).
        self.lm: LMSettings | None = None
        if is_language_model(probe):
            self.lm = lm_settings(**{name: arguments[name] for name in LM_TASK2VEC_OPTIONS})
            arguments.update(estimator=None, mc_samples=None)  # read by the LM pass only
            method = "montecarlo"
            runner = _METHODS[method]
        given = {
            name: arguments[name]
            for other in _METHODS.values()
            for name in other.options
            if arguments[name] is not None
        }
        for other, other_runner in _METHODS.items():
            ignored = [name for name in other_runner.options if other != method and name in given]
            if ignored:
                raise ValueError(
                    f"{ignored[0]}={given[ignored[0]]!r} is an option of method={other!r}, which "
                    f"this Task2Vec does not run (method={method!r}); leave it out"
                )
        if likelihood not in runner.likelihoods:
            check_choice("likelihood", likelihood, LIKELIHOODS)
            methods = " or ".join(
                f"method={m!r}" for m, r in _METHODS.items() if likelihood in r.likelihoods
            )
            raise ValueError(
                f"likelihood={likelihood!r} is implemented for {methods} only, got "
                f"method={method!r}"
            )
        if not is_int(skip_layers) or skip_layers < 0:
            raise ValueError(f"skip_layers must be a non-negative integer, got {skip_layers!r}")
        self.method: Method = method
        # A torch.compile wrapper is looked through: its layers are the wrapped module's.
        self.probe = uncompiled(probe)
        self.head = check_probe(self.probe, head, skip_layers)
        patterns = check_exclude(exclude)
        try:
            excluded_modules(self.probe, patterns)
        except ValueError as err:
            raise ValueError(f"Task2Vec(exclude={list(patterns)}): {err}") from None
        # None (the default of these, whose language-model defaults differ): TaskSettings' own.
        given_task: dict[str, Any] = {
            "balanced_sampling": balanced_sampling,
            "batch_size": batch_size,
            "reset_head": reset_head,
            "head_epochs": head_epochs,
            "head_lr": head_lr,
            "head_optimizer": head_optimizer,
        }
        self.task = TaskSettings(
            head=self.head,
            likelihood=likelihood,
            max_samples=max_samples,
            skip_layers=skip_layers,
            head_weight_decay=head_weight_decay,
            seed=seed,
            num_workers=num_workers,
            exclude=patterns,
            **{name: value for name, value in given_task.items() if value is not None},
        )
        self.settings: MonteCarloSettings | VariationalSettings = runner.settings(
            {name: given[name] for name in runner.options if name in given}
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
        if self.lm is not None:
            raise ValueError(
                "prepare() reads labelled tasks; a language-model task has no label (embed() "
                "fits the head and runs the Fisher pass of t2v_lightning.lm)"
            )
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
        if self.lm is not None:
            return self._embed_lm(dataset, task_name)
        try:
            runner = _METHODS[self.method]
            if runner.check_probe is not None:
                runner.check_probe(self.probe, self.head, self.task.skip_layers)
            with quiet_lightning(), keyboard_interrupts_kept():
                # One Trainer runs the method; its device is where the preparation runs too.
                trainer = self._pass_trainer()
                prepared = self._prepare(dataset, task_name, trainer.strategy.root_device)
                try:
                    return runner.embed(prepared, trainer, self.settings)
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

    def _embed_lm(self, dataset: Dataset, task_name: str | None) -> TaskEmbedding:
        assert self.lm is not None
        with quiet_lightning():
            trainer = self._pass_trainer()  # a language model's method is "montecarlo"
        if trainer.world_size > 1:
            raise ValueError(
                "a language-model task is embedded on one device (devices=1, num_nodes=1); "
                "tasks are spread over devices by running several of them (t2v diversity)"
            )
        return embed_lm(
            self.probe,  # type: ignore[arg-type]
            dataset,
            self.lm,
            trainer.strategy.root_device,
            task_name,
        )

    def _pass_trainer(self) -> pl.Trainer:
        runner = _METHODS[self.method]
        return self.trainer_spec.build(runner.stage, runner.epochs(self.settings))

    def _prepare(
        self, dataset: Dataset, task_name: str | None, device: torch.device
    ) -> PreparedTask:
        local = self.trainer_spec.local(device)
        return prepare_task(self.probe, dataset, self.task, device, local, task_name)
