"""Where and how the library's own Lightning Trainers run: one placement, one way to build them.

:class:`TrainerSpec` holds what a user chooses about placement (accelerator, devices, strategy,
precision, nodes, progress bars) and builds every Trainer of an embedding: the Fisher pass (or
variance training) and, when the head is fitted, a Trainer on this process's device only.
:func:`quiet_lightning` silences Lightning's advice that does not apply to those internal
Trainers; :class:`PhaseProgressBar` titles the progress bar with the phase it measures, on a
terminal; elsewhere (CI, SLURM, ``| tee``), where a bar's redrawn frames pile up in the log,
:class:`PhaseProgressLog` writes one line per phase instead (and one every 30 s on a long phase);
:func:`phase_progress` picks between the two.
:meth:`TrainerSpec.from_trainer` reads the placement of a user's Trainer (``t2v embed``).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from t2v_lightning.safety import is_int

__all__ = [
    "PhaseProgressBar",
    "PhaseProgressLog",
    "TrainerSpec",
    "add_callbacks",
    "phase_progress",
    "quiet_lightning",
    "QUIET_WARNINGS",
]

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


class PhaseProgressLog(ProgressBar):
    """Progress as lines, for logs that are not a terminal: one line when a phase ends.

    ``Fisher pass: 10/10 batches in 3.2 s`` or ``head fitting: 10 epochs of 5 batches in 1.1 s
    (head/loss 0.693, head/accuracy 0.52)``; a phase still running after ``interval`` seconds
    adds ``Fisher pass: 120/500 batches, 30 s`` every ``interval`` seconds. Validation runs of
    their own (``t2v validate``) get one line too. Lines are written, on rank 0 only, to the
    stream the bars would use (standard output).

    Args:
        phase: what the lines are titled with.
        interval: seconds between the lines of a long phase.
        stream: where to write (default: ``sys.stdout`` at the time of writing).
        clock: seconds of a monotonic clock (``time.monotonic``).
    """

    def __init__(
        self,
        phase: str,
        interval: float = 30.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self._phase = phase
        self._interval = float(interval)
        self._stream = stream
        self._clock = clock
        self._enabled = True
        self._start = 0.0
        self._last = 0.0
        self._batches = 0

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    def _write(self, line: str) -> None:
        if not self._enabled:
            return
        stream = self._stream if self._stream is not None else sys.stdout
        stream.write(line + "\n")
        stream.flush()

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        shown = []
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key == "v_num":
                continue
            shown.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return f" ({', '.join(shown)})" if shown else ""

    def _begin(self) -> None:
        self._start = self._last = self._clock()
        self._batches = 0

    def _tick(self, done: int, total: int | float | None) -> None:
        now = self._clock()
        if now - self._last >= self._interval:
            self._last = now
            of = f"/{int(total)}" if total not in (None, float("inf")) else ""
            self._write(f"{self._phase}: {done}{of} batches, {now - self._start:.0f} s")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self._batches += 1
        epochs = trainer.max_epochs or 1
        total = self.total_train_batches
        if epochs > 1 and total != float("inf"):
            total = total * epochs
        self._tick(self._batches, total)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = self._clock() - self._start
        epochs = trainer.current_epoch if trainer.current_epoch else 1
        if (trainer.max_epochs or 1) > 1:
            per_epoch = self._batches // max(epochs, 1)
            done = f"{epochs} epoch{'s' if epochs != 1 else ''} of {per_epoch} batches"
        else:
            done = f"{self._batches} batches"
        self._write(f"{self._phase}: {done} in {seconds:.1f} s{self._metrics(trainer, pl_module)}")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._begin()

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        if trainer.state.fn == "validate":
            self._batches += 1
            self._tick(self._batches, self.total_val_batches)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            seconds = self._clock() - self._start
            self._write(
                f"{self._phase}: {self._batches} batches in {seconds:.1f} s"
                f"{self._metrics(trainer, pl_module)}"
            )


def _on_terminal(stream: Any = None) -> bool:
    """Whether progress bars can redraw in place: a terminal, or a Jupyter kernel's output."""
    stream = stream if stream is not None else sys.stdout
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def phase_progress(phase: str) -> ProgressBar:
    """The progress display of one phase: a titled bar on a terminal, lines elsewhere.

    On a terminal (``sys.stdout.isatty()``, or a Jupyter kernel): :class:`PhaseProgressBar`.
    Elsewhere (CI, SLURM, a pipe into ``tee``): :class:`PhaseProgressLog`, one line per phase
    and one every 30 s on a long one, instead of every redrawn frame of a bar.

    Args:
        phase: the title (``head fitting``, ``Fisher pass``, ``variational``).
    """
    return PhaseProgressBar(phase) if _on_terminal() else PhaseProgressLog(phase)


@dataclass(frozen=True)
class TrainerSpec:
    """The placement of the library's Trainers.

    Args:
        accelerator: Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
        devices: Lightning devices.
        strategy: Lightning strategy (``"auto"``, ``"ddp"``, ``"ddp_spawn"``, ...).
        precision: Lightning precision (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``).
        num_nodes: machines of a multi-node run.
        progress_bar: show each phase's progress: a titled bar on a terminal, one line per
            phase elsewhere (:func:`phase_progress`).
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
            phase: the title of the progress display.
            max_epochs: epochs of the fit.
            callbacks: callbacks, in the order Lightning calls them.
        """
        devices = self.devices if isinstance(self.devices, (int, str)) else list(self.devices)
        bar: list[pl.Callback] = [phase_progress(phase)] if self.progress_bar else []
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
