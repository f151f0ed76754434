"""Where and how the library's own Lightning Trainers run: one placement, one way to build them.

:class:`TrainerSpec` holds what a user chooses about placement (accelerator, devices, strategy,
precision, nodes, progress bars) and builds every Trainer of an embedding: the Fisher pass (or
variance training) and, when the head is fitted, a Trainer on this process's device only.
:func:`quiet_lightning` silences Lightning's advice that does not apply to those internal
Trainers; :class:`PhaseProgressBar` titles the progress bar with the phase it measures.
:meth:`TrainerSpec.from_trainer` reads the placement of a user's Trainer (``t2v embed``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from t2v_lightning.safety import is_int

__all__ = ["PhaseProgressBar", "TrainerSpec", "add_callbacks", "quiet_lightning", "QUIET_WARNINGS"]

QUIET_WARNINGS: tuple[str, ...] = (
    ".*does not have many workers.*",
    ".*configure_optimizers.*returned `None`.*",
    ".*`training_step` returns `None`.*",
    ".*The number of training batches.*is smaller than the logging interval.*",
    ".*GPU available but not used.*",
    ".*Found keys that are.*",
    ".*module\\(s\\) in eval mode at the start of training.*",
    ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
)
"""Messages of Lightning's warnings that do not apply to the library's internal Trainers."""


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's advice that does not apply to the library's internal Trainers.

    Filters the warnings of :data:`QUIET_WARNINGS` and raises Lightning's loggers to WARNING
    within the context; both are restored on exit.
    """
    with warnings.catch_warnings():
        for pattern in QUIET_WARNINGS:
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


class PhaseProgressBar(TQDMProgressBar):
    """Lightning's progress bar, titled with the phase it measures (``head fitting 3/10``).

    Args:
        phase: the title of the training bar; ``k/N`` is appended when there are several epochs.
    """

    def __init__(self, phase: str) -> None:
        super().__init__()
        self._phase = phase

    def _description(self, trainer: pl.Trainer) -> str:
        epochs = trainer.max_epochs or 1
        suffix = f" {trainer.current_epoch + 1}/{epochs}" if epochs > 1 else ""
        return f"{self._phase}{suffix}"

    @override
    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.set_description(self._phase, refresh=False)
        return bar

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # Lightning's version titles the bar "Epoch N" and draws it once before we can retitle.
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        total = self.total_train_batches
        self.train_progress_bar.reset()
        self.train_progress_bar.total = None if total == float("inf") else total
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(self._description(trainer))


@dataclass(frozen=True)
class TrainerSpec:
    """The placement of the library's Trainers.

    Args:
        accelerator: Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
        devices: Lightning devices.
        strategy: Lightning strategy (``"auto"``, ``"ddp"``, ``"ddp_spawn"``, ...).
        precision: Lightning precision (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``).
        num_nodes: machines of a multi-node run.
        progress_bar: show a progress bar titled with each phase.
    """

    accelerator: str = "auto"
    devices: int | str | Sequence[int] = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if not is_int(self.num_nodes) or self.num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive integer, got {self.num_nodes!r}")

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer) -> TrainerSpec:
        """The placement of a user's Trainer (accelerator, devices, strategy, precision, ...)."""
        from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator

        accelerator = trainer.accelerator
        if isinstance(accelerator, CUDAAccelerator):
            name = "cuda"
        elif isinstance(accelerator, MPSAccelerator):
            name = "mps"
        elif isinstance(accelerator, CPUAccelerator):
            name = "cpu"
        else:
            name = "auto"
        devices: int | list[int] = trainer.num_devices
        if name in ("cuda", "mps"):
            devices = list(trainer.device_ids)
        return cls(
            accelerator=name,
            devices=devices,
            strategy="ddp" if trainer.world_size > 1 else "auto",
            precision=str(trainer.precision),
            num_nodes=trainer.num_nodes,
            progress_bar=trainer.progress_bar_callback is not None,
        )

    def local(self, device: torch.device) -> TrainerSpec:
        """This process's ``device`` only: no process group, the one-process result on every rank.

        Progress bars stay on rank 0 only.
        """
        accelerator = device.type if device.type in ("cpu", "cuda", "mps") else self.accelerator
        devices = [device.index] if device.type == "cuda" and device.index is not None else 1
        return TrainerSpec(
            accelerator=accelerator,
            devices=devices,
            strategy="auto",
            precision=self.precision,
            num_nodes=1,
            progress_bar=self.progress_bar and getattr(rank_zero_only, "rank", 0) == 0,
        )

    def build(
        self, phase: str, max_epochs: int, callbacks: Sequence[pl.Callback] = ()
    ) -> pl.Trainer:
        """A Trainer with this placement, no logger, no checkpointing, no model summary.

        Args:
            phase: the title of the progress bar.
            max_epochs: epochs of the fit.
            callbacks: callbacks, in the order Lightning calls them.
        """
        devices = self.devices if isinstance(self.devices, (int, str)) else list(self.devices)
        bar: list[pl.Callback] = [PhaseProgressBar(phase)] if self.progress_bar else []
        return pl.Trainer(
            accelerator=self.accelerator,
            devices=devices,
            strategy=self.strategy,
            num_nodes=self.num_nodes,
            precision=self.precision,  # type: ignore[arg-type]
            max_epochs=max_epochs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=self.progress_bar,
            num_sanity_val_steps=0,
            callbacks=[*bar, *callbacks],
            log_every_n_steps=1,
        )


def add_callbacks(trainer: pl.Trainer, *callbacks: pl.Callback) -> None:
    """Append callbacks to a Trainer built before they could be (they are called in this order).

    The Fisher pass's callbacks need the prepared task, and the preparation runs on the device
    of that very Trainer; Lightning keeps its callbacks in the list ``trainer.callbacks``, which
    it extends itself the same way.
    """
    registered: list[pl.Callback] = trainer.callbacks  # type: ignore[attr-defined]
    registered.extend(callbacks)
