"""The hooks that turn each embedded layer's output gradient into per-filter Fisher sums.

:class:`LayerFisherTaps` reads every embedded layer's input in the forward pass and its output
gradient in the backward pass (tensor hooks on module outputs: module backward hooks break on the
in-place activations of real probes), and hands both to the layer's rule
(:mod:`t2v_lightning.fisher.layers`), chosen once when the taps are made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from t2v_lightning.choices import FisherError, UnsupportedLayerError
from t2v_lightning.fisher.faults import ids_text, precision_hint
from t2v_lightning.fisher.layers.table import layer_rule

__all__ = ["LayerFisherTaps"]


def freeze_parameters(network: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Turn off every parameter's ``requires_grad`` (only input gradients are needed) and
    return the flags as they were, for :func:`release`."""
    saved = [(param, param.requires_grad) for param in network.parameters()]
    for param, _ in saved:
        param.requires_grad_(False)
    return saved


def release(
    handles: list[torch.utils.hooks.RemovableHandle], saved_flags: list[tuple[nn.Parameter, bool]]
) -> None:
    """Remove the hooks and put the ``requires_grad`` flags back as they were (both emptied)."""
    for handle in handles:
        handle.remove()
    handles.clear()
    for param, flag in saved_flags:
        param.requires_grad_(flag)
    saved_flags.clear()


FP16_GRAD_SCALE = 1024.0
"""The loss scale of a float16 backward when none is given."""


def unscaled(grad: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """``grad`` in float32, divided by the loss scale of the backward that made it."""
    grad32 = grad.float()
    return grad32 / grad_scale if grad_scale != 1.0 else grad32


def tap_output(
    name: str, output: Any, hook: Callable[[torch.Tensor], None], roots: list[torch.Tensor]
) -> torch.Tensor:
    """Register ``hook`` on the gradient of layer ``name``'s ``output``.

    Returns the tensor the network continues with: ``output`` itself, or, when nothing before
    the layer needs a gradient (a frozen prefix, a lookup table), a clone of a new leaf that
    starts the backward graph there (appended to ``roots``); the clone keeps in-place
    operations downstream (``ReLU(inplace=True)``) off the leaf.

    Raises:
        UnsupportedLayerError: the layer does not return a tensor.
    """
    if not isinstance(output, torch.Tensor):
        raise UnsupportedLayerError(f"layer {name!r} does not return a tensor")
    if output.requires_grad:
        output.register_hook(hook)
        return output
    root = output.detach().requires_grad_()
    root.register_hook(hook)
    roots.append(root)
    return root.clone()


class LayerFisherTaps:
    """Hooks on the embedded layers of a network that turn output gradients into Fisher sums.

    Use as a context manager around forward/backward passes; every hook is removed on exit and
    the ``requires_grad`` flags of the network's parameters are restored. Inside the context all
    parameters are frozen, so backward passes compute input gradients only.

    After each backward pass through :meth:`backward`, ``batch_sums[name]`` holds (fp32, one
    value per filter) the sum over examples of the squared per-example gradient rows of that
    layer, summed over the backward passes since :meth:`start_batch`.

    Args:
        network: the network whose layers are tapped (a module, not a DDP wrapper).
        layers: ``(name, module)`` pairs from :func:`embedded_layers`.
        grad_scale: the loss is multiplied by this before backward and gradients are divided by
            it (in fp32) before they are squared; keeps fp16 gradients out of the underflow range.
    """

    def __init__(
        self, network: nn.Module, layers: Sequence[tuple[str, nn.Module]], grad_scale: float = 1.0
    ) -> None:
        self._network = network
        self._layers = list(layers)
        self._grad_scale = float(grad_scale)
        # The rule of each layer, chosen once here, never per hook call.
        self._rules = {name: layer_rule(name, module) for name, module in self._layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inputs: dict[str, Any] = {}
        self._roots: list[torch.Tensor] = []
        self._calls: dict[str, int] = {}
        self._fired: set[str] = set()
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self.batch_sums: dict[str, torch.Tensor] = {}
        # Per layer, the batch rows whose per-example values were NaN / inf (kept on the device,
        # checked once per batch by check_finite), and the dtype of the gradients seen.
        self._nonfinite: dict[str, torch.Tensor] = {}
        self._grad_dtype = torch.float32
        self._active = True
        self._rows: int | None = None

    # context management ----------------------------------------------------------------------
    def __enter__(self) -> LayerFisherTaps:
        self._saved_flags = freeze_parameters(self._network)
        try:
            for name, module in self._layers:
                self._install(name, module)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        release(self._handles, self._saved_flags)
        self._inputs.clear()
        self._roots.clear()

    def _install(self, name: str, module: nn.Module) -> None:
        child = self._rules[name].output_child
        if self._rules[name].whole_call:
            hook = self._call_hook(name)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        elif child is not None:
            # The output gradient is read at the input of a child (timm's BatchNormAct2d: its
            # batch-norm output goes through ``drop``, then ``act``).
            self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            inner = module.get_submodule(child)
            self._handles.append(inner.register_forward_pre_hook(self._pre_output_hook(name)))
        else:
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    def _input_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if not self._active:
                return
            self._record_call(name)
            self._inputs[name] = args[0].detach()

        return hook

    def _pre_output_hook(self, name: str) -> Callable[..., tuple[torch.Tensor, ...] | None]:
        def hook(
            module: nn.Module, args: tuple[torch.Tensor, ...]
        ) -> tuple[torch.Tensor, ...] | None:
            if not self._active:
                return None
            tapped = self._tap(name, args[0])
            return None if tapped is args[0] else (tapped, *args[1:])

        return hook

    def _forward_hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(
            module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor | None:
            if not self._active:
                return None
            self._record_call(name)
            self._check_batch_first(name, output)
            self._inputs[name] = args[0].detach()
            tapped = self._tap(name, output)
            return None if tapped is output else tapped

        return hook

    def _call_hook(self, name: str) -> Callable[..., Any]:
        """A layer whose rule needs its whole call: keep ``(args, kwargs)``, tap ``output[0]``."""

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            if not self._active:
                return None
            self._record_call(name)
            detach = lambda x: x.detach() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self._inputs[name] = (
                tuple(detach(arg) for arg in args),
                {key: detach(value) for key, value in kwargs.items()},
            )
            first = output[0] if isinstance(output, tuple) else output
            tapped = self._tap(name, first)
            if tapped is first:
                return None
            return (tapped, *output[1:]) if isinstance(output, tuple) else tapped

        return hook

    def _check_batch_first(self, name: str, output: torch.Tensor) -> None:
        rows = self._rows
        if (
            rows is not None
            and isinstance(output, torch.Tensor)
            and (output.ndim == 0 or output.shape[0] != rows)
        ):
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(dict(self._layers)[name]).__name__}) returned shape "
                f"{tuple(output.shape)} for a batch of {rows} examples: per-example gradients need "
                "the batch first (a layer run once for the whole batch, e.g. a position table "
                "looked up with arange(T), or a sequence-first layout, has none)",
                layer=name,
            )

    def _record_call(self, name: str) -> None:
        self._calls[name] = self._calls.get(name, 0) + 1
        if self._calls[name] > 1:
            raise UnsupportedLayerError(
                f"layer {name!r} runs more than once per forward pass (shared weights); its "
                "per-example gradient is not a single closed form. Skip it or use another probe"
            )

    def _tap(self, name: str, output: torch.Tensor) -> torch.Tensor:
        """Hook the gradient of ``output``; returns the tensor the network should continue with."""
        return tap_output(name, output, self._grad_hook(name), self._roots)

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        module = dict(self._layers)[name]
        rule = self._rules[name]

        def hook(grad: torch.Tensor) -> None:
            inputs = self._inputs[name]
            with torch.autocast(device_type=grad.device.type, enabled=False):
                grad32 = unscaled(grad, self._grad_scale)
                per_example = rule.sq_norms(module, inputs, grad32)
                values = per_example.sum(0)
            bad = ~torch.isfinite(per_example).all(-1)
            seen = self._nonfinite.get(name)
            self._nonfinite[name] = bad if seen is None else seen | bad
            self._grad_dtype = grad.dtype
            self._fired.add(name)
            total = self.batch_sums.get(name)
            self.batch_sums[name] = values if total is None else total + values

        return hook

    # driving ---------------------------------------------------------------------------------
    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run forward passes without the taps (for the ``batch`` estimator's weight gradients)."""
        self._active = False
        try:
            yield
        finally:
            self._active = True

    def start_batch(self, rows: int | None = None) -> None:
        """Forget the previous batch's inputs, roots and sums; expect ``rows`` examples."""
        self._rows = rows
        self._inputs.clear()
        self._roots.clear()
        self._calls.clear()
        self._fired.clear()
        self._nonfinite = {}
        self.batch_sums = {}

    def backward(self, loss: torch.Tensor, retain_graph: bool) -> None:
        """Backpropagate ``loss`` to the tapped layers (input gradients only)."""
        if not self._roots:
            raise FisherError(
                "no embedded layer was reached by the forward pass with a fresh gradient root; "
                "the input or the network's parameters may require gradients outside the taps"
            )
        torch.autograd.grad(
            loss * self._grad_scale if self._grad_scale != 1.0 else loss,
            self._roots,
            retain_graph=retain_graph,
            allow_unused=True,
        )

    @property
    def layers(self) -> list[tuple[str, nn.Module]]:
        """The tapped ``(name, module)`` pairs, in order."""
        return list(self._layers)

    @property
    def grad_scale(self) -> float:
        """The factor applied to losses before backward."""
        return self._grad_scale

    def check_all_fired(self) -> None:
        """Every embedded layer must have received a gradient; name those that did not."""
        missing = [name for name, _ in self._layers if name not in self._fired]
        if missing:
            raise FisherError(
                f"layers {missing} received no gradient from the logits (not called in forward, "
                "or called through a functional path that bypasses the module); they cannot be "
                "embedded"
            )

    def check_finite(self, ids: torch.Tensor | None = None) -> None:
        """Raise :class:`FisherError` if a per-example value of this batch was NaN or infinite.

        The message names the layers (the backward pass meets the one nearest the output first;
        the layers before it inherit its NaN / inf) and the examples (``ids`` of the batch rows).
        """
        names = [name for name, _ in self._layers if name in self._nonfinite]
        if not names:
            return
        flags = torch.stack([self._nonfinite[name].any() for name in names]).cpu()
        if not bool(flags.any()):
            return
        broken = [name for name, flag in zip(names, flags.tolist()) if flag]
        rows = self._nonfinite[broken[-1]].nonzero().flatten().cpu()
        bad = rows.tolist() if ids is None else ids.detach().cpu()[rows].tolist()
        raise FisherError(
            f"non-finite per-example gradients (NaN or inf) at layer {broken[-1]!r} for "
            f"{ids_text(bad, ids)}; {len(broken)} layer(s) affected: {broken[:5]}. The squared "
            "gradients overflow, or the probe's weights or activations hold NaN / inf"
            + precision_hint(self._grad_dtype, self._grad_scale),
            example_ids=bad if ids is not None else None,
        )
