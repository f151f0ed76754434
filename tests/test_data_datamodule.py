"""The dataset registry and TaskDataModule: names, errors, sampling, loaders, LightningCLI."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from t2v_lightning.data.datamodule import TaskDataModule, sample_indices
from t2v_lightning.data.registry import (
    describe_task,
    download_dataset,
    get_task,
    list_datasets,
    num_tasks,
    register_dataset,
)
from t2v_lightning.data.task import (
    DatasetNotFoundError,
    ImageTensorDataset,
    Task,
    get_targets,
)

EXPECTED_NAMES = {
    "mnist",
    "fashion_mnist",
    "kmnist",
    "letters",
    "cifar10",
    "cifar100",
    "stl10",
    "split_mnist",
    "split_cifar",
    "digits",
    "mnist_subset",
    "cub",
    "inat2018",
    "cub_inat2018",
    "digits_0_4",
    "digits_5_9",
    "fashion_mnist_tops",
    "fashion_mnist_footwear",
}


def test_registry_lists_the_datasets() -> None:
    names = list_datasets()
    assert set(names) >= EXPECTED_NAMES and names == sorted(names)
    assert num_tasks("split_mnist", "x") == 5 and num_tasks("split_cifar", "x") == 11
    assert num_tasks("mnist", "x") == 1 and num_tasks("cub", "x") == 25


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*cub_inat2018.*digits"):
        get_task("imagenet", "data")
    with pytest.raises(ValueError, match="unknown dataset"):
        TaskDataModule(name="imagenet")


def test_single_task_datasets_take_no_task_id() -> None:
    assert get_task("digits", "x", task_id=0).num_classes == 10
    with pytest.raises(ValueError, match="single task"):
        get_task("digits", "x", task_id=1)
    with pytest.raises(ValueError, match="normalize"):
        get_task("digits", "x", normalize="cifar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        get_task("digits", "x", classes=[3, 12])


def test_describe_matches_the_built_task() -> None:
    for name in ("digits", "digits_even", "digits_5_9"):
        info = describe_task(name, "x")
        task = get_task(name, "x")
        assert (info.name, info.num_classes) == (task.name, task.num_classes)
        assert info.metadata["class_names"] == task.metadata["class_names"]
    info = describe_task("digits", "x", classes={0: 0, 8: 0, 1: 1, 7: 1})
    assert info.num_classes == 2 and info.metadata["class_names"] == ["0 + 8", "1 + 7"]


def test_register_dataset() -> None:
    @register_dataset("toy_for_registry_test", replace=True, summary="toy")
    def build(
        root: str,
        task_id: int | None,
        train: bool,
        input_size: int | None,
        download: bool,
        normalize: str,
    ) -> Task:
        data = ImageTensorDataset(torch.zeros(6, 4, 4), [0, 1, 2, 0, 1, 2])
        return Task(data, 3, "toy", {"dataset": "toy_for_registry_test"})

    assert "toy_for_registry_test" in list_datasets()
    assert get_task("toy_for_registry_test", "x").num_classes == 3
    assert TaskDataModule("toy_for_registry_test").num_classes == 3
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy_for_registry_test")(build)
    with pytest.raises(ValueError, match="nothing to download"):
        download_dataset("toy_for_registry_test", "x")
    with pytest.raises(ValueError, match=r"download_cub.sh"):
        download_dataset("cub_inat2018", "x")


def test_sample_indices_balanced_with_replacement() -> None:
    targets = [0] * 90 + [1] * 10
    drawn = sample_indices(targets, 4000, balanced=True, seed=0)
    counts = Counter(targets[i] for i in drawn)
    assert abs(counts[0] - counts[1]) < 300  # ~2000 each, not 3600 / 400
    assert sample_indices(targets, 50, True, seed=1) == sample_indices(targets, 50, True, seed=1)
    assert sample_indices(targets, 50, True, seed=1) != sample_indices(targets, 50, True, seed=2)
    assert len(sample_indices(targets, None, True, seed=0)) == 100


def test_sample_indices_subset_without_replacement() -> None:
    drawn = sample_indices(list(range(10)), 7, balanced=False, seed=0)
    assert len(drawn) == len(set(drawn)) == 7
    assert sorted(sample_indices(list(range(10)), 99, balanced=False, seed=0)) == list(range(10))
    with pytest.raises(ValueError, match="no examples"):
        sample_indices([], 3, balanced=True, seed=0)


def test_datamodule_properties_before_any_data_is_read(tmp_path: Path) -> None:
    dm = TaskDataModule(name="mnist", root=str(tmp_path))  # no files: nothing is read yet
    assert dm.num_classes == 10 and dm.task_name == "MNIST"
    assert dm.task_metadata["class_names"][0] == "0"
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        dm.setup("fit")
    cub = TaskDataModule(name="cub_inat2018", root=str(tmp_path), task_id=5)
    assert cub.num_classes == 4 and cub.task_metadata["taxonomy"]["order"] == "Apodiformes"
    with pytest.raises(ValueError, match=r"0 <= task_id <= 231"):
        TaskDataModule(name="cub_inat2018", root=str(tmp_path), task_id=400)


def test_datamodule_loaders() -> None:
    dm = TaskDataModule(name="digits_0_4", input_size=16, batch_size=32, max_samples=100, seed=3)
    dm.setup("fit")
    assert len(dm.train_dataset) == 100
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 3, 16, 16) and labels.dtype == torch.long
    assert int(labels.max()) < dm.num_classes
    # fixed sample, served in the same order every time
    first = torch.cat([y for _, y in dm.train_dataloader()])
    again = torch.cat([y for _, y in dm.train_dataloader()])
    assert torch.equal(first, again)
    full = get_targets(dm.task.dataset)
    assert first.tolist() == [full[i] for i in dm.train_indices]
    val = dm.val_dataloader()
    assert len(val.dataset) == len(get_task("digits_0_4", "x", train=False).dataset)
    meta = dm.task_metadata
    assert meta["max_samples"] == 100 and meta["seed"] == 3 and meta["split"] == "train"
    json.dumps(meta)


def test_datamodule_balanced_versus_subset() -> None:
    balanced = TaskDataModule(name="digits", max_samples=500, balanced_sampling=True)
    subset = TaskDataModule(name="digits", max_samples=500, balanced_sampling=False)
    assert len(set(subset.train_indices)) == 500
    assert len(set(balanced.train_indices)) < 500  # drawn with replacement


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"max_samples": 0}, "max_samples"),
        ({"input_size": 0}, "input_size"),
        ({"normalize": "cifar"}, "normalize"),
        ({"name": "split_mnist"}, "task_id"),
    ],
)
def test_datamodule_validates_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TaskDataModule(**kwargs)  # type: ignore[arg-type]


class LinearModel(pl.LightningModule):
    """A linear classifier whose output size comes from the datamodule through the CLI."""

    def __init__(self, num_classes: int = 2, input_size: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * input_size * input_size, num_classes))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self.net(images), labels)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        images, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(images), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LinkingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def test_lightning_cli_links_num_classes_and_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["t2v"])
    cli = LinkingCLI(
        LinearModel,
        TaskDataModule,
        run=False,
        args=[
            "--data.name=digits_5_9",
            "--data.max_samples=64",
            "--data.batch_size=16",
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ],
    )
    assert cli.model.net[1].out_features == 5
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.state.finished
