"""The filter-wise Fisher estimators against brute-force autograd references.

The reference loops over examples one at a time and, for ``exact``, over every class, taking
``torch.autograd.grad`` of ``log p(y|x)`` with respect to each layer's weight; it shares no code
with the closed forms under test.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from t2v_lightning.fisher.estimators import (
    FisherError,
    LayerFisherTaps,
    UnsupportedLayerError,
    batch_filter_sums,
    embedded_layers,
    filter_values,
    sample_labels,
)
from tests.reference import as_vector, brute_force_fisher

EXACT_RTOL = 1e-5  # float32 closed forms against a float32 per-example loop
# Measured relative L2 errors (4 seeds): 100 draws 0.011-0.036; 4,000 draws ~0.003;
# batch estimator with 150 resampled batches 0.03-0.06.
MC_RTOL = 0.08  # per_sample with 100 draws per example, relative L2 error of the vector
MC_RTOL_SLOW = 0.012  # per_sample with 4,000 draws per example
BATCH_RTOL = 0.12  # batch estimator × batch size, 200 resampled batches


def estimate(
    network: nn.Module,
    inputs: torch.Tensor,
    head: str | None,
    estimator: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int | None = None,
    ids: torch.Tensor | None = None,
    likelihood: str = "categorical",
) -> torch.Tensor:
    """The filter-wise Fisher through the closed forms, batch by batch (float64)."""
    layers = embedded_layers(network, head)
    ids = torch.arange(inputs.shape[0]) if ids is None else ids
    batch_size = batch_size or inputs.shape[0]
    totals: dict[str, torch.Tensor] = {}
    count = 0
    with LayerFisherTaps(network, layers) as taps:
        for start in range(0, inputs.shape[0], batch_size):
            part = slice(start, start + batch_size)
            sums, n = batch_filter_sums(
                network,
                taps,
                inputs[part],
                ids[part],
                torch.ones(inputs[part].shape[0], dtype=torch.bool),
                estimator,  # type: ignore[arg-type]
                seed,
                mc_samples,
                likelihood=likelihood,  # type: ignore[arg-type]
            )
            for name, value in sums.items():
                totals[name] = totals.get(name, 0) + value.double()
            count += n
    hessian, _ = filter_values(totals, count, layers)
    return hessian.double()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class StridedDilated(nn.Module):
    """Convolutions with stride, dilation, asymmetric kernels, reflect padding, a Conv1d and
    a linear layer over a sequence (3-D input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.conv_b = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", groups=3)
        self.conv_same = nn.Conv2d(6, 4, 3, padding="same", bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.conv1d = nn.Conv1d(4, 5, 3, stride=2, padding=1)
        self.seq = nn.Linear(5, 7)
        self.layer_norm = nn.LayerNorm(7)
        self.fc = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv_a(x))
        x = torch.relu(self.conv_b(x))
        x = self.norm(self.conv_same(x))
        x = x.mean(-2)  # B, C, W
        x = torch.tanh(self.conv1d(x))  # B, 5, L
        x = self.layer_norm(torch.tanh(self.seq(x.transpose(1, 2))))  # B, L, 7
        return self.fc(x.mean(1))


class WideSequence(nn.Module):
    """A linear layer over a long sequence with many outputs (takes the Gram path)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Linear(2, 40)
        self.fc = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.seq(x.reshape(x.shape[0], -1, 2))).mean(1))


class GramConv(nn.Module):
    """A convolution whose output has few positions and many input channels (Gram path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, stride=3)
        self.conv2 = nn.Conv2d(32, 16, 2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.conv(x)))
        return self.fc(x.mean((-2, -1)))


class PointwiseConvs(nn.Module):
    """1×1 convolutions: stride 1, stride 2 (odd input size), grouped, and 1×1 with padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 1)
        self.conv_b = nn.Conv2d(8, 6, 1, stride=2)
        self.conv_c = nn.Conv2d(6, 6, 1, groups=3, bias=False)
        self.conv_d = nn.Conv2d(6, 4, 1, stride=(2, 1), padding=1, groups=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv_a(x))
        x = torch.tanh(self.conv_b(x))
        x = torch.tanh(self.conv_c(x))
        return self.fc(self.conv_d(x).mean((-2, -1)))


class DepthwiseConvs(nn.Module):
    """Depthwise convolutions with 25-tap kernels (one channel per group): padded, strided +
    dilated + reflect, and a depthwise Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 4, 1)
        self.dw_a = nn.Conv2d(4, 4, 5, padding=2, groups=4)
        self.dw_b = nn.Conv2d(
            4,
            4,
            (5, 5),
            stride=2,
            padding=(1, 2),
            dilation=(1, 2),
            groups=4,
            padding_mode="reflect",
            bias=False,
        )
        self.dw_1d = nn.Conv1d(4, 4, 25, padding=12, groups=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dw_a(torch.tanh(self.expand(x))))
        x = torch.tanh(self.dw_b(x)).mean(-2)
        return self.fc(self.dw_1d(x).mean(-1))


def test_exact_matches_brute_force_on_conv_batchnorm_net(tiny_convnet: nn.Module) -> None:
    inputs = torch.randn(6, 3, 8, 8)
    reference = brute_force_fisher(tiny_convnet, inputs, "fc")
    layers = embedded_layers(tiny_convnet, "fc")
    assert [n for n, _ in layers] == ["conv1", "bn1", "conv2", "bn2"]
    got = estimate(tiny_convnet, inputs, "fc", batch_size=4)
    torch.testing.assert_close(got, as_vector(reference, layers), rtol=EXACT_RTOL, atol=0)


def test_exact_matches_brute_force_on_mlp(tiny_mlp: nn.Module) -> None:
    inputs = torch.randn(5, 3, 2, 2)
    reference = brute_force_fisher(tiny_mlp, inputs, "5")
    layers = embedded_layers(tiny_mlp, "5")
    got = estimate(tiny_mlp, inputs, "5")
    torch.testing.assert_close(got, as_vector(reference, layers), rtol=EXACT_RTOL, atol=0)


@pytest.mark.parametrize(
    ("network", "shape"),
    [
        (StridedDilated, (3, 3, 9, 12)),
        (WideSequence, (3, 40)),
        (GramConv, (3, 3, 9, 9)),
        (PointwiseConvs, (3, 3, 7, 9)),
        (DepthwiseConvs, (3, 3, 9, 11)),
    ],
    ids=[
        "strided-dilated-grouped-reflect-conv1d-norms",
        "linear-gram",
        "conv-gram",
        "pointwise",
        "depthwise",
    ],
)
def test_exact_matches_brute_force_on_layer_variants(
    network: type[nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(1)
    model = network().eval()
    inputs = torch.randn(*shape)
    reference = brute_force_fisher(model, inputs, "fc")
    layers = embedded_layers(model, "fc")
    got = estimate(model, inputs, "fc")
    torch.testing.assert_close(got, as_vector(reference, layers), rtol=EXACT_RTOL, atol=1e-12)


def test_exact_matches_brute_force_on_timm_same_padding_and_batchnorm_act() -> None:
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, Conv2dSame

    torch.manual_seed(2)
    model = nn.Sequential()
    model.add_module("conv", Conv2dSame(3, 4, 3, stride=2))
    model.add_module("bn", BatchNormAct2d(4, act_layer=nn.ReLU6, inplace=True))
    model.add_module("dw", Conv2dSame(4, 4, 3, stride=2, groups=4))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 3))
    from tests.conftest import randomise_batchnorm

    randomise_batchnorm(model).eval()
    inputs = torch.randn(4, 3, 9, 10)  # odd sizes: asymmetric "same" padding
    reference = brute_force_fisher(model, inputs, "fc")
    layers = embedded_layers(model, "fc")
    got = estimate(model, inputs, "fc")
    torch.testing.assert_close(got, as_vector(reference, layers), rtol=EXACT_RTOL, atol=0)


def test_per_sample_converges_to_exact(tiny_convnet: nn.Module) -> None:
    inputs = torch.randn(8, 3, 8, 8)
    exact = estimate(tiny_convnet, inputs, "fc")
    sampled = estimate(tiny_convnet, inputs, "fc", "per_sample", mc_samples=100, seed=3)
    assert relative_error(sampled, exact) < MC_RTOL


@pytest.mark.slow
def test_per_sample_converges_to_exact_tightly(tiny_convnet: nn.Module) -> None:
    inputs = torch.randn(8, 3, 8, 8)
    exact = estimate(tiny_convnet, inputs, "fc")
    sampled = estimate(tiny_convnet, inputs, "fc", "per_sample", mc_samples=4000, seed=4)
    assert relative_error(sampled, exact) < MC_RTOL_SLOW


def test_batch_estimator_times_batch_size_converges_to_exact(tiny_mlp: nn.Module) -> None:
    batch = 4
    inputs = torch.randn(batch, 12)
    exact = estimate(tiny_mlp, inputs, "5")
    repeats = 200
    # The same batch with fresh labels each time: ids differ, so the sampled labels differ.
    many = inputs.repeat(repeats, 1)
    ids = torch.arange(batch * repeats)
    got = estimate(tiny_mlp, many, "5", "batch", batch_size=batch, ids=ids)
    assert relative_error(got * batch, exact) < BATCH_RTOL


def test_sampled_labels_do_not_depend_on_batching() -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(50, 7), -1)
    ids = torch.arange(1000, 1050)
    whole = sample_labels(probs, ids, seed=5)
    pieces = torch.cat(
        [sample_labels(probs[i : i + 7], ids[i : i + 7], seed=5) for i in range(0, 50, 7)]
    )
    assert torch.equal(whole, pieces)
    permutation = torch.randperm(50)
    assert torch.equal(
        sample_labels(probs[permutation], ids[permutation], seed=5), whole[permutation]
    )
    assert not torch.equal(sample_labels(probs, ids, seed=6), whole)


def test_sampled_labels_follow_the_probabilities() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3]]).repeat(30000, 1)
    labels = sample_labels(probs, torch.arange(30000), seed=0)
    frequencies = torch.bincount(labels, minlength=3).double() / 30000
    # three standard errors of a proportion near 0.5 with 30,000 draws is about 0.009
    torch.testing.assert_close(frequencies, probs[0].double(), atol=0.01, rtol=0)


def test_same_seed_same_result_and_per_sample_depends_on_seed(tiny_convnet: nn.Module) -> None:
    inputs = torch.randn(10, 3, 8, 8)
    first = estimate(tiny_convnet, inputs, "fc", "per_sample", seed=0)
    again = estimate(tiny_convnet, inputs, "fc", "per_sample", seed=0, batch_size=3)
    other = estimate(tiny_convnet, inputs, "fc", "per_sample", seed=1)
    torch.testing.assert_close(first, again, rtol=1e-6, atol=0)
    assert relative_error(first, other) > 1e-3


def test_taps_leave_the_network_as_they_found_it(tiny_convnet: nn.Module) -> None:
    flags = [p.requires_grad for p in tiny_convnet.parameters()]
    tiny_convnet.fc.weight.requires_grad_(True)
    flags = [p.requires_grad for p in tiny_convnet.parameters()]
    estimate(tiny_convnet, torch.randn(2, 3, 8, 8), "fc", "per_sample")
    assert [p.requires_grad for p in tiny_convnet.parameters()] == flags
    for module in tiny_convnet.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.PReLU(), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(PReLU\)"):
        embedded_layers(model, "2")


def test_shared_layer_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.inner(torch.tanh(self.inner(x))))

    with pytest.raises(UnsupportedLayerError, match="more than once"):
        estimate(Twice(), torch.randn(3, 4), "fc")


def test_layer_that_never_runs_is_reported() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.used(x))

    with pytest.raises(FisherError, match="unused"):
        estimate(Unused(), torch.randn(3, 4), "fc")


def test_non_finite_logits_are_reported() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    inputs = torch.randn(3, 4)
    inputs[1, 0] = float("nan")
    with pytest.raises(FisherError, match=r"non-finite logits.*\[1\]"):
        estimate(model, inputs, "1")


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "padding", "size"),
    [
        (3, 1, 1, 1, (9, 11)),
        (3, 2, 1, 1, (10, 9)),
        (5, 2, (1, 2), (1, 2), (11, 12)),
        (3, 2, 2, 0, (12, 13)),
    ],
)
def test_depthwise_forms_match_per_example_autograd(
    kernel: int,
    stride: int,
    dilation: int | tuple[int, int],
    padding: int | tuple[int, int],
    size: tuple[int, int],
) -> None:
    """Both depthwise forms (the grouped convolution used on the CPU, the per-offset sum used
    elsewhere) against each example's weight gradient from autograd."""
    from t2v_lightning.fisher.layers.conv import ConvGeometry, depthwise_sq_norms

    torch.manual_seed(3)
    conv = nn.Conv2d(5, 5, kernel, stride=stride, dilation=dilation, padding=padding, groups=5)
    inputs = torch.randn(3, 5, *size)
    grad = torch.randn_like(conv(inputs))
    expected = torch.stack(
        [
            torch.autograd.grad((conv(inputs[n : n + 1]) * grad[n : n + 1]).sum(), conv.weight)[0]
            .reshape(5, -1)
            .square()
            .sum(-1)
            for n in range(inputs.shape[0])
        ]
    )
    for by_offsets in (False, True):
        got = depthwise_sq_norms(ConvGeometry.of(conv), inputs, grad, by_offsets=by_offsets)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("channels", "size", "kernel", "stride", "dilation", "padding", "groups", "mode"),
    [
        (64, (8, 8), 3, 1, 1, 1, 1, "zeros"),  # a ResNet layer-1 convolution at 32 px
        (64, (5, 7), 3, 2, 1, 1, 1, "zeros"),  # strided, odd and unequal sides
        (64, (5, 4), (3, 2), (1, 2), (2, 1), (2, 1), 2, "zeros"),  # grouped, dilated, asymmetric
        (64, (5, 6), 3, 1, 1, 1, 2, "reflect"),
        (64, (6, 6), 3, 1, 1, "same", 1, "zeros"),
    ],
)
def test_padded_gram_form_matches_per_example_autograd(
    channels: int,
    size: tuple[int, int],
    kernel: Any,
    stride: Any,
    dilation: Any,
    padding: Any,
    groups: int,
    mode: str,
) -> None:
    """The Gram-of-the-padded-input form against each example's weight gradient from autograd,
    on convolutions for which the cost rule picks it (so ``conv_sq_norms`` runs it too)."""
    from t2v_lightning.fisher.layers.conv import (
        ConvGeometry,
        conv_sq_norms,
        padded_gram_sq_norms,
        prefers_padded_gram,
    )

    torch.manual_seed(5)
    conv = nn.Conv2d(
        channels,
        2 * channels,
        kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        groups=groups,
        padding_mode=mode,
    )
    inputs = torch.randn(4, channels, *size)
    grad = torch.randn_like(conv(inputs))
    expected = torch.stack(
        [
            torch.autograd.grad((conv(inputs[n : n + 1]) * grad[n : n + 1]).sum(), conv.weight)[0]
            .reshape(2 * channels, -1)
            .square()
            .sum(-1)
            for n in range(inputs.shape[0])
        ]
    )
    geometry = ConvGeometry.of(conv)
    assert prefers_padded_gram(geometry, inputs, grad)
    torch.testing.assert_close(
        padded_gram_sq_norms(geometry, inputs, grad), expected, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        conv_sq_norms(geometry, inputs, grad), expected, rtol=1e-5, atol=1e-5
    )


def test_padded_gram_rule_keeps_the_patch_forms_where_they_are_cheaper() -> None:
    """Pointwise convolutions, a 7x7 stem over 224 px, a 1-position output and a 28 px map keep
    the patch forms (measured faster there), and so does every convolution off the CPU (not
    measured there)."""
    from t2v_lightning.fisher.layers.conv import ConvGeometry, prefers_padded_gram

    def _prefers_padded_gram(conv: nn.Conv2d, inputs: torch.Tensor, grad: torch.Tensor) -> bool:
        return prefers_padded_gram(ConvGeometry.of(conv), inputs, grad)

    cases = [
        (nn.Conv2d(64, 128, 1), (8, 8)),
        (nn.Conv2d(3, 64, 7, stride=2, padding=3), (224, 224)),
        (nn.Conv2d(512, 512, 3, padding=1), (1, 1)),
        (nn.Conv2d(128, 128, 3, padding=1), (28, 28)),
    ]
    for conv, size in cases:
        inputs = torch.zeros(1, conv.in_channels, *size)
        assert not _prefers_padded_gram(conv, inputs, conv(inputs)), conv
    conv = nn.Conv2d(64, 64, 3, padding=1)
    inputs = torch.zeros(1, 64, 8, 8)
    assert _prefers_padded_gram(conv, inputs, conv(inputs))
    off_cpu = conv.to("meta")
    meta_inputs = inputs.to("meta")
    assert not _prefers_padded_gram(off_cpu, meta_inputs, off_cpu(meta_inputs))


def test_batchnorm_with_a_large_running_mean_matches_brute_force() -> None:
    """The batch-norm form subtracts the mean after summing; a mean of 30 standard deviations
    stays within 1e-4 of the brute-force Fisher."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    with torch.no_grad():
        model[0].bias.fill_(30.0)
        model[1].running_mean.fill_(30.0)
        model[1].running_var.fill_(1.0)
    inputs = torch.randn(5, 3, 8, 8)
    reference = brute_force_fisher(model, inputs, "5")
    layers = embedded_layers(model, "5")
    got = estimate(model, inputs, "5")
    torch.testing.assert_close(got, as_vector(reference, layers), rtol=1e-4, atol=0)


class _SharedWeight(nn.Module):
    """Two layers that share one weight, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("make", [_SharedWeight, None], ids=["shared-weight", "conv-batchnorm"])
def test_batch_estimator_is_the_squared_mean_gradient_of_the_sampled_labels(
    make: Any, tiny_convnet: nn.Module
) -> None:
    # Each layer's row sums of the squared mini-batch gradient (what the step reduces inside
    # backward, releasing the gradient) against autograd's gradient of the same loss, taken whole.
    torch.manual_seed(3)
    network = make() if make is not None else tiny_convnet
    inputs = torch.randn(5, 6) if make is not None else torch.randn(5, 3, 8, 8)
    ids = torch.arange(10, 15)
    layers = embedded_layers(network, "fc")
    existing = {name: torch.full_like(module.weight, 7.0) for name, module in layers}
    for name, module in layers:
        module.weight.grad = existing[name].clone()
    with LayerFisherTaps(network, layers) as taps:
        sums, count = batch_filter_sums(
            network, taps, inputs, ids, torch.ones(5, dtype=torch.bool), "batch", seed=2
        )
    assert count == 1
    network.eval()
    log_probs = network(inputs).log_softmax(-1)
    labels = sample_labels(log_probs.detach().exp(), ids, 2, 0)
    loss = log_probs.gather(1, labels[:, None]).mean()
    for name, module in layers:
        (grad,) = torch.autograd.grad(loss, module.weight, retain_graph=True)
        expected = grad.reshape(grad.shape[0], -1).square().sum(1)
        torch.testing.assert_close(sums[name], expected, rtol=1e-5, atol=1e-12)
        # The step leaves the weights as it found them: their gradients, flags and hooks.
        assert torch.equal(module.weight.grad, existing[name])
        assert not module.weight._backward_hooks
    if make is not None:
        assert torch.equal(sums["a"], sums["b"])
