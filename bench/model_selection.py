"""Does Task2Vec pick good experts? An offline model-selection benchmark (paper section 4).

The experiment of the paper (Achille et al. 2019, Table 1 and Fig. 5), at a size that runs on
two CPU cores with data and weights that ship in pip / Debian packages:

* **Experts.** EfficientNet-Lite0 with its ImageNet weights (``get_probe("efficientnet_lite0")``)
  fine-tuned on each *source task*: the last stages (``blocks.4`` to ``blocks.6``,
  ``conv_head``, ``bn2``) and a new classifier are trained, the stem and ``blocks.0-3`` stay
  frozen (their outputs are computed once and cached). The generic ImageNet model itself is one
  more candidate, the "always ImageNet" baseline.
* **Targets.** Tasks disjoint from every source: other images (the held-out / test split of
  each dataset, never seen by an expert), and other classes or other label groupings.
* **Ground truth.** For each expert and target: the test error of a linear classifier
  (scikit-learn's logistic regression on standardised features) trained on the expert's frozen
  penultimate features (the 1280 pooled ``bn2`` outputs) of the target's training images, as in
  the paper.
* **Selection.** Task2Vec embeddings of every source and target task with the ImageNet probe
  (Monte Carlo, per-sample estimator); :func:`~t2v_lightning.similarity.selection.select_expert`
  ranks the fine-tuned experts for each target by the asymmetric distance
  ``d(target, source) − α·d(source, trivial)``, α = 0.15. The ImageNet model has no source task
  here (its training set is not available offline), so it is not ranked: it is the baseline.

* **Transferability estimators** (:mod:`t2v_lightning.similarity.transferability`): LogME, LEEP,
  NCE, H-score and H-score with a Ledoit–Wolf shrunk covariance score *every* candidate,
  ImageNet included, from one pass of that candidate over the target's training images (the
  images the ground truth's linear probes are trained on): LogME and the H-scores read the
  penultimate features the ground truth uses, LEEP and NCE the candidate's own source-class
  head (the fine-tuned head of an expert, the 1000 ImageNet classes of the ImageNet model).
  The highest score is the pick. **Two-stage**: Task2Vec's first :data:`TOP_K` experts
  reranked by each estimator.

Reported per target and on average: the test error of the Task2Vec pick, of always-ImageNet, of
chance (the mean over the fine-tuned experts) and of the oracle (the best of all candidates,
ImageNet included), each as the difference to the oracle; the Spearman correlation between the
ranking by asymmetric distance and the ranking by error; a figure. The same numbers for other
values of α and other distances are printed as a diagnosis (the headline is α = 0.15, cosine).
Then one row per method (Task2Vec, each estimator, each two-stage pick): mean points over the
oracle, relative excess, picks equal to the oracle, Spearman and weighted Kendall τ (scipy's
``weightedtau``) against the errors over the fine-tuned experts, and the cost per target as
measured when the scores were computed (forward passes, seconds, growth with the number N of
candidates); ``regret_vs_cost.png`` plots the regret against the seconds per target.

Everything expensive is cached under ``--cache`` (frozen-prefix features, expert weights,
Task2Vec artifacts, errors), keyed by the settings, so a rerun only redoes the report. The
expert artifacts land in ``CACHE/<key>/embeddings/sources/``, ready for
``t2v select --target CACHE/<key>/embeddings/targets/T.safetensors --experts
CACHE/<key>/embeddings/sources``.

Usage::

    python bench/model_selection.py                 # the full zoo (47 min on 2 shared cores)
    python bench/model_selection.py --quick         # 3 experts, 2 targets, tiny: a smoke test
                                                    # (report in bench/results/model_selection_quick)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from t2v_lightning.embedding import TaskEmbedding  # noqa: E402
from t2v_lightning.similarity.selection import DEFAULT_ALPHA, select_expert  # noqa: E402
from t2v_lightning.similarity.transferability import (  # noqa: E402
    TRANSFERABILITY_METHODS,
    transferability,
)

log = logging.getLogger("model_selection")

IMAGENET = "imagenet"
"""Name of the generic candidate: the ImageNet model without fine-tuning."""

TOP_K = 3
"""Length of Task2Vec's shortlist that the two-stage picks rerank by an estimator."""

SCORES_VERSION = 1
"""Bumped when the estimators' code changes the numbers: cached scores of another version are
recomputed."""

FROZEN_STAGES = 4
"""``blocks.0`` .. ``blocks.3`` (and the stem) stay frozen; ``blocks.4`` onwards is fine-tuned."""


# ------------------------------------------------------------------------------ the zoo
@dataclass(frozen=True)
class TaskSpec:
    """A task: some classes (or groups of classes) of one split of an offline dataset.

    Args:
        name: short identifier (file names, table rows).
        dataset: registered dataset: ``mnist_subset``, ``digits`` or ``fashion_mnist``.
        classes: dataset labels in task-label order, or ``{dataset label: task label}``.
        train: the dataset's training split (sources) or its held-out / test split (targets).
    """

    name: str
    dataset: str
    classes: tuple[int, ...] | Mapping[int, int]
    train: bool

    def mapping(self) -> dict[int, int]:
        if isinstance(self.classes, Mapping):
            return {int(k): int(v) for k, v in self.classes.items()}
        return {int(c): i for i, c in enumerate(self.classes)}

    def num_classes(self) -> int:
        return len(set(self.mapping().values()))


def _group(groups: Sequence[Sequence[int]]) -> dict[int, int]:
    return {c: label for label, members in enumerate(groups) for c in members}


ALL10 = tuple(range(10))
SOURCES: tuple[TaskSpec, ...] = (
    TaskSpec("mnist_0_4", "mnist_subset", (0, 1, 2, 3, 4), True),
    TaskSpec("mnist_5_9", "mnist_subset", (5, 6, 7, 8, 9), True),
    TaskSpec("mnist_parity", "mnist_subset", _group([(0, 2, 4, 6, 8), (1, 3, 5, 7, 9)]), True),
    TaskSpec("digits_all", "digits", ALL10, True),
    TaskSpec("fashion_tops", "fashion_mnist", (0, 2, 4, 6), True),
    TaskSpec("fashion_footwear", "fashion_mnist", (5, 7, 9), True),
    TaskSpec("fashion_tops_vs_footwear", "fashion_mnist", _group([(0, 2, 4, 6), (5, 7, 9)]), True),
    TaskSpec("fashion_trouser_dress_bag", "fashion_mnist", (1, 3, 8), True),
)
"""The experts' training tasks (training splits)."""

SOURCES_WITHOUT_FASHION: tuple[TaskSpec, ...] = (
    TaskSpec("digits_0_4", "digits", (0, 1, 2, 3, 4), True),
    TaskSpec("digits_5_9", "digits", (5, 6, 7, 8, 9), True),
    TaskSpec("digits_parity", "digits", _group([(0, 2, 4, 6, 8), (1, 3, 5, 7, 9)]), True),
    TaskSpec("mnist_all", "mnist_subset", ALL10, True),
)
"""Replace the four Fashion-MNIST sources when its files are not installed."""

TARGETS: tuple[TaskSpec, ...] = (
    TaskSpec("t_mnist_3_5_8", "mnist_subset", (3, 5, 8), False),
    TaskSpec("t_mnist_1_7", "mnist_subset", (1, 7), False),
    TaskSpec(
        "t_mnist_low_vs_high", "mnist_subset", _group([(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]), False
    ),
    TaskSpec("t_mnist_all", "mnist_subset", ALL10, False),
    TaskSpec("t_digits_0_4", "digits", (0, 1, 2, 3, 4), False),
    TaskSpec("t_digits_all", "digits", ALL10, False),
    TaskSpec("t_fashion_all", "fashion_mnist", ALL10, False),
    TaskSpec("t_fashion_tshirt_vs_shirt", "fashion_mnist", (0, 6), False),
    TaskSpec("t_fashion_pullover_coat_shirt", "fashion_mnist", (2, 4, 6), False),
    TaskSpec(
        "t_fashion_clothes_vs_accessories",
        "fashion_mnist",
        _group([(0, 1, 2, 3, 4, 6), (5, 7, 8, 9)]),
        False,
    ),
    TaskSpec("t_fashion_sandal_bag_boot", "fashion_mnist", (5, 8, 9), False),
    TaskSpec("t_fashion_trouser_vs_dress", "fashion_mnist", (1, 3), False),
)
"""The target tasks (held-out / test splits: images no expert has seen)."""

QUICK_SOURCES = (SOURCES[0], SOURCES[2], SOURCES[3])
QUICK_TARGETS = (TARGETS[0], TARGETS[4])


@dataclass(frozen=True)
class Settings:
    """Everything that the cached results depend on."""

    input_size: int = 64
    source_images: int = 2000
    target_train_per_class: int = 30
    target_test_per_class: int = 150
    expert_epochs: int = 4
    expert_lr: float = 1e-3
    expert_batch: int = 64
    embed_samples: int = 1000
    embed_skip_layers: int = 2
    embed_head_epochs: int = 10
    linear_c: float = 1.0
    seed: int = 0
    # Each expert's new classifier is initialised from a seed of (seed, source name); results
    # cached before this field existed came from the global random state.
    seeded_expert_heads: bool = True
    sources: tuple[str, ...] = field(default_factory=tuple)
    targets: tuple[str, ...] = field(default_factory=tuple)

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


QUICK = {
    "input_size": 32,
    "source_images": 60,
    "target_train_per_class": 6,
    "target_test_per_class": 10,
    "expert_epochs": 1,
    "embed_samples": 40,
    "embed_skip_layers": 3,
    "embed_head_epochs": 1,
}


# ------------------------------------------------------------------------------ data
class TaskImages(Dataset):
    """Chosen images of a task: ``(normalised 3 x S x S image, task label)``, with ``targets``."""

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        labels: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.base = base
        self.indices = list(indices)
        self.targets = [int(y) for y in labels]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.base[self.indices[index]]
        return (image - self.mean) / self.std, self.targets[index]


def _balanced_pick(
    labels: np.ndarray,
    per_class: Sequence[int],
    rng: np.random.Generator,
    skip: Mapping[int, int] | None = None,
) -> list[int]:
    """Positions of ``per_class[c]`` examples of each class ``c`` (after the first ``skip[c]``
    of a fixed shuffle), in a fixed shuffled order."""
    chosen: list[int] = []
    for label in sorted(set(labels.tolist())):
        where = np.flatnonzero(labels == label)
        where = where[rng.permutation(len(where))]
        start = (skip or {}).get(label, 0)
        chosen.extend(where[start : start + per_class[label]].tolist())
    return sorted(chosen)


def task_splits(
    spec: TaskSpec, settings: Settings, mean: Sequence[float], std: Sequence[float], data_root: str
) -> dict[str, TaskImages]:
    """The images of a task: ``{"train": ...}`` for a source, ``train`` and ``test`` for a target.

    Sources take up to ``source_images`` examples, spread evenly over the task's labels; targets
    take ``target_train_per_class`` examples of each label for training (at most half of what
    the split has) and up to ``target_test_per_class`` others for testing.
    """
    from t2v_lightning.data.registry import get_task
    from t2v_lightning.data.task import get_targets

    task = get_task(
        spec.dataset,
        data_root,
        train=spec.train,
        input_size=settings.input_size,
        normalize="none",
        classes=spec.mapping(),
    )
    labels = np.asarray(get_targets(task.dataset))
    counts = np.bincount(labels, minlength=spec.num_classes())
    seed = _spec_seed(settings, spec.name)
    if spec.train:
        share = settings.source_images // spec.num_classes()
        picked = _balanced_pick(
            labels, [min(share, int(n)) for n in counts], np.random.default_rng(seed)
        )
        return {"train": TaskImages(task.dataset, picked, labels[picked], mean, std)}
    train_n = [min(settings.target_train_per_class, int(n) // 2) for n in counts]
    test_n = [min(settings.target_test_per_class, int(n) - t) for n, t in zip(counts, train_n)]
    train = _balanced_pick(labels, train_n, np.random.default_rng(seed))
    test = _balanced_pick(
        labels, test_n, np.random.default_rng(seed), skip=dict(enumerate(train_n))
    )
    assert not set(train) & set(test)
    return {
        "train": TaskImages(task.dataset, train, labels[train], mean, std),
        "test": TaskImages(task.dataset, test, labels[test], mean, std),
    }


# ------------------------------------------------------------------------------ the networks
def frozen_prefix(model: nn.Module) -> nn.Sequential:
    """The stem and the first :data:`FROZEN_STAGES` stages: shared by every expert."""
    return nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:FROZEN_STAGES])


def _spec_seed(settings: Settings, name: str) -> int:
    """The seed of one task's image choice and of its expert's new head."""
    return int(hashlib.sha256(f"{settings.seed}:{name}".encode()).hexdigest()[:8], 16)


class ExpertTail(nn.Module):
    """The fine-tuned part of an expert: the last stages, ``conv_head``, ``bn2``, pooling, head.

    Args:
        model: an EfficientNet-Lite0 (timm); its last stages are copied.
        num_classes: outputs of the new classifier (0: none, features only).
        seed: seed of the new classifier's initial weights.
    """

    def __init__(self, model: nn.Module, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.blocks = copy.deepcopy(nn.Sequential(*model.blocks[FROZEN_STAGES:]))
        self.conv_head = copy.deepcopy(model.conv_head)
        self.bn2 = copy.deepcopy(model.bn2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = None
        if num_classes:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.classifier = nn.Linear(model.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.bn2(self.conv_head(self.blocks(x)))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.classifier is not None
        return self.classifier(self.features(x))


@torch.no_grad()
def prefix_features(prefix: nn.Module, images: TaskImages) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen prefix's outputs (float16) and the labels of every image of ``images``."""
    prefix.eval()
    outputs, labels = [], []
    for x, y in DataLoader(images, batch_size=100):
        outputs.append(prefix(x).half())
        labels.append(y)
    return torch.cat(outputs), torch.cat(labels)


def fine_tune(
    tail: ExpertTail, features: torch.Tensor, labels: torch.Tensor, settings: Settings
) -> ExpertTail:
    """Train ``tail`` (every weight, batch norm in training mode) on cached prefix outputs."""
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(tail.parameters(), lr=settings.expert_lr, weight_decay=1e-4)
    steps = settings.expert_epochs * math.ceil(len(labels) / settings.expert_batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.expert_lr, total_steps=steps)
    tail.train()
    for _ in range(settings.expert_epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), settings.expert_batch):
            batch = order[start : start + settings.expert_batch]
            if len(batch) < 2:  # batch norm needs two examples
                continue
            loss = nn.functional.cross_entropy(tail(features[batch].float()), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return tail.eval()


@torch.no_grad()
def tail_features(tail: ExpertTail, features: torch.Tensor) -> np.ndarray:
    tail.eval()
    return torch.cat(
        [tail.features(features[i : i + 200].float()) for i in range(0, len(features), 200)]
    ).numpy()


def linear_probe_error(
    train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, c: float
) -> float:
    """Test error of logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    classifier.fit(train, train_y)
    return float(1.0 - classifier.score(test, test_y))


# ------------------------------------------------------------------------------ the run
def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary))
    os.replace(temporary, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(temporary, path)


def fashion_available(data_root: str) -> bool:
    from t2v_lightning.demo import fashion_available as available

    return available(data_root)


def zoo(quick: bool, data_root: str) -> tuple[tuple[TaskSpec, ...], tuple[TaskSpec, ...]]:
    """The sources and targets of this run (Fashion-MNIST tasks only when its files exist)."""
    if quick:
        return QUICK_SOURCES, QUICK_TARGETS
    if fashion_available(data_root):
        return SOURCES, TARGETS
    log.warning(
        "Fashion-MNIST not found: %d sources without it, and %d targets",
        len(SOURCES_WITHOUT_FASHION) + 4,
        sum(t.dataset != "fashion_mnist" for t in TARGETS),
    )
    sources = tuple(s for s in SOURCES if s.dataset != "fashion_mnist") + SOURCES_WITHOUT_FASHION
    return sources, tuple(t for t in TARGETS if t.dataset != "fashion_mnist")


def run(
    cache: Path,
    settings: Settings,
    sources: Sequence[TaskSpec],
    targets: Sequence[TaskSpec],
    data_root: str = "data",
) -> dict[str, Any]:
    """Build (or read from ``cache``) the experts, the errors and the embeddings.

    Returns:
        ``errors[target][candidate]`` (test error; candidates are the sources' experts and
        :data:`IMAGENET`), ``sources`` and ``targets`` (the artifacts' paths), ``folder``.
    """
    from t2v_lightning.demo import probe_normalization
    from t2v_lightning.probe import get_probe
    from t2v_lightning.task2vec import Task2Vec

    folder = cache / settings.key()
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "settings.json", asdict(settings))
    timings_path = folder / "timings.json"
    timings: dict[str, float] = (
        json.loads(timings_path.read_text()) if timings_path.exists() else {}
    )

    def spent(phase: str, since: float) -> float:
        """Add the seconds since ``since`` to the phase's build time (kept with the cache)."""
        seconds = time.perf_counter() - since
        timings[phase] = timings.get(phase, 0.0) + seconds
        _write_json(timings_path, timings)
        return seconds

    probe = get_probe("efficientnet_lite0")
    mean, std = probe_normalization(probe)
    prefix = frozen_prefix(probe)
    splits = {
        spec.name: task_splits(spec, settings, mean, std, data_root)
        for spec in (*sources, *targets)
    }

    # 1. frozen-prefix outputs of every image, once
    cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, parts in splits.items():
        for part, images in parts.items():
            path = folder / "features" / f"{name}.{part}.safetensors"
            if not path.exists():
                start = time.perf_counter()
                x, y = prefix_features(prefix, images)
                _save_tensors(path, {"x": x, "y": y})
                log.info(
                    "prefix features %s.%s: %d images, %.1f s",
                    name,
                    part,
                    len(y),
                    spent("prefix_features", start),
                )
            stored = _load_tensors(path)
            cached[f"{name}.{part}"] = (stored["x"], stored["y"])

    # 2. the experts: the ImageNet model's tail, and one fine-tuned tail per source
    tails: dict[str, ExpertTail] = {IMAGENET: ExpertTail(probe, 0).eval()}
    for spec in sources:
        path = folder / "experts" / f"{spec.name}.safetensors"
        tail = ExpertTail(probe, spec.num_classes(), _spec_seed(settings, spec.name))
        if path.exists():
            tail.load_state_dict(_load_tensors(path))
        else:
            start = time.perf_counter()
            x, y = cached[f"{spec.name}.train"]
            fine_tune(tail, x, y, settings)
            _save_tensors(path, tail.state_dict())
            log.info(
                "expert %s: fine-tuned on %d images, %.1f s",
                spec.name,
                len(y),
                spent("fine_tuning", start),
            )
        tails[spec.name] = tail.eval()

    # 3. ground truth: linear classifiers on each expert's frozen features
    errors_path = folder / "errors.json"
    errors: dict[str, dict[str, float]] = (
        json.loads(errors_path.read_text()) if errors_path.exists() else {}
    )
    for spec in targets:
        row = errors.setdefault(spec.name, {})
        missing = [name for name in tails if name not in row]
        if not missing:
            continue
        start = time.perf_counter()
        x_train, y_train = cached[f"{spec.name}.train"]
        x_test, y_test = cached[f"{spec.name}.test"]
        for name in missing:
            row[name] = linear_probe_error(
                tail_features(tails[name], x_train),
                y_train.numpy(),
                tail_features(tails[name], x_test),
                y_test.numpy(),
                settings.linear_c,
            )
        _write_json(errors_path, errors)
        log.info(
            "errors on %s (%d train, %d test images): %.1f s",
            spec.name,
            len(y_train),
            len(y_test),
            spent("linear_probes", start),
        )

    # 4. Task2Vec embeddings of every source and target with the ImageNet probe
    task2vec = Task2Vec(
        probe,
        max_samples=settings.embed_samples,
        skip_layers=settings.embed_skip_layers,
        head_epochs=settings.embed_head_epochs,
        batch_size=100,
        seed=settings.seed,
        accelerator="cpu",
        progress_bar=False,
    )
    paths: dict[str, dict[str, Path]] = {"sources": {}, "targets": {}}
    embed_seconds_path = folder / "embed_seconds.json"
    embed_seconds: dict[str, float] = (
        json.loads(embed_seconds_path.read_text()) if embed_seconds_path.exists() else {}
    )
    for kind, specs in (("sources", sources), ("targets", targets)):
        for spec in specs:
            path = folder / "embeddings" / kind / f"{spec.name}.safetensors"
            if not path.exists():
                start = time.perf_counter()
                embedding = task2vec.embed(splits[spec.name]["train"], task_name=spec.name)
                embedding.meta.update(
                    benchmark_task=asdict(spec) | {"classes": spec.mapping()},
                    input_size=settings.input_size,
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                embedding.save(path)
                embed_seconds[spec.name] = spent("task2vec", start)
                _write_json(embed_seconds_path, embed_seconds)
                log.info("embedded %s: %.1f s", spec.name, embed_seconds[spec.name])
            paths[kind][spec.name] = path

    # 5. transferability estimators: one pass of every candidate over each target's training
    # images (the images the linear probes of the ground truth are trained on), timed
    heads: dict[str, nn.Module] = {
        name: tail.classifier for name, tail in tails.items() if tail.classifier is not None
    }
    heads[IMAGENET] = probe.get_classifier()  # the 1000 ImageNet classes
    scores_path = folder / "transferability.json"
    transfer: dict[str, Any] = json.loads(scores_path.read_text()) if scores_path.exists() else {}
    for spec in targets:
        done = transfer.get(spec.name, {}).get("scores", {})
        version = transfer.get(spec.name, {}).get("version")
        if (
            version == SCORES_VERSION
            and set(done) == set(tails)
            and all(set(v) == set(TRANSFERABILITY_METHODS) for v in done.values())
        ):
            continue
        start = time.perf_counter()
        prefix_features(prefix, splits[spec.name]["train"])  # timed only: a candidate's own pass
        entry: dict[str, Any] = {
            "version": SCORES_VERSION,
            "prefix_seconds": time.perf_counter() - start,
            "tail_seconds": {},
            "score_seconds": {m: {} for m in TRANSFERABILITY_METHODS},
            "scores": {},
        }
        x, y = cached[f"{spec.name}.train"]
        entry["images"] = len(y)
        for name, tail in tails.items():
            since = time.perf_counter()
            with torch.no_grad():
                features = torch.from_numpy(tail_features(tail, x))
                logits = heads[name](features)
            entry["tail_seconds"][name] = time.perf_counter() - since
            entry["scores"][name] = {}
            for method in TRANSFERABILITY_METHODS:
                since = time.perf_counter()
                entry["scores"][name][method] = transferability(
                    method, y, features=features, logits=logits
                )
                entry["score_seconds"][method][name] = time.perf_counter() - since
        transfer[spec.name] = entry
        _write_json(scores_path, transfer)
        log.info(
            "transferability on %s (%d candidates, %d images): %.1f s",
            spec.name,
            len(tails),
            len(y),
            spent("transferability", start),
        )
    return {
        "errors": errors,
        "sources": paths["sources"],
        "targets": paths["targets"],
        "folder": folder,
        "build_seconds": timings,
        "transferability": transfer,
        "embed_seconds": embed_seconds,
    }


# ------------------------------------------------------------------------------ the report
def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate(
    errors: Mapping[str, Mapping[str, float]],
    source_embeddings: Mapping[str, TaskEmbedding],
    target_embeddings: Mapping[str, TaskEmbedding],
    alpha: float = DEFAULT_ALPHA,
    distance: str = "cosine",
    datasets: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Compare the Task2Vec pick with always-ImageNet, chance and the oracle on every target.

    Errors are fractions; every ``*_minus_best`` is in percentage points over the oracle (the
    best of all candidates, ImageNet included); ``*_relative`` is that excess over the oracle's
    error, in percent (the paper's measure). With ``datasets`` (task name: dataset), also
    ``same_dataset``: the mean error of the experts trained on the target's dataset (a random
    pick that only matches the domain).
    """
    rows = []
    for target, embedding in target_embeddings.items():
        row_errors = errors[target]
        start = time.perf_counter()
        ranking = select_expert(embedding, dict(source_embeddings), alpha=alpha, distance=distance)  # type: ignore[arg-type]
        select_seconds = time.perf_counter() - start
        experts = list(source_embeddings)
        best = min(row_errors.values())
        oracle = min(row_errors, key=row_errors.__getitem__)
        pick = ranking.best_name
        chance = float(np.mean([row_errors[e] for e in experts]))
        scores = [float(ranking.scores[ranking.names.index(e)]) for e in experts]
        values = {
            "task2vec": row_errors[pick],
            "imagenet": row_errors[IMAGENET],
            "chance": chance,
            "oracle": best,
        }
        if datasets is not None:
            same = [row_errors[e] for e in experts if datasets[e] == datasets[target]]
            values["same_dataset"] = float(np.mean(same)) if same else float("nan")
        rows.append(
            {
                "target": target,
                "pick": pick,
                "oracle": oracle,
                "best_expert": min(experts, key=row_errors.__getitem__),
                "errors": values,
                "minus_best": {k: 100 * (v - best) for k, v in values.items()},
                "relative": {
                    k: 100 * (v - best) / best if best > 0 else float("nan")
                    for k, v in values.items()
                },
                "spearman": _spearman(scores, [row_errors[e] for e in experts]),
                "ranked": ranking.ranked_names,
                "scores": dict(zip(experts, scores)),
                "select_seconds": select_seconds,
            }
        )
    mean = {
        "errors": {k: _nanmean([r["errors"][k] for r in rows]) for k in rows[0]["errors"]},
        "minus_best": {
            k: _nanmean([r["minus_best"][k] for r in rows]) for k in rows[0]["minus_best"]
        },
        "relative": {k: _nanmean([r["relative"][k] for r in rows]) for k in rows[0]["relative"]},
        "spearman": _nanmean([r["spearman"] for r in rows]),
        "task2vec_beats_imagenet": sum(
            r["errors"]["task2vec"] < r["errors"]["imagenet"] for r in rows
        ),
        "imagenet_beats_task2vec": sum(
            r["errors"]["task2vec"] > r["errors"]["imagenet"] for r in rows
        ),
        "picked_best_expert": sum(r["pick"] == r["best_expert"] for r in rows),
    }
    return {"alpha": alpha, "distance": distance, "rows": rows, "mean": mean}


def markdown_table(result: Mapping[str, Any]) -> str:
    """The per-target table (errors in %, differences in points over the oracle)."""
    lines = [
        "| target | oracle (error) | Task2Vec pick | pick − best | ImageNet − best | "
        "chance − best | Spearman |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['target']} | {r['oracle']} ({100 * r['errors']['oracle']:.1f}%) | {r['pick']} | "
            f"{r['minus_best']['task2vec']:+.1f} | {r['minus_best']['imagenet']:+.1f} | "
            f"{r['minus_best']['chance']:+.1f} | {r['spearman']:+.2f} |"
        )
    m = result["mean"]
    lines.append(
        f"| **mean** | {100 * m['errors']['oracle']:.1f}% | "
        f"{m['picked_best_expert']}/{len(result['rows'])} best expert | "
        f"**{m['minus_best']['task2vec']:+.1f}** ({m['relative']['task2vec']:+.0f}%) | "
        f"**{m['minus_best']['imagenet']:+.1f}** ({m['relative']['imagenet']:+.0f}%) | "
        f"**{m['minus_best']['chance']:+.1f}** ({m['relative']['chance']:+.0f}%) | "
        f"{m['spearman']:+.2f} |"
    )
    return "\n".join(lines)


def plot(result: Mapping[str, Any], errors: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Per target: every expert's error (grey), the oracle, the Task2Vec pick, ImageNet, chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.75 * len(rows) + 2), 4.2))
    for i, r in enumerate(rows):
        values = [100 * v for k, v in errors[r["target"]].items() if k != IMAGENET]
        axis.scatter(
            [i] * len(values),
            values,
            color="0.75",
            s=14,
            zorder=1,
            label="fine-tuned experts" if i == 0 else None,
        )
    x = np.arange(len(rows))
    for key, marker, color, label in (
        ("oracle", "v", "black", "oracle (best of all)"),
        ("imagenet", "s", "tab:blue", "always ImageNet"),
        ("chance", "_", "tab:gray", "chance (mean of experts)"),
        ("task2vec", "o", "tab:red", f"Task2Vec pick (α = {result['alpha']:g})"),
    ):
        axis.scatter(
            x,
            [100 * r["errors"][key] for r in rows],
            marker=marker,
            s=60 if key != "chance" else 200,
            color=color,
            label=label,
            zorder=3,
            facecolors="none" if key == "task2vec" else None,
            linewidths=2 if key in ("task2vec", "chance") else 1,
        )
    axis.set_xticks(x)
    axis.set_xticklabels(
        [r["target"].removeprefix("t_") for r in rows], rotation=40, ha="right", fontsize=8
    )
    axis.set_ylabel("target test error (%), linear probe")
    axis.set_title("Expert selection: Task2Vec pick vs best expert, per target task")
    axis.legend(fontsize=7, loc="upper left")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)


def _weighted_tau(scores: Sequence[float], errors: Sequence[float]) -> float:
    """scipy's weighted Kendall τ (hyperbolic weights) between a higher-is-better score and the
    negated error: agreement among the best candidates counts most."""
    from scipy.stats import weightedtau

    if len(scores) < 3 or len(set(scores)) < 2 or len(set(errors)) < 2:
        return float("nan")
    return float(weightedtau(np.asarray(scores, float), -np.asarray(errors, float)).statistic)


METHOD_LABELS = {
    "task2vec": "Task2Vec",
    "logme": "LogME",
    "leep": "LEEP",
    "nce": "NCE",
    "hscore": "H-score",
    "hscore_shrinkage": "H-score (shrinkage)",
}


def _two_stage(method: str) -> str | None:
    """The estimator of a two-stage key (``task2vec+logme@3`` → ``logme``), else None."""
    return method.split("+")[1].split("@")[0] if "@" in method else None


def _method_label(method: str, top_k: int) -> str:
    """``task2vec+logme@3`` → ``Task2Vec top 3 → LogME``."""
    estimator = _two_stage(method)
    if estimator is not None:
        return f"Task2Vec top {top_k} → {METHOD_LABELS[estimator]}"
    return METHOD_LABELS[method]


def evaluate_methods(
    errors: Mapping[str, Mapping[str, float]],
    result: Mapping[str, Any],
    transfer: Mapping[str, Any],
    embed_seconds: Mapping[str, float],
    sources: Sequence[str],
    top_k: int = TOP_K,
) -> dict[str, Any]:
    """Task2Vec, every transferability estimator, and Task2Vec's top ``top_k`` reranked by each.

    Per method and target: the pick (the estimators pick among every candidate, ImageNet
    included; Task2Vec and the two-stage picks among the fine-tuned experts), its error over the
    oracle in points and relative, whether it is the oracle; Spearman and weighted Kendall τ
    between the method's scores and the negated errors *over the fine-tuned experts* (the set
    every method ranks); the cost of the pick for that target: candidate forward passes over the
    target's training images and seconds. A candidate's pass is the shared frozen prefix (timed
    once per target, on the images) plus its own tail: every candidate is charged the full
    pass, as separate networks would be. Task2Vec is charged the target's embedding and the
    ranking; its experts' embeddings are computed once, whatever the number of targets, and
    are reported apart (``per_expert_once_seconds``).
    """
    methods = [
        "task2vec",
        *TRANSFERABILITY_METHODS,
        *(f"task2vec+{m}@{top_k}" for m in TRANSFERABILITY_METHODS),
    ]
    per_target: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for row in result["rows"]:
        target = row["target"]
        row_errors = errors[target]
        oracle = row["oracle"]
        cost = transfer[target]
        # In name order, as the cache stores them: a fresh build and a rerun from the cache then
        # break exact ties alike (H-score saturates at classes - 1 on these small targets).
        candidates = sorted(cost["scores"])
        experts = [e for e in sources if e in row_errors]
        passes = {c: cost["prefix_seconds"] + cost["tail_seconds"][c] for c in candidates}
        ranked = row["ranked"]
        select_seconds = float(row["select_seconds"])
        embed = float(embed_seconds.get(target, float("nan")))

        def entry(
            pick: str,
            scores: Mapping[str, float],
            passes_n: int,
            seconds: float,
            fixed: float,
            per_candidate: float,
            row_errors: Mapping[str, float] = row_errors,
            experts: Sequence[str] = experts,
            target: str = target,
            oracle: str = oracle,
        ) -> dict[str, Any]:
            best = min(row_errors.values())
            chosen = [scores[e] for e in experts]
            truth = [row_errors[e] for e in experts]
            return {
                "target": target,
                "pick": pick,
                "error": row_errors[pick],
                "minus_best": 100 * (row_errors[pick] - best),
                "relative": 100 * (row_errors[pick] - best) / best if best > 0 else float("nan"),
                "picked_oracle": pick == oracle,
                "spearman": -_spearman(chosen, truth),
                "weighted_tau": _weighted_tau(chosen, truth),
                "forward_passes": passes_n,
                "seconds": seconds,
                "fixed_seconds": fixed,
                "per_candidate_seconds": per_candidate,
            }

        task2vec_scores = {e: -float(v) for e, v in row["scores"].items()}  # higher is better
        per_target["task2vec"].append(
            entry(
                row["pick"],
                task2vec_scores,
                0,
                embed + select_seconds,
                embed,
                select_seconds / max(len(experts), 1),
            )
        )
        for method in TRANSFERABILITY_METHODS:
            scores = {c: float(cost["scores"][c][method]) for c in candidates}
            pick = max(candidates, key=lambda c: scores[c])  # ties: the first candidate
            spent = {c: passes[c] + cost["score_seconds"][method][c] for c in candidates}
            total = float(sum(spent.values()))
            per_target[method].append(
                entry(pick, scores, len(candidates), total, 0.0, total / len(candidates))
            )
            shortlist = ranked[:top_k]
            # the reranked ranking: the shortlist by the estimator (stable: ties keep Task2Vec's
            # order), the rest in Task2Vec's order; the pick is its first
            order = sorted(shortlist, key=lambda c: -scores[c]) + ranked[top_k:]
            pick = order[0]
            combined = {c: float(len(order) - i) for i, c in enumerate(order)}
            rerank = float(sum(spent[c] for c in shortlist))
            per_target[f"task2vec+{method}@{top_k}"].append(
                entry(
                    pick,
                    combined,
                    len(shortlist),
                    embed + select_seconds + rerank,
                    embed + rerank,
                    select_seconds / max(len(experts), 1),
                )
            )
    source_embeds = [float(embed_seconds[s]) for s in sources if s in embed_seconds]
    summary = {}
    for method, rows in per_target.items():
        summary[method] = {
            key: _nanmean([float(r[key]) for r in rows])
            for key in (
                "minus_best",
                "relative",
                "spearman",
                "weighted_tau",
                "forward_passes",
                "seconds",
                "fixed_seconds",
                "per_candidate_seconds",
            )
        } | {"picked_oracle": sum(bool(r["picked_oracle"]) for r in rows), "targets": len(rows)}
    summary["task2vec"]["per_expert_once_seconds"] = (
        float(np.mean(source_embeds)) if source_embeds else float("nan")
    )
    return {
        "top_k": top_k,
        "candidates": len(next(iter(transfer.values()))["scores"]),
        "per_target": per_target,
        "mean": summary,
    }


def methods_table(methods: Mapping[str, Any]) -> str:
    """One row per method: regret, agreement with the ground truth, cost per target."""
    lines = [
        "| method | pick − best (points) | relative | picks = oracle | Spearman | weighted τ | "
        "forward passes / target | seconds / target | growth with N candidates |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, m in methods["mean"].items():
        name = _method_label(method, methods["top_k"])
        if method == "task2vec":
            passes = "1 probe embed"
            growth = (
                f"{m['fixed_seconds']:.1f} s + N × {1000 * m['per_candidate_seconds']:.2f} ms"
                f" (+ {m['per_expert_once_seconds']:.1f} s per expert, once)"
            )
        elif _two_stage(method) is not None:
            passes = f"1 probe embed + {m['forward_passes']:.0f}"
            growth = (
                f"{m['fixed_seconds']:.1f} s + N × {1000 * m['per_candidate_seconds']:.2f} ms"
                f" (+ Task2Vec's experts, once)"
            )
        else:
            passes = f"{m['forward_passes']:.0f} (N)"
            growth = f"N × {m['per_candidate_seconds']:.2f} s"
        lines.append(
            f"| {name} | {m['minus_best']:+.2f} | {m['relative']:+.0f}% | "
            f"{m['picked_oracle']}/{m['targets']} | {m['spearman']:+.2f} | "
            f"{m['weighted_tau']:+.2f} | {passes} | {m['seconds']:.2f} | {growth} |"
        )
    return "\n".join(lines)


def plot_regret_vs_cost(
    methods: Mapping[str, Any], imagenet: float, chance: float, path: Path, title: str
) -> None:
    """Mean points of error over the oracle against seconds per target, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9.5, 4.5))
    colors = {
        "task2vec": "tab:red",
        "logme": "tab:blue",
        "leep": "tab:green",
        "nce": "tab:purple",
        "hscore": "tab:brown",
        "hscore_shrinkage": "tab:orange",
    }
    for method, m in methods["mean"].items():
        estimator = _two_stage(method)
        base, two_stage = estimator or method, estimator is not None
        label = _method_label(method, methods["top_k"])
        axis.scatter(
            [m["seconds"]],
            [m["minus_best"]],
            color=colors[base],
            s=70,
            marker="D" if two_stage else ("*" if method == "task2vec" else "o"),
            facecolors="none" if two_stage else None,
            linewidths=1.5,
            label=label,
            zorder=3,
        )
    axis.axhline(imagenet, color="tab:blue", linestyle="--", linewidth=1, label="always ImageNet")
    axis.axhline(chance, color="0.5", linestyle=":", linewidth=1, label="chance (mean expert)")
    axis.set_xscale("log")
    axis.set_xlabel(f"seconds per target ({methods['candidates']} candidates; log scale)")
    axis.set_ylabel("mean test error over the oracle (points)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)


def diagnosis(
    errors: Mapping[str, Mapping[str, float]],
    sources: Mapping[str, TaskEmbedding],
    targets: Mapping[str, TaskEmbedding],
) -> list[dict[str, Any]]:
    """The headline numbers for other values of α and other distances (not tuned: reported)."""
    out = []
    # The other distances divide by the Fisher and refuse its exact zeros (dead filters).
    for distance in ("cosine", "entropy"):
        for alpha in (0.0, 0.15, 0.5, 1.0):
            try:
                m = evaluate(errors, sources, targets, alpha, distance)["mean"]
            except ValueError as err:  # distances that refuse zero Fisher entries
                out.append({"distance": distance, "alpha": alpha, "error": str(err)})
                continue
            out.append(
                {
                    "distance": distance,
                    "alpha": alpha,
                    "task2vec_minus_best": m["minus_best"]["task2vec"],
                    "spearman": m["spearman"],
                    "picked_best": m["picked_best_expert"],
                }
            )
    return out


def _shown(path: Path) -> str:
    """``path`` relative to the checkout when inside it (reports do not name the machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        default=str(ROOT / "bench" / "cache" / "model_selection"),
        help="folder of cached features, experts, artifacts and errors",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="folder of the report (results.json, table.md, figures; default "
        "bench/results/model_selection, or model_selection_quick with --quick)",
    )
    parser.add_argument("--data_root", default="data", help="data folder (Fashion-MNIST)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 experts, 2 targets, tiny sizes: checks that everything runs",
    )
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="α of the headline")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lightning", "lightning.pytorch", "t2v_lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(options.threads)
    start = time.perf_counter()
    sources, targets = zoo(options.quick, options.data_root)
    settings = Settings(
        **(QUICK if options.quick else {}),
        sources=tuple(s.name for s in sources),
        targets=tuple(t.name for t in targets),
    )
    built = run(Path(options.cache), settings, sources, targets, options.data_root)
    source_embeddings = {n: TaskEmbedding.load(p) for n, p in built["sources"].items()}
    target_embeddings = {n: TaskEmbedding.load(p) for n, p in built["targets"].items()}
    datasets = {spec.name: spec.dataset for spec in (*sources, *targets)}
    result = evaluate(
        built["errors"], source_embeddings, target_embeddings, options.alpha, datasets=datasets
    )
    checks = diagnosis(built["errors"], source_embeddings, target_embeddings)
    methods = evaluate_methods(
        built["errors"],
        result,
        built["transferability"],
        built["embed_seconds"],
        [s.name for s in sources],
    )
    seconds = time.perf_counter() - start
    output = Path(
        options.output
        or ROOT
        / "bench"
        / "results"
        / ("model_selection_quick" if options.quick else "model_selection")
    )
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    figure = output / "model_selection.png"
    plot(result, built["errors"], figure)
    method_table = methods_table(methods)
    run_kind = "smoke run (--quick), not a result" if options.quick else "full zoo"
    plot_regret_vs_cost(
        methods,
        result["mean"]["minus_best"]["imagenet"],
        result["mean"]["minus_best"]["chance"],
        output / "regret_vs_cost.png",
        f"Expert selection: regret against cost per target — {run_kind}\n"
        f"{len(sources)} experts + ImageNet, {len(targets)} targets, torch threads: {options.threads}",
    )
    report = {
        "settings": asdict(settings),
        "cache": _shown(built["folder"]),
        "seconds": seconds,
        "build_seconds": built["build_seconds"],
        "load_average": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {options.threads} threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "errors": built["errors"],
        "result": result,
        "diagnosis": checks,
        "methods": methods,
        "transferability": built["transferability"],
        "run": run_kind,
    }
    _write_json(output / "results.json", report)
    (output / "table.md").write_text(table + "\n\n" + method_table + "\n")
    print(table)
    print(
        f"\nmethods ({run_kind}; Spearman and weighted τ over the fine-tuned experts; "
        f"seconds per target as measured when the scores were computed):"
    )
    print(method_table)
    print(
        "\nother α and distances (mean pick − best in points, Spearman, targets whose pick "
        "is the best fine-tuned expert):"
    )
    for c in checks:
        if "error" in c:
            print(f"  {c['distance']:<18} α={c['alpha']:<5g} {c['error'][:80]}")
        else:
            print(
                f"  {c['distance']:<18} α={c['alpha']:<5g} {c['task2vec_minus_best']:+6.2f}  "
                f"{c['spearman']:+.2f}  {c['picked_best']}/{len(target_embeddings)}"
            )
    m = result["mean"]
    print(
        f"\nmean test error: Task2Vec pick {100 * m['errors']['task2vec']:.2f}%, always ImageNet "
        f"{100 * m['errors']['imagenet']:.2f}%, chance {100 * m['errors']['chance']:.2f}%, "
        f"oracle {100 * m['errors']['oracle']:.2f}%; a random expert of the target's dataset "
        f"{100 * m['errors']['same_dataset']:.2f}% (pick − best: Task2Vec "
        f"{m['minus_best']['task2vec']:+.2f}, same dataset {m['minus_best']['same_dataset']:+.2f} "
        f"points)"
    )
    build = ", ".join(f"{k} {v:.0f} s" for k, v in built["build_seconds"].items())
    print(
        f"{len(sources)} experts + ImageNet, {len(targets)} targets; this run {seconds:.0f} s "
        f"(load average {os.getloadavg()[0]:.1f}); building the cache took {build}; report in "
        f"{output}, cache in {built['folder']}"
    )
    return report


if __name__ == "__main__":
    main()
