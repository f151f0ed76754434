"""The layer rules of token models: ``nn.Embedding`` and ``nn.MultiheadAttention``.

Each is compared with brute-force autograd: the exact Fisher, one example and one class at a
time, float64 accumulation, of every weight the rule covers (the embedding's table; the
attention's ``in_proj_weight`` then ``out_proj.weight``). Tolerance: relative error 1e-5 per
entry where the reference is above 1e-12 (float32 round-off), absolute 1e-12 elsewhere (rows
no example looks up are exactly zero).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from t2v_lightning import FisherCallback, Task2Vec
from t2v_lightning.choices import UnsupportedLayerError
from t2v_lightning.fisher.estimators import LayerFisherTaps, batch_filter_sums
from t2v_lightning.fisher.layers.table import embedded_layers, row_size

VOCAB, WIDTH, LENGTH, CLASSES = 11, 8, 5, 3
QUIET = {
    "accelerator": "cpu",
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "logger": False,
}


class TokenClassifier(nn.Module):
    """Token and position tables, a torch.nn transformer encoder layer, mean pooling, a head."""

    def __init__(self, padding_idx: int | None = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(VOCAB, WIDTH, padding_idx=padding_idx)
        self.positions = nn.Embedding(LENGTH, WIDTH)
        self.encoder = nn.TransformerEncoderLayer(
            WIDTH, nhead=2, dim_feedforward=12, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        padding = ids == 0
        # Positions looked up per example (the batch first), as per-example gradients need.
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.encoder(self.tokens(ids) + self.positions(positions), src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).float()
        return self.head((x * keep).sum(1) / keep.sum(1))


def token_ids(n: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=generator)
    ids[::3, -2:] = 0  # padding at the end of every third sequence
    ids[1, :3] = 4  # a token repeated within one example: its gradients add before squaring
    return ids


def weights_of(module: nn.Module) -> list[torch.Tensor]:
    if isinstance(module, nn.MultiheadAttention):
        return [module.in_proj_weight, module.out_proj.weight]
    return [module.weight]


def brute_force(network: nn.Module, ids: torch.Tensor, head: str) -> dict[str, torch.Tensor]:
    """Exact Fisher per row: (1/N) Σ_n Σ_y p(y|x_n) · mean over the row of (∂ log p / ∂W)²."""
    network.eval()
    layers = embedded_layers(network, head)
    params = [w for _, module in layers for w in weights_of(module)]
    flags = [p.requires_grad for p in network.parameters()]
    network.requires_grad_(False)
    for weight in params:
        weight.requires_grad_(True)
    totals = {name: torch.zeros(0, dtype=torch.float64) for name, _ in layers}
    try:
        sums = [torch.zeros(w.shape[0], dtype=torch.float64) for w in params]
        for n in range(ids.shape[0]):
            log_probs = network(ids[n : n + 1])[0].log_softmax(-1)
            for log_p in log_probs:
                grads = torch.autograd.grad(log_p, params, retain_graph=True)
                for total, grad in zip(sums, grads):
                    total += float(log_p.detach().exp()) * grad.double().reshape(
                        grad.shape[0], -1
                    ).square().mean(-1)
    finally:
        for p, flag in zip(network.parameters(), flags):
            p.requires_grad_(flag)
    position = 0
    for name, module in layers:
        count = len(weights_of(module))
        totals[name] = torch.cat(sums[position : position + count]) / ids.shape[0]
        position += count
    return totals


def closed_form(network: nn.Module, ids: torch.Tensor, head: str) -> dict[str, torch.Tensor]:
    layers = embedded_layers(network, head)
    network.eval()
    with torch.enable_grad(), LayerFisherTaps(network, layers) as taps:
        rows = torch.arange(ids.shape[0])
        sums, count = batch_filter_sums(
            network, taps, ids, rows, torch.ones_like(rows, dtype=torch.bool), "exact", 0, 1
        )
    sizes = {name: row_size(module) for name, module in layers}
    return {name: value.double() / (count * sizes[name]) for name, value in sums.items()}


def assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-12, msg=name)


def test_embedding_and_attention_rules_match_brute_force() -> None:
    network = TokenClassifier()
    ids = token_ids()
    layers = dict(embedded_layers(network, "head"))
    assert "encoder.self_attn" in layers and "encoder.self_attn.out_proj" not in layers
    assert "tokens" in layers and "positions" in layers
    got = closed_form(network, ids, "head")
    assert got["tokens"].shape == (VOCAB,) and got["encoder.self_attn"].shape == (4 * WIDTH,)
    assert float(got["tokens"][0]) == 0.0  # the padding row gets no gradient
    unused = sorted(set(range(VOCAB)) - set(ids.flatten().tolist()))
    assert all(float(got["tokens"][row]) == 0.0 for row in unused)
    assert_matches(got, brute_force(network, ids, "head"))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_with_a_causal_mask_per_example(batch_first: bool) -> None:
    """A 3-D attention mask (one per example and head), no key padding, either layout."""

    class Causal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=batch_first)
            self.head = nn.Linear(WIDTH, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            blocked = torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1)
            per_example = blocked.repeat(x.shape[0] * 2, 1, 1)
            seq = x if batch_first else x.transpose(0, 1)
            out, _ = self.attention(seq, seq, seq, attn_mask=per_example)
            return self.head(out.mean(1 if batch_first else 0))

    network = Causal()
    x = torch.randn(6, LENGTH, WIDTH, generator=torch.Generator().manual_seed(2))
    assert_matches(closed_form(network, x, "head"), brute_force(network, x, "head"))


def test_a_table_looked_up_once_for_the_batch_is_refused() -> None:
    class Shared(TokenClassifier):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(
                (self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))).mean(1)
            )

    with pytest.raises(
        UnsupportedLayerError,
        match=r"'positions' \(Embedding\) returned shape \(5, 8\) for a batch of 9",
    ):
        closed_form(Shared(), token_ids(), "head")


def test_embedding_rule_keeps_memory_per_pair_not_per_table() -> None:
    """No per-example table gradient: memory grows with B·T pairs, not with B·V·D."""
    from t2v_lightning.fisher.layers.embedding import table_sq_norms

    ids = torch.tensor([[1, 1, 2], [2, 3, 3]])
    grad = torch.arange(18, dtype=torch.float32).reshape(2, 3, 3)
    out = table_sq_norms(ids, grad, 100_000)
    assert out.shape == (2, 100_000)
    expected_first = (grad[0, 0] + grad[0, 1]).square().sum()
    assert float(out[0, 1]) == float(expected_first) and float(out[1, 3]) == float(
        (grad[1, 1] + grad[1, 2]).square().sum()
    )


class TransformerProject(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TokenClassifier()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        ids, labels = batch
        return F.cross_entropy(self(ids), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_transformer_classifier_project(tmp_path: Path) -> None:
    """A torch.nn transformer classifier with token embeddings, embedded by the callback, equals
    brute force on the trained model and Task2Vec with the callback's arguments."""
    ids = token_ids(12)
    labels = torch.arange(12) % CLASSES
    model = TransformerProject()
    callback = FisherCallback(
        estimator="exact", head="head", network="net", exclude=["encoder.norm*"]
    )
    pl.Trainer(max_epochs=2, callbacks=[callback], default_root_dir=tmp_path, **QUIET).fit(
        model, DataLoader(TensorDataset(ids, labels), batch_size=5, shuffle=True)
    )
    embedding = callback.embedding
    assert embedding is not None
    assert "encoder.norm1" not in embedding.layers and "encoder.self_attn" in embedding.layers
    expected = brute_force(model.net, ids, "head")
    expected = {name: expected[name] for name in embedding.layers}
    got = {
        name: embedding.hessian[start:end].double()
        for name, (start, end) in embedding.layers.items()
    }
    assert_matches(got, {k: v / 1 for k, v in expected.items()})
    t2v = Task2Vec(
        model.net,
        head="head",
        exclude=["encoder.norm*"],
        estimator="exact",
        reset_head=False,
        head_epochs=0,
        balanced_sampling=False,
        max_samples=None,
        batch_size=5,
        progress_bar=False,
        accelerator="cpu",
    ).embed(TensorDataset(ids, labels))
    assert list(t2v.layers) == list(embedding.layers)
    torch.testing.assert_close(t2v.hessian, embedding.hessian, rtol=1e-5, atol=1e-12)


def test_the_batch_estimator_names_a_layer_without_one_weight() -> None:
    """Attention keeps its input projections in ``in_proj_weight``: ``batch`` (one weight per
    layer) is refused naming the layer and the two ways out, not with a bare attribute error."""
    ids = token_ids()
    labels = torch.arange(len(ids)) % CLASSES
    options = dict(head="head", reset_head=False, head_epochs=0, progress_bar=False)
    with pytest.raises(
        UnsupportedLayerError,
        match=r"estimator='batch'.*'encoder\.self_attn'.*"
        r"estimator='per_sample'.*exclude=\['encoder\.self_attn'\]",
    ):
        Task2Vec(TokenClassifier(), estimator="batch", accelerator="cpu", **options).embed(
            TensorDataset(ids, labels)
        )
