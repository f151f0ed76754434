"""Task2Vec end to end: layout, references, determinism, the caller's probe, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from t2v_lightning import Task2Vec, TaskEmbedding, get_probe
from t2v_lightning.features import DatasetError
from t2v_lightning.fisher.estimators import embedded_layers
from t2v_lightning.fisher.montecarlo import MonteCarloSettings
from t2v_lightning.fisher.variational import VariationalSettings
from t2v_lightning.labels import read_labels, select_examples
from t2v_lightning.probe import ProbeError
from tests.conftest import ToyImages, randomise_batchnorm
from tests.reference import brute_force_fisher

FAST = {"progress_bar": False, "accelerator": "cpu", "batch_size": 16}
SKIP_RTOL = 1e-4  # prefix cached vs. computed in place: float32 reassociation only


def sequential_cnn(num_classes: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 6, 3, padding=1))
    model.add_module("bn1", nn.BatchNorm2d(6))
    model.add_module("relu1", nn.ReLU(inplace=True))
    model.add_module("conv2", nn.Conv2d(6, 8, 3, stride=2, padding=1))
    model.add_module("bn2", nn.BatchNorm2d(8))
    model.add_module("relu2", nn.ReLU(inplace=True))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(8, num_classes))
    return randomise_batchnorm(model).eval()


def test_resnet18_embeds_end_to_end_with_the_reference_layout(tmp_path) -> None:
    probe = get_probe("resnet18", pretrained=False)
    data = ToyImages(n=120, classes=4, size=32)
    embedding = Task2Vec(probe, max_samples=120, head_epochs=1, **FAST).embed(data, task_name="toy")
    expected = [
        (name, module.weight.shape[0])
        for name, module in probe.named_modules()
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
    ]
    assert list(embedding.layers) == [name for name, _ in expected]
    assert "fc" not in embedding.layers
    assert len(embedding) == sum(size for _, size in expected) == 9600
    for name, size in expected:
        start, stop = embedding.layers[name]
        assert stop - start == size
    # A randomly initialised ResNet on low-diversity toy images has dead ReLU channels (up to
    # ~30% in layer4, whose maps are 1x1 at 32 px): their Fisher is exactly zero.
    assert torch.isfinite(embedding.hessian).all() and (embedding.hessian >= 0).all()
    assert (embedding.hessian > 0).double().mean() > 0.7
    assert torch.equal(embedding.scale, torch.ones(9600))
    meta = embedding.meta
    assert meta["probe"] == "resnet18" and meta["method"] == "montecarlo"
    assert meta["estimator"] == "per_sample" and meta["num_samples"] == 120
    assert meta["num_classes"] == 4 and meta["task_name"] == "toy" and meta["seed"] == 0
    assert len(meta["probe_fingerprint"]) == 32 and "torch" in meta["versions"]
    path = embedding.save(tmp_path / "toy.safetensors")
    loaded = TaskEmbedding.load(path)
    assert torch.equal(loaded.hessian, embedding.hessian) and loaded.layers == embedding.layers
    assert loaded.meta == embedding.meta


def test_model_as_it_is_equals_brute_force_fisher() -> None:
    """reset_head=False, head_epochs=0, all examples once: exactly the model's Fisher."""
    probe = sequential_cnn()
    data = ToyImages(n=12, classes=3, size=6)
    embedding = Task2Vec(
        probe,
        estimator="exact",
        reset_head=False,
        head_epochs=0,
        max_samples=None,
        balanced_sampling=False,
        **FAST,
    ).embed(data)
    reference = brute_force_fisher(probe, data.images, "fc")
    layers = embedded_layers(probe, "fc")
    expected = torch.cat([reference[name] for name, _ in layers]).float()
    torch.testing.assert_close(embedding.hessian, expected, rtol=1e-5, atol=0)


def test_skipped_prefix_gives_the_tail_of_the_full_embedding() -> None:
    probe = sequential_cnn()
    data = ToyImages(n=30, classes=3, size=8)
    settings = {"estimator": "exact", "max_samples": 30, "head_epochs": 2, **FAST}
    full = Task2Vec(probe, skip_layers=0, **settings).embed(data)
    tail = Task2Vec(probe, skip_layers=3, **settings).embed(data)
    assert list(tail.layers) == ["conv2", "bn2"]
    assert tail.meta["skipped"] == ["conv1", "bn1", "relu1"]
    start = full.layers["conv2"][0]
    torch.testing.assert_close(tail.hessian, full.hessian[start:], rtol=SKIP_RTOL, atol=0)


def test_same_seed_is_bit_identical_and_another_seed_differs() -> None:
    probe = sequential_cnn()
    data = ToyImages(n=40, classes=3, size=8)
    first = Task2Vec(probe, max_samples=40, head_epochs=1, seed=0, **FAST).embed(data)
    again = Task2Vec(probe, max_samples=40, head_epochs=1, seed=0, **FAST).embed(data)
    other = Task2Vec(probe, max_samples=40, head_epochs=1, seed=1, **FAST).embed(data)
    assert torch.equal(first.hessian, again.hessian)
    assert not torch.equal(first.hessian, other.hessian)


def test_batch_size_does_not_change_the_per_sample_estimate() -> None:
    probe = sequential_cnn()
    data = ToyImages(n=30, classes=3, size=8)
    settings = {"max_samples": 30, "head_epochs": 0, "progress_bar": False, "accelerator": "cpu"}
    small = Task2Vec(probe, batch_size=7, **settings).embed(data)
    large = Task2Vec(probe, batch_size=30, **settings).embed(data)
    torch.testing.assert_close(small.hessian, large.hessian, rtol=1e-5, atol=0)


def test_the_callers_probe_is_left_exactly_as_it_was() -> None:
    probe = sequential_cnn()
    probe.train()
    probe.conv1.weight.requires_grad_(False)
    state = {name: value.clone() for name, value in probe.state_dict().items()}
    flags = [p.requires_grad for p in probe.parameters()]
    attributes = {name: set(vars(module)) for name, module in probe.named_modules()}
    Task2Vec(probe, max_samples=20, head_epochs=1, skip_layers=2, **FAST).embed(
        ToyImages(n=20, classes=2, size=8)
    )
    assert probe.training and all(m.training for m in probe.modules())
    assert [p.requires_grad for p in probe.parameters()] == flags
    for name, value in probe.state_dict().items():
        assert torch.equal(value, state[name]), name
    for name, module in probe.named_modules():
        assert set(vars(module)) == attributes[name], name
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks


def test_balanced_sampling_draws_classes_evenly() -> None:
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    selection = select_examples(labels, 3000, balanced=True, seed=0)
    counts = torch.bincount(labels[selection], minlength=3).double()
    # each class ~1000 draws; 4 standard deviations of a binomial(3000, 1/3) is ~104
    assert (counts - 1000).abs().max() < 104
    assert selection.numel() == 3000


class ShiftedLabels(torch.utils.data.TensorDataset):
    """A TensorDataset subclass whose items are not its tensors' rows."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, label = super().__getitem__(index)
        return inputs, label + 1


def test_labels_of_a_tensor_dataset_are_read_as_its_items_give_them(monkeypatch) -> None:
    inputs, labels = torch.randn(7, 2), torch.tensor([0, 2, 1, 2, 0, 1, 1])
    plain = torch.utils.data.TensorDataset(inputs, labels)
    shifted = ShiftedLabels(inputs, labels)
    assert torch.equal(read_labels(shifted), labels + 1)  # a subclass: item by item
    with monkeypatch.context() as patch:  # a plain one: taken from the tensor, no item read
        patch.setattr("t2v_lightning.labels._read_all", lambda *args: pytest.fail("items read"))
        assert torch.equal(read_labels(plain), labels)
    column = torch.utils.data.TensorDataset(inputs, labels.unsqueeze(1))  # (N, 1): read per item
    assert torch.equal(read_labels(column), labels)
    with pytest.raises(DatasetError, match="labels must be integers"):
        read_labels(torch.utils.data.TensorDataset(inputs, labels.float()))


def test_max_samples_without_balancing_uses_distinct_examples() -> None:
    chosen = select_examples(torch.arange(100) % 4, 30, balanced=False, seed=0)
    assert chosen.numel() == 30 and chosen.unique().numel() == 30
    assert torch.equal(chosen, chosen.sort().values)  # visited in dataset order
    shuffled = select_examples(torch.arange(100) % 4, 30, balanced=False, seed=0, shuffle=True)
    assert torch.equal(shuffled.sort().values, chosen) and not torch.equal(shuffled, chosen)


class Items(torch.utils.data.Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "empty"),
        ([(torch.zeros(3, 8, 8), 1)] * 4, "single class"),
        ([(torch.zeros(3, 8, 8), 0.5), (torch.zeros(3, 8, 8), 1.0)], "integers"),
        ([(torch.zeros(3, 8, 8), -1), (torch.zeros(3, 8, 8), 1)], "non-negative"),
        ([(torch.zeros(3, 8, 8), 0), (torch.full((3, 8, 8), math.nan), 1)], "NaN or infinite"),
        ([("not a tensor", 0), ("still not", 1)], "must be tensors"),
        ([torch.zeros(3), torch.zeros(3)], r"\(input, label\) pairs"),
    ],
    ids=[
        "empty",
        "single-class",
        "float-labels",
        "negative",
        "non-finite",
        "not-tensor",
        "no-label",
    ],
)
def test_bad_datasets_are_refused_clearly(items: list, message: str) -> None:
    t2v = Task2Vec(sequential_cnn(), max_samples=4, head_epochs=0, **FAST)
    with pytest.raises(DatasetError, match=message):
        t2v.embed(Items(items))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_samples": 0}, ValueError, "max_samples"),
        ({"max_samples": -5}, ValueError, "max_samples"),
        ({"method": "magic"}, ValueError, "method"),
        ({"estimator": "guess"}, ValueError, "estimator"),
        ({"head": "nope"}, ProbeError, "no module named 'nope'"),
        ({"skip_layers": 9}, ProbeError, "skip_layers=9"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"head_optimizer": "lbfgs"}, ValueError, "head_optimizer"),
        ({"mc_samples": 0}, ValueError, "mc_samples"),
    ],
)
def test_bad_arguments_are_refused_clearly(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Task2Vec(sequential_cnn(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"method": "variational", "estimator": "batch"}, "estimator"),
        ({"method": "variational", "mc_samples": 4}, "mc_samples"),
        ({"method": "variational", "checkpoint_dir": "ckpts"}, "checkpoint_dir"),
        ({"method": "variational", "checkpoint_every_n_steps": 5}, "checkpoint_every_n_steps"),
        ({"method": "variational", "resume_from": "last"}, "resume_from"),
        ({"variational_epochs": 3}, "variational_epochs"),
        ({"method": "montecarlo", "variational_lr": 0.1}, "variational_lr"),
        ({"variational_head_lr": 0.0}, "variational_head_lr"),
        ({"variational_beta": 1.0}, "variational_beta"),
    ],
)
def test_an_option_of_the_other_method_is_refused_by_name(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}=.* is an option of method="):
        Task2Vec(sequential_cnn(), **kwargs)


def test_each_method_accepts_its_own_options() -> None:
    monte_carlo = Task2Vec(sequential_cnn(), estimator="exact", mc_samples=2, checkpoint_dir="c")
    assert monte_carlo.settings == MonteCarloSettings("exact", 2, checkpoint_dir="c")
    variational = Task2Vec(sequential_cnn(), method="variational", variational_epochs=3)
    assert variational.settings == VariationalSettings(epochs=3)


def test_without_head_fitting_no_feature_pass_and_one_trainer_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lightning.pytorch as pl

    import t2v_lightning.prepare as prepare

    built: list[pl.Trainer] = []
    original = pl.Trainer.__init__

    def counting(self: pl.Trainer, *args: object, **kwargs: object) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    def no_features(*args: object, **kwargs: object) -> None:
        raise AssertionError("the penultimate features were computed")

    monkeypatch.setattr(pl.Trainer, "__init__", counting)
    monkeypatch.setattr(prepare, "head_inputs", no_features)
    data = ToyImages(n=12, classes=3, size=8)
    Task2Vec(sequential_cnn(), reset_head=False, head_epochs=0, max_samples=None, **FAST).embed(
        data
    )
    assert len(built) == 1  # the Fisher pass
    monkeypatch.undo()
    built.clear()
    monkeypatch.setattr(pl.Trainer, "__init__", counting)
    Task2Vec(sequential_cnn(), head_epochs=1, max_samples=None, **FAST).embed(data)
    assert len(built) == 2  # head fitting and the Fisher pass


def test_kept_head_must_cover_the_labels() -> None:
    t2v = Task2Vec(sequential_cnn(num_classes=2), reset_head=False, head_epochs=0, **FAST)
    with pytest.raises(ProbeError, match="2 outputs"):
        t2v.embed(ToyImages(n=9, classes=3, size=8))


def test_probe_whose_forward_is_not_a_chain_refuses_skip_layers(tiny_convnet: nn.Module) -> None:
    # Its forward adds a residual taken from inside the skipped part, so no split works.
    t2v = Task2Vec(tiny_convnet, skip_layers=4, max_samples=6, **FAST)
    with pytest.raises(ProbeError, match="skip_layers is not supported for TinyConvNet"):
        t2v.embed(ToyImages(n=6, classes=3, size=8))


def test_the_command_lines_model_refuses_an_option_of_the_other_method() -> None:
    from t2v_lightning.probe_classifier import ProbeClassifier

    with pytest.raises(ValueError, match=r"^estimator='exact' is an option of method='montecarlo'"):
        ProbeClassifier("resnet18", method="variational", estimator="exact")
    with pytest.raises(ValueError, match=r"^variational_epochs=5 is an option"):
        ProbeClassifier("resnet18", variational_epochs=5)
    # the defaults of the other method are no choice: both methods build
    ProbeClassifier("resnet18", method="variational", variational_epochs=1)
    ProbeClassifier("resnet18", estimator="batch")
