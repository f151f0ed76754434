"""The diversity coefficient of a text corpus with a language-model probe (SPEC section 8).

:func:`corpus_diversity` (and ``t2v diversity``) reads one shuffled pass of a corpus, cuts it into
``num_tasks`` tasks of ``task_size`` sequences (:mod:`t2v_lightning.data.corpus`), embeds each
task with :class:`~t2v_lightning.Task2Vec` and a ``lm:`` probe, writes one artifact per task, and
summarises the pairwise cosine distances as a
:class:`~t2v_lightning.similarity.diversity.DiversityCoefficient` (the paper's t interval over
pairs and a bootstrap interval over tasks).

* **Resumable.** Task ``k`` is ``OUTPUT/task_{k:04d}.safetensors``. A rerun reads the pass again
  and skips each task whose artifact loads and was made from the same tokens with the same
  settings (a damaged one is embedded again; one made with other settings is an error).
* **Many processes.** Tasks are independent: under Lightning DDP (``devices=N``,
  ``strategy="ddp"``, multi-node as usual) rank ``r`` of ``W`` embeds tasks ``r, r + W, …`` on its
  own device, one process per task (:func:`~t2v_lightning.lm.embed_lm`, what
  ``Task2Vec(probe).embed(task)`` runs), so every artifact is byte-identical whatever the
  world size. Ranks agree at the end (one collective), then every rank reads the artifacts and
  rank 0 reports.
* **Bounds and cross-diversity** (``--bounds``, ``--against``) are the same pipeline on synthetic
  token tasks (:class:`~t2v_lightning.data.corpus.SyntheticCorpus`) or on another corpus, under
  ``OUTPUT/lower_bound/``, ``OUTPUT/upper_bound/`` and ``OUTPUT/against/<name>/``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, TextIO

import torch
from torch import nn

from t2v_lightning.data.corpus import (
    CorpusSpec,
    CorpusStats,
    SyntheticCorpus,
    TokenTask,
    check_task_shape,
    corpus_label,
    pad_token_id,
    synthetic_task,
    token_tasks,
)
from t2v_lightning.embedding import EmbeddingFileError, TaskEmbedding
from t2v_lightning.safety import check_seed, is_int
from t2v_lightning.similarity.diversity import (
    DiversityCoefficient,
    cross_diversity_coefficient,
    diversity_coefficient,
)

__all__ = [
    "CorpusDiversityReport",
    "DiversitySettings",
    "Placement",
    "RankFailedError",
    "SettingsMismatchError",
    "corpus_diversity",
    "diversity_main",
    "embed_corpus_tasks",
    "probe_tokenizer",
]

Corpus = CorpusSpec | SyntheticCorpus
_RANKS_TIMEOUT = datetime.timedelta(days=7)
EmbedderFactory = Callable[[nn.Module, "DiversitySettings", torch.device], Any]


@dataclass(frozen=True)
class DiversitySettings:
    """How the tasks are cut and embedded (everything an artifact's contents depend on).

    Args:
        num_tasks: tasks per corpus (``N``).
        task_size: sequences per task (``B``).
        max_length: tokens per sequence at most (``L``).
        seed: seed of the shuffled pass, of the bounds' tokens, and of the Fisher's label
            draws.
        packing: join documents and cut ``L``-token sequences (default: one document, one
            sequence).
        estimator: the Fisher estimator: ``"per_sample"`` (per-sequence squared gradients) or
            ``"batch"`` (the published code's squared mini-batch gradients).
        head_epochs: epochs of fitting the untied copy of the LM head (SPEC section 8: 5).
        batch_size: sequences per step (8, as in the published code).
        precision: ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"`` (float16 with a loss
            scale on a GPU; ``"bf16-mixed"`` on a CPU).
    """

    num_tasks: int = 200
    task_size: int = 512
    max_length: int = 128
    seed: int = 0
    packing: bool = False
    estimator: Literal["per_sample", "batch"] = "per_sample"
    head_epochs: int = 5
    batch_size: int = 8
    precision: str = "32-true"

    def __post_init__(self) -> None:
        check_task_shape(self.num_tasks, self.task_size, self.max_length)
        check_seed(self.seed)
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"--batch_size must be a positive integer, got {self.batch_size!r}")
        if not is_int(self.head_epochs) or self.head_epochs < 0:
            raise ValueError(
                f"--head_epochs must be a non-negative integer, got {self.head_epochs!r}"
            )

    def task_identity(self) -> dict[str, Any]:
        """The settings one task's artifact depends on (``num_tasks`` is not one of them)."""
        facts = asdict(self)
        facts.pop("num_tasks")
        return facts


@dataclass(frozen=True)
class Placement:
    """Where the tasks run: Lightning's accelerator, devices, strategy and nodes.

    With more than one process (``devices`` > 1 or ``num_nodes`` > 1) the ranks share the tasks;
    each task runs in one process on that process's device.
    """

    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    num_nodes: int = 1

    def distributed(self) -> bool:
        """Whether a launcher starts several processes."""
        single = self.devices in (1, "1", [0]) or (
            isinstance(self.devices, list) and len(self.devices) == 1
        )
        return not single or self.num_nodes > 1 or self.strategy.startswith("ddp")


@dataclass
class CorpusDiversityReport:
    """Everything ``t2v diversity`` reports.

    Attributes:
        diversity: the corpus's coefficient.
        cross_diversity: the cross-diversity with each ``--against`` corpus, by name.
        lower_bound: the coefficient of the lower bound's tasks (``--bounds``).
        upper_bound: the coefficient of the upper bound's tasks.
        settings: the settings, as written to ``--json``.
        stats: what the corpus's pass read.
        files: the artifacts of the corpus's tasks, in task order.
    """

    diversity: DiversityCoefficient
    cross_diversity: dict[str, DiversityCoefficient] = field(default_factory=dict)
    lower_bound: DiversityCoefficient | None = None
    upper_bound: DiversityCoefficient | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, CorpusStats] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` layout."""
        return {
            "diversity": _summary(self.diversity),
            "cross_diversity": {n: _summary(c) for n, c in self.cross_diversity.items()},
            "lower_bound": None if self.lower_bound is None else _summary(self.lower_bound),
            "upper_bound": None if self.upper_bound is None else _summary(self.upper_bound),
            "settings": self.settings,
            "corpus_stats": {name: asdict(s) for name, s in self.stats.items()},
        }


def _summary(coefficient: DiversityCoefficient) -> dict[str, Any]:
    def number(value: float) -> float | None:
        return None if math.isnan(value) else value

    return {
        "mean": coefficient.mean,
        "ci_low": number(coefficient.ci_low),
        "ci_high": number(coefficient.ci_high),
        "bootstrap_low": number(coefficient.bootstrap_low),
        "bootstrap_high": number(coefficient.bootstrap_high),
        "num_tasks": coefficient.num_tasks,
    }


# ------------------------------------------------------------------------------ probe
def load_probe(spec: str) -> nn.Module:
    """``get_probe(spec)`` (``"lm:DIR"`` or ``"lm:<hub id>"``)."""
    from t2v_lightning.probe import get_probe

    if not spec.startswith("lm:"):
        raise ValueError(
            f"--probe must be a language model, 'lm:<directory or hub id>'; got {spec!r}"
        )
    return get_probe(spec)


def probe_tokenizer(probe: nn.Module) -> Any:
    """The tokenizer of a language-model probe (``ProbeError`` when it came without one)."""
    from t2v_lightning.causal_lm import is_language_model

    if not is_language_model(probe):
        raise ValueError(
            f"the probe must come from get_probe('lm:...'), got {type(probe).__name__}"
        )
    return probe.tokenizer


def weights_fingerprint(probe: nn.Module) -> str:
    """The fingerprint of the probe's weights, as its artifacts record it."""
    from t2v_lightning.lm import CausalLMProbe, cached_fingerprint
    from t2v_lightning.probe import probe_fingerprint

    if isinstance(probe, CausalLMProbe):  # kept for embed_lm, which asks again per task
        return cached_fingerprint(probe)
    model = getattr(probe, "model", probe)
    return probe_fingerprint(model if isinstance(model, nn.Module) else probe)


def _vocabulary(probe: nn.Module, tokenizer: Any) -> int:
    sizes = [int(getattr(probe, "vocab_size", 0) or 0)]
    if hasattr(tokenizer, "__len__"):
        sizes.append(len(tokenizer))
    sizes = [size for size in sizes if size > 0]
    if not sizes:
        raise ValueError("cannot tell the probe's vocabulary size for --bounds")
    return min(sizes)


class LMTaskEmbedder:
    """Embeds one task at a time on one device with :func:`~t2v_lightning.lm.embed_lm` (what
    ``Task2Vec(probe).embed(task)`` runs for a language-model probe, without building a
    Trainer to find the device)."""

    def __init__(self, probe: nn.Module, settings: DiversitySettings, device: torch.device) -> None:
        from t2v_lightning.causal_lm import is_language_model
        from t2v_lightning.lm import LMSettings

        if not is_language_model(probe):
            raise ValueError(
                f"the probe must come from get_probe('lm:...'), got {type(probe).__name__}"
            )
        self.probe = probe
        self.device = device
        self.settings = LMSettings(
            estimator=settings.estimator,
            batch_size=settings.batch_size,
            head_epochs=settings.head_epochs,
            seed=settings.seed,
            precision=settings.precision,
        )

    def embed(self, task: TokenTask, task_name: str | None = None) -> TaskEmbedding:
        """The task's embedding."""
        from t2v_lightning.lm import embed_lm

        return embed_lm(self.probe, task, self.settings, self.device, task_name)  # type: ignore[arg-type]


def default_embedder(probe: nn.Module, settings: DiversitySettings, device: torch.device) -> Any:
    """The task embedder of a run: an :class:`LMTaskEmbedder` on ``device``."""
    return LMTaskEmbedder(probe, settings, device)


# ------------------------------------------------------------------------------ progress
@dataclass
class Progress:
    """``done/total`` tasks with the time left: a rewritten line on a terminal, else one line
    per task.

    Args:
        label: what is being embedded.
        total: tasks this process will handle.
        stream: where to write (``None``: nothing is written).
    """

    label: str
    total: int
    stream: TextIO | None
    done: int = field(default=0, init=False)
    skipped: int = field(default=0, init=False)
    seconds: float = field(default=0.0, init=False)

    @property
    def tty(self) -> bool:
        """Whether ``stream`` is a terminal (the line is rewritten in place)."""
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, index: int, seconds: float | None) -> None:
        """Task ``index`` is done: embedded in ``seconds``, or ``None`` when skipped."""
        self.done += 1
        if seconds is None:
            self.skipped += 1
        else:
            self.seconds += seconds
        if self.stream is None:
            return
        embedded = self.done - self.skipped
        left = self.total - self.done
        if embedded:
            eta = f"about {_duration(self.seconds / embedded * left)} left"
        else:
            eta = "time left unknown"
        what = "skipped (written before)" if seconds is None else f"{seconds:.1f} s"
        line = f"{self.label}: {self.done}/{self.total} tasks (task {index}: {what}; {eta})"
        if self.tty:
            end = "\n" if self.done == self.total else ""
            self.stream.write("\r\033[K" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


# ------------------------------------------------------------------------------ tasks
def task_file(folder: Path, index: int) -> Path:
    """The artifact of task ``index``."""
    return folder / f"task_{index:04d}.safetensors"


def _tasks(
    corpus: Corpus,
    tokenizer: Any,
    probe: nn.Module,
    settings: DiversitySettings,
    stats: CorpusStats,
) -> Iterator[TokenTask]:
    if isinstance(corpus, SyntheticCorpus):
        vocab = _vocabulary(probe, tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
        pad_id = pad_token_id(tokenizer)
        for index in range(settings.num_tasks):
            stats.sequences += settings.task_size
            yield synthetic_task(
                corpus.kind,
                index,
                settings.task_size,
                settings.max_length,
                vocab,
                eos if isinstance(eos, int) else None,
                settings.seed,
                pad_id,
            )
        return
    yield from token_tasks(
        corpus,
        tokenizer,
        settings.num_tasks,
        settings.task_size,
        settings.max_length,
        settings.seed,
        settings.packing,
        stats,
    )


def _identity(
    corpus: Corpus,
    settings: DiversitySettings,
    probe_spec: str,
    fingerprint: str,
    task: TokenTask,
) -> dict[str, Any]:
    return {
        "index": task.index,
        "corpus": corpus.identity(),
        "probe": probe_spec,
        "probe_fingerprint": fingerprint,
        **settings.task_identity(),
        "tokens_sha256": task.fingerprint(),
    }


class SettingsMismatchError(ValueError):
    """An artifact in the output folder was made from other tokens or with other settings."""


class RankFailedError(ValueError):
    """Another process of a distributed run failed (it printed its own error)."""


def _existing(
    path: Path, identity: dict[str, Any], overwrite: bool
) -> Literal["embed", "replace", "skip"]:
    if not path.exists():
        return "embed"
    if overwrite:
        return "replace"
    try:  # checksum included: a truncated or damaged artifact is embedded again
        recorded = TaskEmbedding.load(path).meta.get("diversity_task")
    except (EmbeddingFileError, OSError):
        return "replace"
    if recorded == identity:
        return "skip"
    if not isinstance(recorded, dict):
        differs = "it is not a corpus task's artifact"
    else:
        keys = sorted(set(recorded) | set(identity))
        names = [k for k in keys if recorded.get(k) != identity.get(k)]
        settings = [k for k in names if k != "tokens_sha256"]  # other settings, other tokens
        differs = (
            ", ".join(
                f"{k}: {recorded.get(k)!r} there, {identity.get(k)!r} here" for k in settings[:3]
            )
            or "its tokens differ from this pass's (the corpus or the tokenizer changed)"
        )
    raise SettingsMismatchError(
        f"{path} was made with other settings ({differs}); use another --output, or pass "
        "--overwrite to embed again"
    )


def embed_corpus_tasks(
    corpus: Corpus,
    probe: nn.Module,
    tokenizer: Any,
    settings: DiversitySettings,
    folder: str | os.PathLike[str],
    probe_spec: str = "",
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    overwrite: bool = False,
    progress: TextIO | None = None,
    embedder: EmbedderFactory = default_embedder,
    fingerprint: str | None = None,
) -> CorpusStats:
    """Embed this rank's share of a corpus's tasks, one artifact each, skipping those written.

    Every rank reads the whole pass (so every task is the same whatever the world size) and
    embeds tasks ``rank, rank + world_size, …``.

    Args:
        corpus: the corpus, or a bound.
        probe: the language-model probe.
        tokenizer: its tokenizer.
        settings: the cut and the embedding.
        folder: where ``task_{k:04d}.safetensors`` go.
        probe_spec: the probe's name, recorded in each artifact.
        rank: this process's rank.
        world_size: the number of processes.
        device: this process's device (default: the CPU).
        overwrite: embed again the tasks already written.
        progress: where to report progress (``None``: nowhere).
        embedder: builds the task embedder (default: :class:`LMTaskEmbedder`).
        fingerprint: the probe's weights' fingerprint (``None``: computed here); a task
            written with other weights is not skipped.

    Returns:
        What the pass read.

    Raises:
        CorpusError: the corpus cannot be read, fails part way, or is too small (tasks
            written before that are kept: a rerun resumes).
        SettingsMismatchError: an artifact in ``folder`` was made otherwise.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cpu")
    if fingerprint is None:
        fingerprint = weights_fingerprint(probe)
    stats = CorpusStats()
    mine = len(range(rank, settings.num_tasks, world_size))
    label = corpus_label(corpus)
    if world_size > 1:
        label = f"{label} (rank {rank} of {world_size})"
    reporter = Progress(label, mine, progress)
    task2vec = None
    for task in _tasks(corpus, tokenizer, probe, settings, stats):
        if task.index % world_size != rank:
            continue
        identity = _identity(corpus, settings, probe_spec, fingerprint, task)
        path = task_file(folder, task.index)
        action = _existing(path, identity, overwrite)
        if action == "skip":
            reporter.update(task.index, None)
            continue
        if task2vec is None:
            task2vec = embedder(probe, settings, device)
        start = time.perf_counter()
        embedding = task2vec.embed(task, task_name=f"{corpus_label(corpus)} task {task.index}")
        meta = {**embedding.meta, "diversity_task": identity}
        TaskEmbedding(embedding.hessian, embedding.scale, dict(embedding.layers), meta).save(
            path, overwrite=action == "replace"
        )
        reporter.update(task.index, time.perf_counter() - start)
    return stats


def load_tasks(folder: str | os.PathLike[str], num_tasks: int) -> list[TaskEmbedding]:
    """The artifacts of tasks ``0 … num_tasks − 1`` in ``folder``."""
    return [TaskEmbedding.load(task_file(Path(folder), k)) for k in range(num_tasks)]


# ------------------------------------------------------------------------------ the whole run
def _slug(name: str) -> str:
    last = name.rstrip("/").rsplit("/", 1)[-1]  # a file's name, a hub dataset's own name
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", last).strip("._")[:60] or "corpus"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class _Run:
    """Everything one process needs (picklable, for ``ddp_spawn``)."""

    probe_spec: str
    probe: nn.Module | None
    corpus: CorpusSpec
    against: tuple[tuple[str, CorpusSpec], ...]
    bounds: bool
    settings: DiversitySettings
    output: str
    overwrite: bool
    confidence: float
    num_resamples: int
    verbose: bool
    embedder: EmbedderFactory


def _groups(run: _Run) -> list[tuple[str, Corpus, Path]]:
    out = Path(run.output)
    groups: list[tuple[str, Corpus, Path]] = [("diversity", run.corpus, out)]
    for name, spec in run.against:
        groups.append((f"against:{name}", spec, out / "against" / _slug(name)))
    if run.bounds:
        groups.append(("lower_bound", SyntheticCorpus("lower"), out / "lower_bound"))
        groups.append(("upper_bound", SyntheticCorpus("upper"), out / "upper_bound"))
    return groups


def _work(run: _Run, rank: int, world_size: int, device: torch.device) -> dict[str, CorpusStats]:
    probe = run.probe if run.probe is not None else load_probe(run.probe_spec)
    tokenizer = probe_tokenizer(probe)
    stream = sys.stderr if run.verbose and rank == 0 else None
    stats: dict[str, CorpusStats] = {}
    fingerprint = weights_fingerprint(probe)
    for name, corpus, folder in _groups(run):
        stats[name] = embed_corpus_tasks(
            corpus,
            probe,
            tokenizer,
            run.settings,
            folder,
            run.probe_spec,
            rank,
            world_size,
            device,
            run.overwrite,
            stream,
            run.embedder,
            fingerprint,
        )
    return stats


def _report(run: _Run, stats: dict[str, CorpusStats], world_size: int) -> CorpusDiversityReport:
    n = run.settings.num_tasks
    tasks = {name: load_tasks(folder, n) for name, _, folder in _groups(run)}

    def pairwise(embeddings: list[TaskEmbedding]) -> DiversityCoefficient:
        return diversity_coefficient(
            embeddings, "cosine", run.confidence, run.num_resamples, run.settings.seed
        )

    main = tasks["diversity"]
    settings = {
        "probe": run.probe_spec,
        "data": run.corpus.data,
        "data_config": run.corpus.config,
        "split": run.corpus.split,
        "text_column": run.corpus.text_column,
        "streaming": run.corpus.streaming,
        "shuffle_buffer": run.corpus.shuffle_buffer if run.corpus.streaming else None,
        **asdict(run.settings),
        "against": [name for name, _ in run.against],
        "bounds": run.bounds,
        "distance": "cosine",
        "confidence": run.confidence,
        "bootstrap_resamples": run.num_resamples,
        "world_size": world_size,
        "output": run.output,
        "probe_fingerprint": main[0].meta.get("probe_fingerprint"),
    }
    report = CorpusDiversityReport(
        diversity=pairwise(main),
        settings=settings,
        stats={name.removeprefix("against:"): s for name, s in stats.items()},
        files=[task_file(Path(run.output), k) for k in range(n)],
    )
    for name, _ in run.against:
        report.cross_diversity[name] = cross_diversity_coefficient(
            main,
            tasks[f"against:{name}"],
            "cosine",
            run.confidence,
            run.num_resamples,
            run.settings.seed,
        )
    if run.bounds:
        report.lower_bound = pairwise(tasks["lower_bound"])
        report.upper_bound = pairwise(tasks["upper_bound"])
    return report


def _rank_main(run: _Run, fabric: Any) -> CorpusDiversityReport:
    """One rank of a distributed run: its tasks, then one collective, then the report."""
    error: BaseException | None = None
    stats: dict[str, CorpusStats] = {}
    try:
        stats = _work(run, fabric.global_rank, fabric.world_size, fabric.device)
    except Exception as err:
        error = err
    failed = torch.tensor([0.0 if error is None else 1.0], device=fabric.device)
    failed = fabric.all_reduce(failed, reduce_op="sum")
    if error is not None:
        raise error
    if float(failed.item()) > 0:
        raise RankFailedError(
            "another rank failed (its error is printed above); the tasks written are kept, "
            "rerun to resume"
        )
    return _report(run, stats, fabric.world_size)


def _launch(run: _Run, placement: Placement) -> CorpusDiversityReport:
    if not placement.distributed():
        device = _single_device(placement.accelerator, placement.devices)
        return _report(run, _work(run, 0, 1, device), 1)
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy, Strategy

    # Ranks meet once, at the end: one whose tasks were all written before waits there for
    # the others, so the collective's timeout is days, not Lightning's 30 minutes.
    strategy: str | Strategy = placement.strategy
    if placement.strategy in ("ddp", "ddp_spawn", "auto"):
        start: Literal["spawn", "popen"] = "spawn" if placement.strategy == "ddp_spawn" else "popen"
        strategy = DDPStrategy(start_method=start, timeout=_RANKS_TIMEOUT)
    fabric = Fabric(
        accelerator=placement.accelerator,
        devices=placement.devices,  # type: ignore[arg-type]
        strategy=strategy,
        num_nodes=placement.num_nodes,
    )
    result = fabric.launch(functools.partial(_rank_main, run))
    assert isinstance(result, CorpusDiversityReport)
    return result


def _single_device(accelerator: str, devices: Any) -> torch.device:
    if accelerator in ("cpu",) or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda", "auto"):
        index = devices[0] if isinstance(devices, list) and devices else 0
        return torch.device("cuda", int(index))
    return torch.device(accelerator)


def corpus_diversity(
    probe: str | nn.Module,
    data: str | CorpusSpec,
    output: str | os.PathLike[str],
    *,
    data_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = False,
    shuffle_buffer: int = 10_000,
    cache_dir: str | None = None,
    num_tasks: int = 200,
    task_size: int = 512,
    max_length: int = 128,
    seed: int = 0,
    packing: bool = False,
    estimator: Literal["per_sample", "batch"] = "per_sample",
    head_epochs: int = 5,
    batch_size: int = 8,
    precision: str = "32-true",
    against: str | CorpusSpec | None = None,
    bound: Literal["lower", "upper"] | None = None,
    overwrite: bool = False,
    confidence: float = 0.95,
    num_resamples: int = 1000,
    accelerator: str = "auto",
    devices: int | str | list[int] = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    verbose: bool = False,
) -> DiversityCoefficient:
    """The diversity coefficient of a text corpus (or its cross-diversity with another, or a
    bound), embedding its tasks into ``output`` (resumable; see the module's docstring).

    Args:
        probe: ``"lm:<directory or hub id>"`` or a probe from ``get_probe("lm:...")``.
        data: a Hugging Face dataset name, a local file or folder, or a :class:`CorpusSpec`.
        output: the folder of the task artifacts.
        data_config: the dataset's configuration.
        split: the split.
        text_column: the column of the text.
        streaming: stream the corpus.
        shuffle_buffer: documents in the streamed shuffle's buffer.
        cache_dir: where ``datasets`` keeps downloaded and prepared data.
        num_tasks: tasks (``N``).
        task_size: sequences per task (``B``).
        max_length: tokens per sequence (``L``).
        seed: seed of the pass, the bounds and the label draws.
        packing: join documents into ``L``-token sequences (default: one per document).
        estimator: ``"per_sample"`` or ``"batch"`` (the published code's).
        head_epochs: epochs of fitting the untied copy of the LM head.
        batch_size: sequences per step.
        precision: Lightning precision.
        against: another corpus (a path, ``NAME[:CONFIG]`` or a :class:`CorpusSpec`): return
            the cross-diversity of ``data`` with it (its tasks go to ``output/against/<name>``).
        bound: ``"lower"`` or ``"upper"``: return that bound's coefficient, with the same probe
            and settings (its tasks go to ``output/lower_bound`` or ``output/upper_bound``;
            ``data`` is not read).
        overwrite: embed again the tasks already written.
        confidence: confidence of the t and bootstrap intervals.
        num_resamples: bootstrap resamples over tasks.
        accelerator: Lightning accelerator.
        devices: Lightning devices; more than one splits the tasks across processes.
        strategy: Lightning strategy (``"ddp"``, ``"ddp_spawn"``) when ``devices`` > 1.
        num_nodes: machines of a multi-node run.
        verbose: report progress on stderr.

    Returns:
        A :class:`DiversityCoefficient` with the t interval over pairs and the bootstrap
        interval over tasks.

    Raises:
        CorpusError: a corpus cannot be read or is too small; the tasks written are kept.
        SettingsMismatchError: ``output`` holds tasks made otherwise.
    """
    if against is not None and bound is not None:
        raise ValueError("pass against= or bound=, not both")
    spec = (
        data
        if isinstance(data, CorpusSpec)
        else CorpusSpec(data, data_config, split, text_column, streaming, shuffle_buffer, cache_dir)
    )
    other: tuple[tuple[str, CorpusSpec], ...] = ()
    if against is not None:
        other_spec = (
            against
            if isinstance(against, CorpusSpec)
            else against_spec(against, split, text_column, streaming, shuffle_buffer, cache_dir)
        )
        other = ((against if isinstance(against, str) else other_spec.data, other_spec),)
    settings = DiversitySettings(
        num_tasks,
        task_size,
        max_length,
        seed,
        packing,
        estimator,
        head_epochs,
        batch_size,
        precision,
    )
    probe_spec = probe if isinstance(probe, str) else _probe_name(probe)
    run = _Run(
        probe_spec,
        None if isinstance(probe, str) else probe,
        spec,
        other,
        bound is not None,
        settings,
        os.fspath(output),
        overwrite,
        confidence,
        num_resamples,
        verbose,
        default_embedder,
    )
    if bound is not None:
        report = _launch_bound(run, bound, Placement(accelerator, devices, strategy, num_nodes))
        return report
    report_all = _launch(run, Placement(accelerator, devices, strategy, num_nodes))
    if against is not None:
        return report_all.cross_diversity[other[0][0]]
    return report_all.diversity


def _launch_bound(run: _Run, bound: str, placement: Placement) -> DiversityCoefficient:
    report = _launch(run, placement)
    coefficient = report.lower_bound if bound == "lower" else report.upper_bound
    if coefficient is None:  # pragma: no cover - bounds=True fills both
        raise RuntimeError("bound not computed")
    return coefficient


def _probe_name(probe: nn.Module) -> str:
    source = getattr(probe, "source", None)
    return f"lm:{source}" if source else type(probe).__name__


# ------------------------------------------------------------------------------ command line
def against_spec(
    value: str,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = False,
    shuffle_buffer: int = 10_000,
    cache_dir: str | None = None,
) -> CorpusSpec:
    """The corpus of an ``--against`` value: a local path as it is, else ``NAME[:CONFIG]``."""
    name, config = value, None
    if not Path(value).exists() and ":" in value:
        name, config = value.rsplit(":", 1)
    return CorpusSpec(
        name, config or None, split, text_column, streaming, shuffle_buffer, cache_dir
    )


class _DiversityArgumentError(ValueError):
    """A mistake in the ``t2v diversity`` command line (one line, exit status 2)."""


class _DiversityParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _DiversityArgumentError(f"diversity: {message} (see: t2v diversity --help)")


def _devices(value: str) -> int | str | list[int]:
    text = value.strip()
    if text.startswith("["):
        return [int(v) for v in text.strip("[]").split(",") if v.strip()]
    if "," in text:
        return [int(v) for v in text.split(",") if v.strip()]
    try:
        return int(text)
    except ValueError:
        return text  # "auto", "-1"


def diversity_parser() -> argparse.ArgumentParser:
    """The ``t2v diversity`` options."""
    parser = _DiversityParser(
        prog="t2v diversity",
        description="The diversity coefficient of a text corpus (Miranda et al. 2023, SPEC "
        "section 8): one shuffled pass cut into tasks of sequences, each embedded with a "
        "language-model probe (one artifact per task, resumable), and the mean pairwise cosine "
        "distance with a t interval over pairs and a bootstrap interval over tasks.",
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--probe", required=True, help="lm:<local directory or hub id> (e.g. lm:gpt2)")
    add(
        "--data",
        required=True,
        help="Hugging Face dataset name, or a local .jsonl/.json/.txt/.csv/.parquet file or folder",
    )
    add("--data_config", default=None, help="the dataset's configuration (e.g. en)")
    add("--split", default="train", help="split to read (default: train)")
    add("--text_column", default="text", help="column holding the text (default: text)")
    add("--streaming", action="store_true", help="stream the corpus instead of preparing it")
    add(
        "--shuffle_buffer",
        type=int,
        default=10_000,
        help="documents in the streamed shuffle's buffer (default: 10000)",
    )
    add(
        "--cache_dir",
        default=None,
        help="where datasets keeps downloaded and prepared data "
        "(default: its own, ~/.cache/huggingface/datasets)",
    )
    add(
        "--packing",
        action="store_true",
        help="join documents (EOS between them) and cut "
        "sequences of exactly --max_length tokens (default: one document per sequence, "
        "truncated)",
    )
    add("--num_tasks", type=int, default=200, help="tasks (default: 200)")
    add("--task_size", type=int, default=512, help="sequences per task (default: 512)")
    add("--max_length", type=int, default=128, help="tokens per sequence (default: 128)")
    add("--seed", type=int, default=0, help="seed of the pass, the bounds and the label draws")
    add("--output", required=True, help="folder of the task artifacts (reruns resume)")
    add(
        "--against",
        nargs="+",
        default=[],
        metavar="PATH_OR_NAME",
        help="corpora to compute the cross-diversity with (same split, column and streaming; "
        "a hub dataset's configuration after a colon: Salesforce/wikitext:wikitext-103-raw-v1)",
    )
    add("--bounds", action="store_true", help="also the lower and upper bounds (SPEC section 8)")
    add("--json", default=None, help="write the results here as JSON")
    add(
        "--png",
        default=None,
        help="the distance matrix figure (default: OUTPUT/distance_matrix.png)",
    )
    add(
        "--estimator",
        choices=("per_sample", "batch"),
        default="per_sample",
        help="Fisher estimator: per_sample (default) or batch (the published code's)",
    )
    add(
        "--head_epochs",
        type=int,
        default=5,
        help="epochs of fitting the untied copy of the LM head (default: 5)",
    )
    add("--batch_size", type=int, default=8, help="sequences per step (default: 8)")
    add("--confidence", type=float, default=0.95, help="confidence of both intervals")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples over tasks")
    add("--overwrite", action="store_true", help="embed again the tasks already written")
    add("--quiet", action="store_true", help="no progress lines")
    add("--trainer.accelerator", dest="accelerator", default="auto")
    add(
        "--trainer.devices",
        dest="devices",
        type=_devices,
        default=1,
        help="processes (devices) sharing the tasks",
    )
    add(
        "--trainer.strategy",
        dest="strategy",
        default="auto",
        help="ddp or ddp_spawn with several devices",
    )
    add("--trainer.num_nodes", dest="num_nodes", type=int, default=1)
    add(
        "--trainer.precision",
        dest="precision",
        default="32-true",
        help="32-true, bf16-mixed or 16-mixed (float16 with a loss scale; bf16-mixed on a CPU)",
    )
    return parser


def diversity_main(argv: Sequence[str]) -> None:
    """``t2v diversity --probe lm:DIR --data PATH_OR_NAME --output DIR [...]``."""
    from t2v_lightning.outputs import check_new_outputs

    options = diversity_parser().parse_args(list(argv))
    png = Path(options.png) if options.png else Path(options.output) / "distance_matrix.png"
    json_path = Path(options.json) if options.json else None
    # --json and --png summarise the artifacts: each run writes them afresh (a rerun resumes).
    inputs = [options.data] if Path(options.data).is_file() else []
    check_new_outputs(
        {"--json": json_path, "--png": png}, inputs, True, refused_suffix=".safetensors"
    )
    spec = CorpusSpec(
        options.data,
        options.data_config,
        options.split,
        options.text_column,
        options.streaming,
        options.shuffle_buffer,
        options.cache_dir,
    )
    against = tuple(
        (
            name,
            against_spec(
                name,
                options.split,
                options.text_column,
                options.streaming,
                options.shuffle_buffer,
                options.cache_dir,
            ),
        )
        for name in options.against
    )
    settings = DiversitySettings(
        options.num_tasks,
        options.task_size,
        options.max_length,
        options.seed,
        options.packing,
        options.estimator,
        options.head_epochs,
        options.batch_size,
        options.precision,
    )
    run = _Run(
        options.probe,
        None,
        spec,
        against,
        options.bounds,
        settings,
        options.output,
        options.overwrite,
        options.confidence,
        options.bootstrap,
        not options.quiet,
        _embedder_for_cli(),
    )
    placement = Placement(options.accelerator, options.devices, options.strategy, options.num_nodes)
    report = _launch(run, placement)
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    _save_figure(png, report, options.overwrite)
    if json_path is not None:
        from t2v_lightning.outputs import write_atomically

        text = json.dumps(report.to_json(), indent=2, sort_keys=False) + "\n"

        def write_json(name: str) -> None:
            Path(name).write_text(text)

        write_atomically(json_path, write_json, True, what="--json")
    _print_report(report, png, json_path)


def _embedder_for_cli() -> EmbedderFactory:
    return default_embedder


def _save_figure(path: Path, report: CorpusDiversityReport, overwrite: bool) -> None:
    from t2v_lightning.outputs import write_atomically
    from t2v_lightning.plot import plot_distance_matrix
    from t2v_lightning.similarity.distance import pdist

    embeddings = [TaskEmbedding.load(f) for f in report.files]
    matrix = pdist(embeddings, "cosine")
    names = [f"task {k}" for k in range(len(embeddings))]
    figure = plot_distance_matrix(
        matrix, labels=names, title=f"cosine distance between tasks of {report.settings['data']}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lstrip(".").lower() or None
    # The figure is redrawn from the artifacts on every run: it always reflects them.
    write_atomically(
        path,
        lambda name: figure.savefig(name, dpi=120, format=suffix),
        overwrite=True,
        what="--png",
    )
    import matplotlib.pyplot as plt

    plt.close(figure)


def _line(name: str, coefficient: DiversityCoefficient) -> str:
    return (
        f"{name}: {coefficient.mean:.4f}  t-interval over pairs [{coefficient.ci_low:.4f}, "
        f"{coefficient.ci_high:.4f}]  bootstrap over tasks [{coefficient.bootstrap_low:.4f}, "
        f"{coefficient.bootstrap_high:.4f}]  ({coefficient.num_tasks} tasks, "
        f"{coefficient.confidence:.0%})"
    )


def _print_report(report: CorpusDiversityReport, png: Path, json_path: Path | None) -> None:
    stats = report.stats.get("diversity")
    if stats is not None:
        print(
            f"corpus {report.settings['data']}: {stats.documents} documents read, "
            f"{stats.empty_documents} empty skipped, {stats.sequences} sequences"
        )
    print(_line("diversity coefficient", report.diversity))
    for name, coefficient in report.cross_diversity.items():
        print(_line(f"cross-diversity with {name}", coefficient))
    if report.lower_bound is not None and report.upper_bound is not None:
        print(_line("lower bound", report.lower_bound))
        print(_line("upper bound", report.upper_bound))
    print(
        f"tasks: {Path(report.settings['output'])}  figure: {png}"
        + (f"  json: {json_path}" if json_path else "")
    )
