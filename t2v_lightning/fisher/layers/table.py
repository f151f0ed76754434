"""The layer table: which rule embeds each module type, and which layers of a network are embedded.

:data:`RULES` maps a module type to its :class:`~t2v_lightning.fisher.layers.rule.LayerRule`.
A module finds its rule through its class and then its bases (:func:`rule_for`); a rule found
through a base holds for the subclass when the rule :meth:`accepts` it (by default, when the
subclass keeps the base's ``forward``). Types of optional packages (timm) are keyed by their
qualified name, ``"module.Class"``, so that the table never imports them. The rule of each layer
is chosen once, when the layers are picked (:func:`embedded_layers`, and
:func:`~t2v_lightning.fisher.variational.variational_layers` for the variational method); a
module with weights and no rule fails there with :class:`UnsupportedLayerError`, naming it.

How to add a layer type
-----------------------
1. Write its rule: a subclass of :class:`~t2v_lightning.fisher.layers.rule.LayerRule` in the
   module of its family (``linear.py``, ``conv.py``, ``norm.py``, or a new one), overriding:

   * :meth:`sq_norms(module, inputs, grad) <LayerRule.sq_norms>` → ``(B, rows)``: per example,
     the squared norm of each row of the weight gradient, rows being those of
     ``weight.reshape(weight.shape[0], -1)``. ``inputs`` is the layer's first input as the
     forward received it (integer ids for a lookup table: index with them; ``(B, T, ...)`` for
     a sequence); ``grad`` is the float32 gradient at the layer's output, zero at positions and
     examples that the loss masks out, so masked positions add nothing by themselves;
   * :meth:`rows <LayerRule.rows>` / :meth:`row_size <LayerRule.row_size>` only if the rows
     are not ``weight.shape[0]`` rows of ``weight[0].numel()`` entries (they are for
     ``weight (in, out)`` of Hugging Face's ``Conv1D``: one value per input feature);
   * :meth:`check <LayerRule.check>` to refuse unusable instances with a message naming them;
     :meth:`accepts <LayerRule.accepts>` to change which subclasses the rule covers;
     :attr:`output_child <LayerRule.output_child>` if the output gradient is read at a child;
   * for the variational method, ``variational = True`` and :meth:`receptive_field_sums`,
     :meth:`output_variance` and :meth:`grouped`; else leave ``variational = False``
     (1-D weights get no variance anyway).
2. Add one entry to :data:`RULES` below: ``nn.Embedding: EmbeddingRule()``, or
   ``"transformers.pytorch_utils.Conv1D": Conv1DRule()`` for a package not to import.
3. Test it against brute-force autograd (``tests/reference.py``: ``brute_force_fisher``
   differentiates each example's log-likelihood with respect to the weight) in
   ``tests/test_layer_rules.py``.

Nothing else changes: the hooks, the estimators and the variational pass ask the rule.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from t2v_lightning.choices import UnsupportedLayerError
from t2v_lightning.fisher.layers.attention import MultiheadAttentionRule
from t2v_lightning.fisher.layers.conv import ConvRule
from t2v_lightning.fisher.layers.embedding import EmbeddingRule
from t2v_lightning.fisher.layers.linear import Conv1DRule, LinearRule
from t2v_lightning.fisher.layers.norm import (
    BatchNormActRule,
    BatchNormRule,
    GroupNormRule,
    LayerNormRule,
    RMSNormRule,
)
from t2v_lightning.fisher.layers.rule import LayerRule

__all__ = [
    "RULES",
    "check_exclude",
    "embedded_layers",
    "excluded_modules",
    "layer_rule",
    "num_filters",
    "per_example_sq_norms",
    "plain_name",
    "row_size",
    "rule_for",
    "within",
]

_LINEAR = LinearRule()
_CONV = ConvRule()
_BATCH_NORM_ACT = BatchNormActRule()
_RMS_NORM = RMSNormRule()
_RMS_NORM_FAMILIES = (
    ("llama", "Llama"),
    ("mistral", "Mistral"),
    ("mixtral", "Mixtral"),
    ("qwen2", "Qwen2"),
    ("qwen3", "Qwen3"),
    ("gemma", "Gemma"),
    ("gemma2", "Gemma2"),
    ("phi3", "Phi3"),
    ("olmo2", "Olmo2"),
    ("smollm3", "SmolLM3"),
    ("granite", "Granite"),
)

RULES: dict[type | str, LayerRule] = {
    nn.Linear: _LINEAR,
    "timm.layers.linear.Linear": _LINEAR,  # casts for torchscript only
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: ConvRule(monte_carlo=False),
    "timm.layers.conv2d_same.Conv2dSame": ConvRule(tf_same=True),
    "timm.models.layers.conv2d_same.Conv2dSame": ConvRule(tf_same=True),  # timm < 0.9
    _BatchNorm: BatchNormRule(),
    "timm.layers.norm_act.BatchNormAct2d": _BATCH_NORM_ACT,
    "timm.layers.norm_act.SyncBatchNormAct": _BATCH_NORM_ACT,
    "timm.models.layers.norm_act.BatchNormAct2d": _BATCH_NORM_ACT,  # timm < 0.9
    nn.GroupNorm: GroupNormRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.RMSNorm: _RMS_NORM,
    nn.Embedding: EmbeddingRule(),
    nn.MultiheadAttention: MultiheadAttentionRule(),
    "transformers.pytorch_utils.Conv1D": Conv1DRule(),
    # Language models' RMSNorm classes (transformers): one per model family.
    **{
        f"transformers.models.{family}.modeling_{family}.{name}RMSNorm": _RMS_NORM
        for family, name in _RMS_NORM_FAMILIES
    },
}
"""Module type (or ``"package.module.Class"``) → the rule that embeds it."""


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule of ``module``'s type or of its nearest registered base that accepts it, or None."""
    for kind in type(module).__mro__:
        rule = RULES.get(kind) or RULES.get(f"{kind.__module__}.{kind.__qualname__}")
        if rule is not None:
            return rule if rule.accepts(module, kind) else None
    return None


_SUPPORTED = (
    "Linear, Conv1d, Conv2d (incl. timm Conv2dSame), BatchNorm (incl. timm BatchNormAct2d), "
    "GroupNorm, LayerNorm, RMSNorm (incl. Llama-style models'), Embedding, MultiheadAttention, HF Conv1D"
)


def layer_rule(name: str, module: nn.Module) -> LayerRule:
    """The Monte Carlo rule of the embedded layer ``name``, checked.

    Raises:
        UnsupportedLayerError: no rule, or one that refuses this instance (named, and kept as
            its ``layer``; the caller adds how to leave it out with its own options).
    """
    rule = rule_for(module)
    if rule is None or not rule.monte_carlo:
        raise UnsupportedLayerError(
            f"layer {name!r} ({type(module).__name__}) has weights but no filter-wise Fisher "
            f"here; supported: {_SUPPORTED}",
            layer=name,
        )
    try:
        rule.check(name, module)
    except UnsupportedLayerError as err:
        raise UnsupportedLayerError(str(err), layer=name) from None
    return rule


def check_exclude(exclude: Sequence[str] | str | None) -> tuple[str, ...]:
    """``exclude`` as a tuple of non-empty module names or globs (a lone string is one pattern)."""
    if exclude is None:
        return ()
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"exclude must hold module names or globs, got {pattern!r}")
    return patterns


def plain_name(name: str) -> str:
    """A module's qualified name without the ``_orig_mod`` of ``torch.compile`` wrappers."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def excluded_modules(network: nn.Module, exclude: Sequence[str]) -> list[str]:
    """Qualified names of the modules of ``network`` matched by the patterns of ``exclude``.

    Raises:
        ValueError: a pattern matches no module (named, with some of the module names).
    """
    names = [plain_name(name) for name, _ in network.named_modules() if name]
    matched: list[str] = []
    for pattern in exclude:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"exclude pattern {pattern!r} matches no module of the network; some of its "
                f"modules: {names[:12]}"
            )
        matched.extend(hit for hit in hits if hit not in matched)
    return matched


def embedded_layers(
    network: nn.Module, head: str | None, exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """The modules whose weights enter the embedding, in ``named_modules`` order.

    Every module that owns a ``weight`` parameter, except the head, the modules matched by
    ``exclude`` (qualified names or :mod:`fnmatch` globs) and their submodules. Modules
    replaced by ``nn.Identity`` (a skipped prefix) own no weight and drop out by themselves.
    Names are read without the ``_orig_mod`` of ``torch.compile`` wrappers.

    Raises:
        UnsupportedLayerError: a module with a weight has no rule here (named).
        ValueError: an ``exclude`` pattern matches no module.
    """
    left_out = [head] if head is not None else []
    left_out += excluded_modules(network, exclude)
    covered: list[str] = []  # modules whose rule takes their submodules' weights too
    layers: list[tuple[str, nn.Module]] = []
    for raw_name, module in network.named_modules():
        name = plain_name(raw_name)
        if any(within(name, out) for out in left_out):
            continue
        if any(name.startswith(parent + ".") for parent in covered):
            continue
        rule = rule_for(module)
        whole = rule is not None and rule.whole_call
        if not whole and module._parameters.get("weight") is None:
            continue
        layer_rule(name, module)
        layers.append((name, module))
        if whole:
            covered.append(name)
    return layers


def within(name: str, parent: str) -> bool:
    """Whether the module ``name`` is ``parent`` or one of its submodules."""
    return name == parent or name.startswith(parent + ".")


_PLAIN = LayerRule()


def num_filters(module: nn.Module) -> int:
    """Values of an embedded layer in the embedding (rows of its weight, per its rule)."""
    return (rule_for(module) or _PLAIN).rows(module)


def row_size(module: nn.Module) -> int:
    """Entries per row of an embedded layer's weight (per its rule)."""
    return (rule_for(module) or _PLAIN).row_size(module)


def per_example_sq_norms(
    module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """``(B, rows)``: squared norms of the per-example weight-gradient rows of ``module``.

    The rule of ``module``'s type (:meth:`LayerRule.sq_norms`), looked up in the table.

    Raises:
        UnsupportedLayerError: the type has no Monte Carlo rule.
    """
    rule = rule_for(module)
    if rule is None or not rule.monte_carlo:
        raise UnsupportedLayerError(f"no filter-wise Fisher for {type(module).__name__}")
    return rule.sq_norms(module, inputs, grad)
