"""The layer table of ``fisher/layers``: one rule per layer type, chosen once, failing loudly.

Each rule's numbers are checked against brute-force autograd in ``test_estimators.py`` and
``test_variational.py``; here: what the table holds, how a module finds its rule, and that a new
layer type is one rule class and one table entry (a toy type, checked against brute force).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import t2v_lightning.fisher
from t2v_lightning.choices import UnsupportedLayerError
from t2v_lightning.fisher import taps as taps_module
from t2v_lightning.fisher.estimators import LayerFisherTaps, batch_filter_sums, embedded_layers
from t2v_lightning.fisher.layers import table
from t2v_lightning.fisher.layers.conv import ConvRule
from t2v_lightning.fisher.layers.norm import BatchNormActRule, BatchNormRule
from t2v_lightning.fisher.layers.rule import LayerRule
from t2v_lightning.fisher.layers.table import RULES, rule_for
from t2v_lightning.fisher.variational import variational_layers
from tests.reference import as_vector, brute_force_fisher
from tests.test_estimators import estimate

EXACT_RTOL = 1e-5  # float32 closed forms against float32 per-example autograd


def test_timm_layers_are_entries_of_the_table() -> None:
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, Conv2dSame

    same = rule_for(Conv2dSame(3, 4, 3, stride=2))
    assert isinstance(same, ConvRule) and same.tf_same
    assert isinstance(rule_for(BatchNormAct2d(4)), BatchNormActRule)
    assert rule_for(BatchNormAct2d(4)).output_child == "drop"  # type: ignore[union-attr]
    assert "timm.layers.conv2d_same.Conv2dSame" in RULES
    assert "timm.layers.norm_act.BatchNormAct2d" in RULES
    assert isinstance(rule_for(nn.SyncBatchNorm(4)), BatchNormRule)


class RewrittenLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class PlainLinear(nn.Linear):
    pass


def test_subclasses_keep_their_base_rule_only_with_its_forward() -> None:
    assert rule_for(PlainLinear(3, 2)) is rule_for(nn.Linear(3, 2))
    assert rule_for(RewrittenLinear(3, 2)) is None
    model = nn.Sequential(RewrittenLinear(3, 2), nn.Linear(2, 2))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(RewrittenLinear\)"):
        embedded_layers(model, "1")
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(RewrittenLinear\)"):
        variational_layers(model, "1")


def test_an_unknown_type_is_refused_naming_the_module_and_its_type() -> None:
    model = nn.Sequential(nn.PReLU(), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(PReLU\)"):
        embedded_layers(model, "2")
    conv3d = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(Conv3d\)"):  # variational only
        embedded_layers(conv3d, "2")
    assert [name for name, _ in variational_layers(conv3d, "2")] == ["0"]


def test_the_rule_is_chosen_before_the_pass(
    monkeypatch: pytest.MonkeyPatch, tiny_convnet: nn.Module
) -> None:
    layers = embedded_layers(tiny_convnet, "fc")
    inputs = torch.randn(3, 3, 8, 8)
    with torch.enable_grad(), LayerFisherTaps(tiny_convnet, layers) as taps:

        def no_lookup(*args: object) -> None:
            raise AssertionError("a rule was looked up during the pass")

        monkeypatch.setattr(table, "rule_for", no_lookup)
        monkeypatch.setattr(table, "layer_rule", no_lookup)
        monkeypatch.setattr(taps_module, "layer_rule", no_lookup)
        sums, count = batch_filter_sums(
            tiny_convnet, taps, inputs, torch.arange(3), torch.ones(3, dtype=torch.bool), "exact", 0
        )
    assert count == 3 and set(sums) == {name for name, _ in layers}


class ChannelScale(nn.Module):
    """A layer type the table does not know: ``y[:, c] = x[:, c] * weight[c]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.reshape(1, -1, *([1] * (x.ndim - 2)))


class ChannelScaleRule(LayerRule):
    r""":math:`g_n[c] = \sum_p \delta_n[c, p]\, x_n[c, p]`."""

    def sq_norms(self, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        products = grad * inputs.float()
        return products.reshape(products.shape[0], products.shape[1], -1).sum(-1).square()


def test_a_new_layer_type_is_one_rule_and_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        ChannelScale(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(ChannelScale\)"):
        embedded_layers(model, "5")
    monkeypatch.setitem(RULES, ChannelScale, ChannelScaleRule())
    inputs = torch.randn(5, 3, 7, 7)
    layers = embedded_layers(model, "5")
    assert [name for name, _ in layers] == ["0", "1"]
    reference = as_vector(brute_force_fisher(model, inputs, "5"), layers)
    torch.testing.assert_close(estimate(model, inputs, "5"), reference, rtol=EXACT_RTOL, atol=0)


_KIND_WORDS = {"linear", "conv", "batchnorm", "groupnorm", "layernorm"}


def test_no_string_chain_on_layer_kinds_is_left_in_fisher() -> None:
    """No comparison with a layer-kind string or a class name anywhere under ``fisher/``."""
    found = []
    for path in Path(t2v_lightning.fisher.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            words = {side.value for side in sides if isinstance(side, ast.Constant)}
            names = [
                side
                for side in sides
                if isinstance(side, ast.Attribute) and side.attr == "__name__"
            ]
            if words & _KIND_WORDS or names:
                found.append(f"{path.name}:{node.lineno}")
    assert not found
