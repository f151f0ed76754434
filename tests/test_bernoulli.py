"""Multi-label (Bernoulli) Fisher against brute-force autograd references.

Two references, sharing no code with the estimators under test:

* the definition, :math:`\\sum_{y \\in \\{0,1\\}^K} p(y|x) \\lVert \\nabla \\log p(y|x) \\rVert^2`,
  enumerating every joint label vector of a few outputs;
* the per-output form, :math:`\\sum_k \\sum_{y_k \\in \\{0,1\\}} p(y_k|x)
  \\lVert \\nabla \\log p(y_k|x) \\rVert^2`, looping over examples, outputs and outcomes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from t2v_lightning.fisher.estimators import (
    LayerFisherTaps,
    batch_filter_sums,
    embedded_layers,
    sample_multilabels,
)
from tests.reference import brute_force_joint, brute_force_per_output
from tests.test_estimators import estimate as closed_form_estimate
from tests.test_estimators import relative_error

EXACT_RTOL = 1e-5  # float32 closed forms against float32 per-example autograd loops
# Measured relative L2 errors (4 seeds): per_sample with 300 draws 0.025-0.048; batch estimator
# x batch size over 300 reseeded batches 0.041-0.079.
MC_RTOL = 0.08  # per_sample with 300 draws per example, relative L2 error of the vector
BATCH_RTOL = 0.15  # batch estimator x batch size, 300 reseeded batches


def estimate(
    network: nn.Module,
    inputs: torch.Tensor,
    head: str,
    estimator: str = "exact",
    mc_samples: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    return closed_form_estimate(
        network, inputs, head, estimator, mc_samples, seed, batch_size, likelihood="bernoulli"
    )


def test_the_two_references_agree(tiny_mlp: nn.Module) -> None:
    # Independence of the outputs: the joint definition equals the per-output sum.
    inputs = torch.randn(3, 3, 2, 2)
    joint = brute_force_joint(tiny_mlp, inputs, "5")
    per_output = brute_force_per_output(tiny_mlp, inputs, "5")
    torch.testing.assert_close(joint, per_output, rtol=1e-5, atol=0)


def test_exact_matches_brute_force_on_conv_batchnorm_net(tiny_convnet: nn.Module) -> None:
    inputs = torch.randn(4, 3, 8, 8)
    reference = brute_force_joint(tiny_convnet, inputs, "fc")
    got = estimate(tiny_convnet, inputs, "fc", batch_size=3)
    torch.testing.assert_close(got, reference, rtol=EXACT_RTOL, atol=0)
    per_output = brute_force_per_output(tiny_convnet, inputs, "fc")
    torch.testing.assert_close(got, per_output, rtol=EXACT_RTOL, atol=0)


def test_exact_matches_brute_force_on_mlp(tiny_mlp: nn.Module) -> None:
    inputs = torch.randn(6, 3, 2, 2)
    got = estimate(tiny_mlp, inputs, "5")
    torch.testing.assert_close(
        got, brute_force_joint(tiny_mlp, inputs, "5"), rtol=EXACT_RTOL, atol=0
    )


def test_bernoulli_differs_from_categorical(tiny_mlp: nn.Module) -> None:
    # The likelihood argument reaches the math: the two Fishers of the same network differ.
    from tests.test_estimators import estimate as categorical_estimate

    inputs = torch.randn(6, 3, 2, 2)
    bernoulli = estimate(tiny_mlp, inputs, "5")
    categorical = categorical_estimate(tiny_mlp, inputs, "5")
    assert relative_error(bernoulli, categorical) > 0.05


def test_per_sample_converges_to_exact(tiny_mlp: nn.Module) -> None:
    inputs = torch.randn(6, 3, 2, 2)
    exact = estimate(tiny_mlp, inputs, "5")
    sampled = estimate(tiny_mlp, inputs, "5", estimator="per_sample", mc_samples=300)
    assert relative_error(sampled, exact) < MC_RTOL


def test_per_sample_does_not_depend_on_batching(tiny_convnet: nn.Module) -> None:
    inputs = torch.randn(7, 3, 8, 8)
    whole = estimate(tiny_convnet, inputs, "fc", estimator="per_sample", mc_samples=3)
    split = estimate(tiny_convnet, inputs, "fc", estimator="per_sample", mc_samples=3, batch_size=2)
    torch.testing.assert_close(whole, split, rtol=1e-5, atol=0)


def test_batch_estimator_has_expectation_fisher_over_batch_size(tiny_mlp: nn.Module) -> None:
    # E[ḡ²] = F / B when the labels come from the model: average over reseeded batches.
    torch.manual_seed(3)
    inputs = torch.randn(4, 3, 2, 2)
    exact = estimate(tiny_mlp, inputs, "5")
    draws = [estimate(tiny_mlp, inputs, "5", estimator="batch", seed=seed) for seed in range(300)]
    batch_mean = torch.stack(draws).mean(0) * inputs.shape[0]
    assert relative_error(batch_mean, exact) < BATCH_RTOL


def test_sample_multilabels_frequencies_and_id_seeding() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.9]]).expand(20000, 3)
    ids = torch.arange(20000)
    labels = sample_multilabels(probs, ids, seed=0)
    assert labels.dtype == torch.float32 and set(labels.unique().tolist()) <= {0.0, 1.0}
    # binomial standard error at n=20000 is <= 0.0036: 5 of them
    torch.testing.assert_close(labels.mean(0), torch.tensor([0.1, 0.5, 0.9]), rtol=0, atol=0.018)
    # an example's labels depend on its id only, not on its batch
    again = sample_multilabels(probs[5:9], ids[5:9], seed=0)
    assert torch.equal(again, labels[5:9])
    assert not torch.equal(sample_multilabels(probs, ids, seed=1), labels)
    # outputs are drawn independently: correlation of two outputs with p = 0.5 is ~0
    pair = sample_multilabels(torch.full((20000, 2), 0.5), ids, seed=0)
    assert abs(float(torch.corrcoef(pair.T)[0, 1])) < 0.04


def test_bad_likelihood_is_refused(tiny_mlp: nn.Module) -> None:
    layers = embedded_layers(tiny_mlp, "5")
    with LayerFisherTaps(tiny_mlp, layers) as taps, pytest.raises(ValueError, match="likelihood"):
        batch_filter_sums(
            tiny_mlp,
            taps,
            torch.randn(2, 3, 2, 2),
            torch.arange(2),
            torch.ones(2, dtype=torch.bool),
            "exact",
            0,
            likelihood="poisson",  # type: ignore[arg-type]
        )


# --------------------------------------------------------------------------------------------
# Task2Vec with multi-label targets
# --------------------------------------------------------------------------------------------

FAST = {"progress_bar": False, "accelerator": "cpu", "batch_size": 8}


class ToyMultiLabel(torch.utils.data.Dataset):
    """Images whose 3 binary attributes each shift the image's mean: (image, float 0/1 vector)."""

    def __init__(self, n: int = 24, size: int = 6, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.targets = (torch.rand(n, 3, generator=generator) < 0.5).float()
        directions = torch.randn(3, 3, 1, 1, generator=generator)
        shift = torch.einsum("nk,kcij->ncij", self.targets, directions)
        self.images = shift + 0.5 * torch.randn(n, 3, size, size, generator=generator)

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]


def test_task2vec_bernoulli_equals_brute_force_on_its_fitted_network() -> None:
    from t2v_lightning import Task2Vec
    from tests.test_task2vec import sequential_cnn

    data = ToyMultiLabel(n=48)
    t2v = Task2Vec(
        sequential_cnn(),
        likelihood="bernoulli",
        estimator="exact",
        balanced_sampling=False,
        max_samples=None,
        head_epochs=20,
        head_lr=3e-2,
        **FAST,
    )
    embedding = t2v.embed(data)
    network, _, labels, meta = t2v.prepare(data)  # seeded: the same fitted network
    assert meta["num_classes"] == 3 and network.fc.out_features == 3
    assert torch.equal(labels, data.targets)
    assert embedding.meta["likelihood"] == "bernoulli"
    # fraction of correct outputs in the last epoch (measured 0.74; a fresh head is near 0.5)
    assert embedding.meta["head_train_accuracy"] > 0.65
    reference = brute_force_joint(network, data.images, "fc")
    torch.testing.assert_close(embedding.hessian.double(), reference, rtol=EXACT_RTOL, atol=0)


def test_task2vec_bernoulli_per_sample_is_near_exact() -> None:
    from t2v_lightning import Task2Vec
    from tests.test_task2vec import sequential_cnn

    data = ToyMultiLabel()
    common = dict(likelihood="bernoulli", balanced_sampling=False, max_samples=None, head_epochs=1)
    exact = Task2Vec(sequential_cnn(), estimator="exact", **common, **FAST).embed(data)  # type: ignore[arg-type]
    sampled = Task2Vec(
        sequential_cnn(),
        estimator="per_sample",
        mc_samples=100,
        **common,
        **FAST,  # type: ignore[arg-type]
    ).embed(data)
    assert relative_error(sampled.hessian.double(), exact.hessian.double()) < 0.1


def test_balanced_sampling_is_refused_for_multi_label_tasks() -> None:
    from t2v_lightning import Task2Vec
    from tests.test_task2vec import sequential_cnn

    with pytest.raises(ValueError, match=r"balanced_sampling=True .* not defined for multi-label"):
        Task2Vec(sequential_cnn(), likelihood="bernoulli", **FAST)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        Task2Vec(sequential_cnn(), likelihood="multinomial", **FAST)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method='montecarlo' only"):
        Task2Vec(
            sequential_cnn(),
            likelihood="bernoulli",
            method="variational",
            balanced_sampling=False,
            **FAST,
        )


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (lambda i: i % 3, "1-D 0/1 vector"),
        (lambda i: torch.tensor([0.0, 0.5, 1.0]), "must be 0 or 1"),
    ],
    ids=["class-index", "soft-label"],
)
def test_bad_multi_label_targets_are_refused(labels: Callable[[int], object], message: str) -> None:
    from t2v_lightning import Task2Vec
    from t2v_lightning.features import DatasetError
    from tests.test_task2vec import sequential_cnn

    data = [(torch.randn(3, 6, 6), labels(i)) for i in range(6)]
    t2v = Task2Vec(sequential_cnn(), likelihood="bernoulli", balanced_sampling=False, **FAST)
    with pytest.raises(DatasetError, match=message):
        t2v.embed(data)


def test_fisher_callback_records_the_likelihood_and_refuses_a_mismatched_resume() -> None:
    from t2v_lightning import FisherCallback

    categorical = FisherCallback(estimator="exact")
    bernoulli = FisherCallback(estimator="exact", likelihood="bernoulli")
    # categorical checkpoints keep their key; a Bernoulli state never loads into it
    assert (
        categorical.state_key == "FisherCallback{'estimator': 'exact', 'seed': 0, 'mc_samples': 1}"
    )
    assert "'likelihood': 'bernoulli'" in bernoulli.state_key
    with pytest.raises(
        ValueError, match="likelihood='bernoulli' but this FisherCallback has 'categorical'"
    ):
        categorical.load_state_dict(bernoulli.state_dict())
    with pytest.raises(ValueError, match="likelihood must be one of"):
        FisherCallback(likelihood="gaussian")  # type: ignore[arg-type]
