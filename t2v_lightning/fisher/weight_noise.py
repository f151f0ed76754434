r"""Gaussian weight noise on a network's layers: the variances, the noisy forward, the KL term.

Every convolution and linear layer after the skipped prefix (not the head) gets a per-filter
log-variance :math:`\log\sigma^2_o` (shape ``out × 1 × … × 1``, one value per output filter,
shared by the filter's weights) and a per-layer log prior variance :math:`\log\lambda^2`. The
network runs with Gaussian weight noise :math:`\tilde w \sim \mathcal N(w, \sigma^2)` through the
*local reparametrization trick* (Kingma et al., 2015): instead of sampling weights, sample the
pre-activations,

.. math::

    \text{out} = \text{layer}(x; w) + \sqrt{\text{layer}(x^2 + 0.01;\ \sigma^2)} \odot \varepsilon,
    \qquad \varepsilon \sim \mathcal N(0, 1)\ \text{of out's shape}

(the ``0.01`` keeps the noise alive where the input is zero, as in the 2019 reference). Because
:math:`\sigma^2` is constant over a filter, :math:`\text{layer}(x^2 + 0.01; \sigma^2)` is
:math:`\sigma^2_o` times a convolution of the channel-summed :math:`x^2 + 0.01` with a kernel of
ones (one channel per group, :func:`receptive_field_sums`); :func:`add_weight_noise` multiplies
that small tensor, the per-filter :math:`\sigma_o` and the noise by broadcasting, so the variance
pass costs a few elementwise operations per layer instead of a second convolution.

The variances minimise, with the probe's weights frozen and the head trained alongside,

.. math::

    L = \text{CE} + \beta\,\text{KL},\quad
    \text{KL} = \sum \frac{w^2}{\lambda^2} + \sum \frac{\sigma^2}{\lambda^2}
        + \sum_\text{layers} k_\ell \log\lambda^2_\ell - \sum \log\sigma^2 - k

(sums over all weights of those layers, :math:`\sigma^2` expanded from each filter's value,
:math:`k_\ell` the weights of layer :math:`\ell`, :math:`k` their total): twice the KL divergence of
the posterior :math:`\mathcal N(w, \sigma^2)` from the prior :math:`\mathcal N(0, \lambda^2)`, as in
the reference. Near a minimum, :math:`\mathbb E[\text{CE}] \approx \text{CE}(w) + \tfrac12 \sum_i
F_{ii} \sigma^2_i`, so the optimum per filter is

.. math::

    \frac{1}{\sigma^2_o} \approx \frac{\bar F_o}{\beta} \cdot \tfrac12 + \frac{1}{\lambda^2},

an increasing function of the filter's mean Fisher :math:`\bar F_o`. The method that trains
them is :mod:`t2v_lightning.fisher.variational`. Each layer type's variance comes from its rule
in the layer table (:mod:`t2v_lightning.fisher.layers`).

Noise is injected with forward hooks that live for one forward pass (:meth:`VariationalLayers.noisy`)
and are removed afterwards; no module's ``forward`` is reassigned and nothing is stored on modules
or parameters. Batch-norm layers get no variance (so the ``layers`` of a variational embedding
list only convolutions and linear layers, unlike Monte Carlo's) and keep their frozen statistics.

Noise is drawn per global batch: every rank draws the noise of the whole global batch from a
generator seeded by ``(seed, epoch, step, layer)`` and keeps its own rows, so training on ``W``
processes with batch ``B`` each follows the same path as one process with batch ``W·B``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from t2v_lightning.choices import FisherError, UnsupportedLayerError
from t2v_lightning.fisher.layers.rule import INPUT_NOISE_FLOOR, LayerRule
from t2v_lightning.fisher.layers.table import rule_for, within
from t2v_lightning.fisher.sampling import hash_seed
from t2v_lightning.probe import ProbeError

__all__ = [
    "INPUT_NOISE_FLOOR",
    "VARIANCE_INIT_SCALE",
    "FilterVariance",
    "GlobalBatchNoise",
    "NoiseRun",
    "NoiseSampler",
    "VariationalLayers",
    "add_weight_noise",
    "kl_divergence",
    "output_variance",
    "receptive_field_sums",
    "standard_noise",
    "variational_layers",
]

VARIANCE_INIT_SCALE = 0.05
"""Initial :math:`\\sigma^2_o` = this × the variance of filter ``o``'s weights (+1e-8)."""

_LOG_EPS = 1e-8

# A function of (layer index, layer output) returning standard normal noise of the output's shape.
NoiseSampler = Callable[[int, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Which layers get variances
# --------------------------------------------------------------------------------------------


def variational_layers(
    network: nn.Module, head: str | None, exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """The layers that get a variance: every conv and linear layer, in ``named_modules`` order.

    Modules whose ``weight`` has fewer than two dimensions (batch norm, group norm, layer norm)
    get none, as in the reference. The head and the modules under ``exclude`` (the skipped
    prefix) are left out; modules replaced by ``nn.Identity`` drop out by themselves.

    Args:
        network: the network.
        head: qualified name of the classifier head (left out), or None.
        exclude: qualified names of modules to leave out with everything below them.

    Raises:
        UnsupportedLayerError: a module in the range has a weight of two or more dimensions but is
            not a Linear / Conv1d / Conv2d / Conv3d (nor timm's Conv2dSame), or is a recurrent or
            attention layer whose weights are used outside submodules; the error names it.
    """
    layers: list[tuple[str, nn.Module]] = []
    for name, module in network.named_modules():
        if head is not None and within(name, head):
            continue
        if any(within(name, skipped) for skipped in exclude):
            continue
        if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(module).__name__}) uses its weights through a functional "
                "path; the variational Fisher supports Linear, Conv1d/2d/3d (any groups) and "
                "timm Conv2dSame. Skip it with skip_layers or use another probe"
            )
        weight = module._parameters.get("weight")
        if weight is None or weight.ndim < 2:
            continue
        if _variance_rule(module) is None:
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(module).__name__}) has a {weight.ndim}-D weight but no "
                "variational form here; supported: Linear, Conv1d, Conv2d, Conv3d (any groups, "
                "incl. timm Conv2dSame). Skip it with skip_layers or use another probe"
            )
        layers.append((name, module))
    return layers


# --------------------------------------------------------------------------------------------
# Pure math: the variance of a layer's output and the KL term
# --------------------------------------------------------------------------------------------


def _variance_rule(module: nn.Module) -> LayerRule | None:
    """The rule of ``module`` in the layer table if it has a variational form, else None."""
    rule = rule_for(module)
    return rule if rule is not None and rule.variational else None


def _rule(module: nn.Module) -> LayerRule:
    rule = _variance_rule(module)
    if rule is None:
        raise UnsupportedLayerError(f"no variational form for {type(module).__name__}")
    return rule


def receptive_field_sums(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    r"""The layer's sums of :math:`x^2 + 0.01` over each output's receptive field, one per group.

    :math:`\text{layer}(x^2 + 0.01;\ \sigma^2)[o] = \sigma^2_o \cdot s[g(o)]`, where :math:`s`
    runs the layer's geometry (stride, padding, dilation, padding mode, timm's "same" padding)
    with a kernel of ones over the channel sums of :math:`x^2 + 0.01` of each group :math:`g`.
    Zero padding adds zeros, not 0.01, as in the reference. Computed in float32 by the layer's
    rule (:mod:`t2v_lightning.fisher.layers`).

    Args:
        module: a layer accepted by :func:`variational_layers`.
        inputs: the layer's input (batched or not).

    Returns:
        Linear: ``(..., 1)``. Convolution: ``(B, groups, *output positions)`` (no batch
        dimension for unbatched inputs).
    """
    return _rule(module).receptive_field_sums(module, inputs)


def output_variance(
    module: nn.Module, inputs: torch.Tensor, variance: torch.Tensor
) -> torch.Tensor:
    r""":math:`\text{layer}(x^2 + 0.01;\ \sigma^2)`: the variance of the layer's output under weight noise.

    Args:
        module: a layer accepted by :func:`variational_layers`.
        inputs: the layer's input (batched or not).
        variance: ``(out_features,)`` or ``(out_channels,)`` per-filter variances.

    Returns:
        A float32 tensor of the shape of the layer's output.
    """
    return _rule(module).output_variance(module, inputs, variance)


def add_weight_noise(
    module: nn.Module,
    inputs: torch.Tensor,
    output: torch.Tensor,
    logvar: torch.Tensor,
    noise: torch.Tensor,
    rule: LayerRule | None = None,
) -> torch.Tensor:
    r"""``output + sqrt(layer(x² + 0.01; σ²)) * noise`` in float32.

    The standard deviation :math:`\sigma_o \sqrt{s_{g(o)}}` is never materialised: it is the
    broadcast product of the per-filter :math:`\sigma` and the small receptive-field sums
    :math:`s` of :func:`receptive_field_sums`, fused into one ``addcmul``.

    Args:
        module: a layer accepted by :func:`variational_layers`.
        inputs: the layer's input.
        output: the layer's output on ``inputs``.
        logvar: per-filter log-variances (one entry per filter).
        noise: standard normal noise of ``output``'s shape.
        rule: the layer's rule (``None``: looked up in the layer table).
    """
    rule = _rule(module) if rule is None else rule
    field = rule.receptive_field_sums(module, inputs)
    sigma = torch.exp(0.5 * logvar.float().reshape(-1))
    field, sigma, grouped = rule.grouped(module, field, sigma, output.shape)
    noisy = torch.addcmul(
        output.float().reshape(grouped), noise.reshape(grouped) * sigma, field.sqrt()
    )
    return noisy.reshape(output.shape)


def kl_divergence(
    weight_sq_sum: torch.Tensor, num_weights: int, logvar: torch.Tensor, loglambda2: torch.Tensor
) -> torch.Tensor:
    r"""The KL term of one layer (SPEC 3.4), per-filter variances expanded over their rows.

    .. math::

        \sum_i \frac{w_i^2}{\lambda^2} + \sum_i \frac{\sigma_i^2}{\lambda^2}
        + k \log\lambda^2 - \sum_i \log\sigma_i^2 - k,

    with :math:`k` = ``num_weights`` and :math:`\sigma^2_i = e^{\text{logvar}_o}` for every weight
    :math:`i` of filter :math:`o`. Summed over layers this is the ``KL`` of the module docstring.

    Args:
        weight_sq_sum: :math:`\sum_i w_i^2` of the layer (a scalar tensor).
        num_weights: :math:`k`, the number of weights of the layer.
        logvar: per-filter log-variances (any shape with one entry per filter).
        loglambda2: the layer's log prior variance (a scalar tensor).
    """
    row_size = num_weights // logvar.numel()
    logvar = logvar.float()
    loglambda2 = loglambda2.float()
    inv_prior = torch.exp(-loglambda2)
    trace = row_size * logvar.exp().sum()
    return (
        (weight_sq_sum.float() + trace) * inv_prior
        + num_weights * loglambda2
        - row_size * logvar.sum()
        - num_weights
    )


# --------------------------------------------------------------------------------------------
# Parameters and the hooks that use them
# --------------------------------------------------------------------------------------------


class FilterVariance(nn.Module):
    r"""The variational parameters of one layer: ``logvar`` per filter, ``loglambda2`` per layer.

    Initialised as in the reference: :math:`\sigma^2_o = 0.05\,\mathrm{Var}(w_o) + 10^{-8}` (the
    unbiased variance of filter ``o``'s weights) and :math:`\lambda^2 = \overline{w^2} + 10^{-8}`.
    The layer's weights are read once (they are frozen): only :math:`\sum w^2` is kept.

    Args:
        weight: the layer's weight, ``out × …``.
        init_scale: the factor on the weights' variance of the initial :math:`\sigma^2`.
    """

    weight_sq_sum: torch.Tensor

    def __init__(self, weight: torch.Tensor, init_scale: float = VARIANCE_INIT_SCALE) -> None:
        super().__init__()
        w = weight.detach().to(torch.float64)
        rows = w.reshape(w.shape[0], -1)
        row_var = rows.var(dim=1, correction=1 if rows.shape[1] > 1 else 0)
        shape = (w.shape[0],) + (1,) * (w.ndim - 1)
        logvar = (init_scale * row_var + _LOG_EPS).log().reshape(shape)
        loglambda2 = (w.square().mean() + _LOG_EPS).log()
        device = weight.device
        self.logvar = nn.Parameter(logvar.to(device, torch.float32))
        self.loglambda2 = nn.Parameter(loglambda2.to(device, torch.float32))
        self.register_buffer("weight_sq_sum", w.square().sum().to(device, torch.float32))
        self.num_weights = int(w.numel())

    def variance(self) -> torch.Tensor:
        """Per-filter variances, ``(out,)`` float32."""
        return self.logvar.float().exp().reshape(-1)

    def kl(self) -> torch.Tensor:
        """This layer's KL term (:func:`kl_divergence`)."""
        return kl_divergence(self.weight_sq_sum, self.num_weights, self.logvar, self.loglambda2)


class NoiseRun:
    """What one noisy forward pass saw: how many times each layer was called."""

    def __init__(self, names: Sequence[str]) -> None:
        self.calls: dict[str, int] = dict.fromkeys(names, 0)

    def check_all_called(self) -> None:
        """Every layer with a variance must have run as a module; name those that did not."""
        missing = [name for name, count in self.calls.items() if count == 0]
        if missing:
            raise FisherError(
                f"layers {missing} were not called as modules in the forward pass (unused, or "
                "their weights are used through a functional path), so their variances get no "
                "gradient; skip them with skip_layers or use another probe"
            )


def standard_noise(index: int, output: torch.Tensor) -> torch.Tensor:
    """Standard normal noise from the global generator (float32, of ``output``'s shape)."""
    return torch.randn(output.shape, dtype=torch.float32, device=output.device)


class VariationalLayers(nn.Module):
    """The variational parameters of a network, and the hooks that make its layers noisy.

    Holds one :class:`FilterVariance` per layer of :func:`variational_layers`, but no reference
    to the layers themselves: :meth:`noisy` finds them by name in the network it is given.

    Args:
        network: the network (its layers' weights initialise the variances).
        head: qualified name of the classifier head (left out), or None.
        exclude: qualified names of modules left out with everything below them.
        init_scale: see :class:`FilterVariance`.

    Raises:
        UnsupportedLayerError: see :func:`variational_layers`.
        ProbeError: no layer gets a variance.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> variational = VariationalLayers(net, head="2")
        >>> variational.names
        ['0']
        >>> with variational.noisy(net) as run:
        ...     out = net(torch.randn(5, 4))
        >>> run.calls
        {'0': 1}
    """

    def __init__(
        self,
        network: nn.Module,
        head: str | None,
        exclude: Sequence[str] = (),
        init_scale: float = VARIANCE_INIT_SCALE,
    ) -> None:
        super().__init__()
        layers = variational_layers(network, head, exclude)
        if not layers:
            raise ProbeError(
                "nothing to embed: no convolution or linear layer after the skipped prefix "
                "(besides the head)"
            )
        self.names = [name for name, _ in layers]
        self.variances = nn.ModuleList(
            FilterVariance(cast(torch.Tensor, module.weight), init_scale) for _, module in layers
        )

    def layer_variances(self) -> list[FilterVariance]:
        """The :class:`FilterVariance` of each layer, in the order of :attr:`names`."""
        return [cast(FilterVariance, variance) for variance in self.variances]

    def kl(self) -> torch.Tensor:
        """The KL term summed over layers (float32, autocast off)."""
        variances = self.layer_variances()
        with torch.autocast(device_type=variances[0].logvar.device.type, enabled=False):
            return torch.stack([variance.kl() for variance in variances]).sum()

    @contextmanager
    def noisy(self, network: nn.Module, noise: NoiseSampler = standard_noise) -> Iterator[NoiseRun]:
        """Within the context, the layers of ``network`` add weight noise to their outputs.

        Forward hooks are registered on entry and removed on exit (also on errors); the output of
        each layer becomes ``output + sqrt(output_variance) * noise(index, output)``.

        Args:
            network: the network whose layers (found by name) get the noise.
            noise: a function of (layer index, output) giving standard normal noise.

        Yields:
            A :class:`NoiseRun` that counts the calls of each layer.
        """
        run = NoiseRun(self.names)
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for index, (name, variance) in enumerate(zip(self.names, self.layer_variances())):
                layer = network.get_submodule(name)
                hook = _noise_hook(index, name, variance, noise, run, _rule(layer))
                handles.append(layer.register_forward_hook(hook))
            yield run
        finally:
            for handle in handles:
                handle.remove()

    def embedding_values(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[int, int]]]:
        """``(hessian, scale, layers)``: ``exp(-logvar)`` per filter, ``exp(-loglambda2)`` of its
        layer, and each layer's ``(start, stop)`` slice (float64 on CPU)."""
        hessian: list[torch.Tensor] = []
        scale: list[torch.Tensor] = []
        offsets: dict[str, tuple[int, int]] = {}
        position = 0
        for name, variance in zip(self.names, self.layer_variances()):
            logvar = variance.logvar.detach().to("cpu", torch.float64).reshape(-1)
            loglambda2 = variance.loglambda2.detach().to("cpu", torch.float64)
            hessian.append(torch.exp(-logvar))
            scale.append(torch.exp(-loglambda2).expand(logvar.numel()))
            offsets[name] = (position, position + logvar.numel())
            position += logvar.numel()
        return torch.cat(hessian), torch.cat(scale), offsets


def _noise_hook(
    index: int,
    name: str,
    variance: FilterVariance,
    noise: NoiseSampler,
    run: NoiseRun,
    rule: LayerRule,
) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        run.calls[name] += 1
        if (
            not isinstance(output, torch.Tensor)
            or not args
            or not isinstance(args[0], torch.Tensor)
        ):
            raise UnsupportedLayerError(f"layer {name!r} must take and return a tensor")
        with torch.autocast(device_type=output.device.type, enabled=False):
            noisy = add_weight_noise(
                module, args[0], output, variance.logvar, noise(index, output), rule
            )
        return noisy.to(output.dtype)

    return hook


# --------------------------------------------------------------------------------------------
# Noise per global batch
# --------------------------------------------------------------------------------------------


class GlobalBatchNoise:
    """Noise of one training step: rows ``rank::world_size`` of the global batch's noise.

    With :class:`~torch.utils.data.DistributedSampler`'s layout, row ``j`` of rank ``r``'s batch
    is row ``j·W + r`` of the global batch, so every rank draws the global batch's noise from a
    generator seeded by ``(seed, epoch, step, layer)`` and keeps its rows.
    """

    def __init__(
        self,
        seed: int,
        epoch: int,
        step: int,
        rank: int,
        world_size: int,
        generators: dict[torch.device, torch.Generator],
    ) -> None:
        self._key = (seed, epoch, step)
        self._rank = rank
        self._world_size = world_size
        self._generators = generators

    def __call__(self, index: int, output: torch.Tensor) -> torch.Tensor:
        generator = self._generators.get(output.device)
        if generator is None:
            generator = torch.Generator(device=output.device)
            self._generators[output.device] = generator
        generator.manual_seed(hash_seed(*self._key, index))
        if output.ndim == 0 or self._world_size == 1:
            return torch.randn(
                output.shape, generator=generator, dtype=torch.float32, device=output.device
            )
        rows = output.shape[0] * self._world_size
        full = torch.randn(
            (rows, *output.shape[1:]),
            generator=generator,
            dtype=torch.float32,
            device=output.device,
        )
        return full[self._rank :: self._world_size]
