"""Causal-LM probes (``get_probe("lm:...")``): loading, layers, head fitting, padding, determinism.

The numbers against brute force are in ``test_lm_fisher.py``. Models are tiny GPT-2 / Llama
configurations with random weights, saved with ``save_pretrained`` in a temporary folder, and
tokenizers trained on the spot: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from t2v_lightning import Task2Vec, get_probe
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.features import DatasetError
from t2v_lightning.fisher.layers.embedding import EmbeddingRule
from t2v_lightning.fisher.layers.linear import Conv1DRule, LinearRule
from t2v_lightning.fisher.layers.norm import LayerNormRule, RMSNormRule
from t2v_lightning.fisher.tokens import sequence_layers
from t2v_lightning.lm import CausalLMProbe, LMSettings, embed_lm, fit_lm_head, read_lm_task
from t2v_lightning.probe import ProbeError, probe_fingerprint
from tests.lm_models import save_tiny_gpt2, save_tiny_llama, token_task


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_gpt2_small_shapes_give_134993_values() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small's shapes, random weights
    layers = sequence_layers(model.transformer, "transformer.")
    assert sum(layer.num_rows for layer in layers) == 134_993
    kinds = {layer.name: type(layer.rule) for layer in layers}
    assert kinds["transformer.wte"] is EmbeddingRule and kinds["transformer.wpe"] is EmbeddingRule
    assert kinds["transformer.h.0.attn.c_attn"] is Conv1DRule
    assert kinds["transformer.ln_f"] is LayerNormRule
    assert not any("lm_head" in name for name in kinds)
    # Conv1D rows are input features: c_fc (768 -> 3072) gives 768 values, mlp.c_proj 3072.
    rows = {layer.name: layer.num_rows for layer in layers}
    assert rows["transformer.h.0.mlp.c_fc"] == 768 and rows["transformer.h.0.mlp.c_proj"] == 3072


def test_lm_probe_loads_gpt2_and_llama_offline(gpt2_dir: Path, llama_dir: Path) -> None:
    gpt2 = get_probe(f"lm:{gpt2_dir}")
    assert isinstance(gpt2, CausalLMProbe) and not gpt2.training
    assert gpt2.tokenizer("the cat sat")["input_ids"]
    names = [layer.name for layer in sequence_layers(gpt2.body, gpt2.body_prefix)]
    assert names[:3] == ["transformer.wte", "transformer.wpe", "transformer.h.0.ln_1"]
    llama = get_probe(f"lm:{llama_dir}")
    layers = sequence_layers(llama.body, llama.body_prefix)
    kinds = {layer.name: type(layer.rule) for layer in layers}
    assert kinds["model.embed_tokens"] is EmbeddingRule
    assert kinds["model.layers.0.input_layernorm"] is RMSNormRule  # LlamaRMSNorm
    assert kinds["model.layers.0.self_attn.q_proj"] is LinearRule
    assert not any("rotary" in name or "lm_head" in name for name in kinds)


def test_lm_probe_errors_name_the_problem(tmp_path: Path, gpt2_dir: Path) -> None:
    with pytest.raises(ProbeError, match=r"no such directory|cannot load"):
        get_probe(f"lm:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="cannot load a causal language model"):
        get_probe(f"lm:{tmp_path / 'empty'}")
    with pytest.raises(ProbeError, match="num_classes"):
        get_probe(f"lm:{gpt2_dir}", num_classes=3)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_task2vec_embeds_an_lm_task_and_never_changes_the_probe(
    which: str, gpt2_dir: Path, llama_dir: Path
) -> None:
    probe = get_probe(f"lm:{gpt2_dir if which == 'gpt2' else llama_dir}")
    before = {name: value.clone() for name, value in probe.state_dict().items()}
    fingerprint = probe_fingerprint(probe.model)
    embedding = Task2Vec(probe, progress_bar=False).embed(token_task(), task_name="toy")
    assert isinstance(embedding, TaskEmbedding)
    assert len(embedding) == sum(
        layer.num_rows for layer in sequence_layers(probe.body, probe.body_prefix)
    )
    assert bool((embedding.hessian >= 0).all()) and float(embedding.hessian.sum()) > 0
    meta = embedding.meta
    assert meta["probe_fingerprint"] == fingerprint and meta["estimator"] == "per_sample"
    assert meta["head_epochs"] == 5 and meta["head_lr"] == 5e-5 and meta["batch_size"] == 8
    assert meta["head_train_loss"] is not None and meta["num_samples"] == 6
    after = probe.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert probe_fingerprint(probe.model) == fingerprint
    # the pass freezes parameters while it runs and gives their flags back
    assert [p.requires_grad for p in probe.parameters()] == [True] * len(list(probe.parameters()))


def test_head_is_fitted_untied_and_moves(gpt2_dir: Path) -> None:
    probe = get_probe(f"lm:{gpt2_dir}")
    assert probe.lm_head.weight is probe.body.wte.weight  # GPT-2's tie
    task = read_lm_task(token_task(), probe.vocab_size)
    weight, bias, loss = fit_lm_head(probe, task, LMSettings(head_lr=1e-2), torch.device("cpu"))
    assert bias is None and loss is not None
    assert not torch.equal(weight, probe.lm_head.weight)
    none, _, _ = fit_lm_head(probe, task, LMSettings(head_epochs=0), torch.device("cpu"))
    assert torch.equal(none, probe.lm_head.weight)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_padding_side_and_length_do_not_change_the_embedding(
    which: str, gpt2_dir: Path, llama_dir: Path
) -> None:
    probe = get_probe(f"lm:{gpt2_dir if which == 'gpt2' else llama_dir}")
    right = embed_lm(probe, token_task(num=10, side="right"))
    left = embed_lm(probe, token_task(num=10, side="left", pad_to=16))
    longer = embed_lm(probe, token_task(num=10, side="right", pad_to=13))
    for other in (left, longer):
        assert _relative(other.hessian, right.hessian) <= 1e-6
    batch = LMSettings(estimator="batch", batch_size=4)
    assert (
        _relative(
            embed_lm(probe, token_task(num=10, side="left", pad_to=16), batch).hessian,
            embed_lm(probe, token_task(num=10), batch).hessian,
        )
        <= 1e-6
    )


def test_same_seed_same_bytes_other_seed_other_values(gpt2_dir: Path, tmp_path: Path) -> None:
    probe = get_probe(f"lm:{gpt2_dir}")
    task = token_task(num=9)
    paths = []
    for run in range(2):
        paths.append(
            embed_lm(probe, task, LMSettings(seed=5)).save(tmp_path / f"run{run}.safetensors")
        )
    assert paths[0].read_bytes() == paths[1].read_bytes()
    other = embed_lm(probe, task, LMSettings(seed=6))
    assert not torch.equal(other.hessian, TaskEmbedding.load(paths[0]).hessian)


def test_bf16_on_cpu_is_close_to_float32(gpt2_dir: Path) -> None:
    probe = get_probe(f"lm:{gpt2_dir}")
    task = token_task(num=8)
    full = embed_lm(probe, task, LMSettings(head_epochs=0))
    half = embed_lm(probe, task, LMSettings(head_epochs=0, precision="bf16-mixed"))
    assert half.meta["precision"] == "bf16-mixed"
    # bf16 keeps 8 bits of mantissa; a rare label drawn differently moves a few rows.
    assert _relative(half.hessian, full.hessian) < 0.1
    assert float(torch.corrcoef(torch.stack([half.hessian, full.hessian]))[0, 1]) > 0.98


def test_lm_options_that_do_not_apply_are_refused(gpt2_dir: Path) -> None:
    probe = get_probe(f"lm:{gpt2_dir}")
    with pytest.raises(ValueError, match=r"exact.*one backward pass per vocabulary entry"):
        Task2Vec(probe, estimator="exact")
    with pytest.raises(ValueError, match=r"variational.*not offered for language models"):
        Task2Vec(probe, method="variational")
    with pytest.raises(ValueError, match="reset_head=True does not apply"):
        Task2Vec(probe, reset_head=True)
    with pytest.raises(ValueError, match="precision='16-mixed'"):
        Task2Vec(probe, precision="16-mixed")
    with pytest.raises(ValueError, match="prepare\\(\\) reads labelled tasks"):
        Task2Vec(probe).prepare(token_task())


def test_bad_lm_tasks_are_named(gpt2_dir: Path) -> None:
    probe = get_probe(f"lm:{gpt2_dir}")
    good = token_task(num=3)
    with pytest.raises(DatasetError, match=r"item 1 .*'input_ids' and 'attention_mask'"):
        read_lm_task([good[0], (good[1]["input_ids"], 0)], probe.vocab_size)
    no_real = dict(good[1], attention_mask=torch.zeros_like(good[1]["attention_mask"]))
    with pytest.raises(DatasetError, match=r"item 1 .*no real token"):
        read_lm_task([good[0], no_real], probe.vocab_size)
    outside = dict(good[0], input_ids=good[0]["input_ids"] + 100)
    with pytest.raises(DatasetError, match=r"item 0 .*outside the probe's vocabulary"):
        read_lm_task([outside], probe.vocab_size)
    with pytest.raises(DatasetError, match="empty"):
        read_lm_task([], probe.vocab_size)
    # lists (as datasets returns them) of different lengths are read
    lists = [
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]},
        {"input_ids": [4, 5], "attention_mask": [1, 1], "text": "ignored"},
    ]
    task = read_lm_task(lists, probe.vocab_size)
    assert task.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]


def test_language_model_norms_are_entries_of_the_table() -> None:
    """Every RMSNorm class the table names exists in transformers and finds the RMSNorm rule."""
    import importlib

    from t2v_lightning.fisher.layers.table import RULES, rule_for

    names = [key for key in RULES if isinstance(key, str) and key.endswith("RMSNorm")]
    assert len(names) >= 10
    for key in names:
        module_name, _, class_name = key.rpartition(".")
        kind = getattr(importlib.import_module(module_name), class_name)
        assert isinstance(rule_for(kind(8)), RMSNormRule), key
    assert isinstance(rule_for(torch.nn.RMSNorm(8)), RMSNormRule)
