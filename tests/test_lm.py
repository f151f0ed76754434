"""Causal-LM probes (``get_probe("lm:...")``): loading, layers, head fitting, padding, determinism.

The numbers against brute force are in ``test_lm_fisher.py``. Models are tiny GPT-2 / Llama
configurations with random weights, saved with ``save_pretrained`` in a temporary folder, and
tokenizers trained on the spot: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from t2v_lightning import Task2Vec, get_probe
from t2v_lightning.choices import FisherError
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.features import DatasetError
from t2v_lightning.fisher.layers.embedding import EmbeddingRule
from t2v_lightning.fisher.layers.linear import Conv1DRule, LinearRule
from t2v_lightning.fisher.layers.norm import LayerNormRule, RMSNormRule
from t2v_lightning.fisher.tokens import sequence_layers
from t2v_lightning.lm import (
    CausalLMProbe,
    LMSettings,
    _HeadGradient,
    embed_lm,
    fit_lm_head,
    lm_fisher,
    lm_settings,
    read_lm_task,
)
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


def test_loss_scale_is_undone_before_squaring(gpt2_dir: Path) -> None:
    """The float16 loss scale (forced on in float32) does not change the embedding."""
    probe = get_probe(f"lm:{gpt2_dir}")
    task = token_task(num=8)
    plain = embed_lm(probe, task, LMSettings(head_epochs=0))
    scaled = embed_lm(probe, task, LMSettings(head_epochs=0, grad_scale=1024.0))
    torch.testing.assert_close(scaled.hessian, plain.hessian, rtol=1e-6, atol=0)
    assert "grad_scale" not in scaled.meta  # recorded under float16 only


def test_overflowing_gradients_name_the_layers_and_sequences(gpt2_dir: Path) -> None:
    """A loss scale that overflows float32 gradients: the pass names where, and stops."""
    probe = get_probe(f"lm:{gpt2_dir}")
    with pytest.raises(FisherError, match=r"non-finite per-sequence gradients") as caught:
        embed_lm(probe, token_task(num=8), LMSettings(head_epochs=0, grad_scale=1e38))
    message = str(caught.value)
    assert "'transformer.h.0.attn.c_attn'" in message and "for sequences [0, 1" in message
    assert caught.value.example_ids == list(range(8))


def test_fp16_with_loss_scale_is_close_to_float32(gpt2_dir: Path) -> None:
    """The float16 path itself (autocast + loss scale), run on a CPU through lm_fisher: the
    public entry points run "16-mixed" as bf16 on a CPU, as Lightning does."""
    probe = get_probe(f"lm:{gpt2_dir}")
    task = read_lm_task(token_task(num=8), probe.vocab_size)
    weight = probe.lm_head.weight.detach().float()
    cpu = torch.device("cpu")
    full, count, _ = lm_fisher(probe, task, weight, None, LMSettings(), cpu)
    half_settings = LMSettings(precision="16-mixed")
    assert half_settings.loss_scale == 1024.0
    half, half_count, _ = lm_fisher(probe, task, weight, None, half_settings, cpu)
    assert count == half_count == 8
    full_values, half_values = torch.cat(list(full.values())), torch.cat(list(half.values()))
    assert all(v.dtype == torch.float64 for v in half.values())
    assert not torch.equal(full_values, half_values)  # float16 ran
    # float16 keeps 11 bits of mantissa and the label draws are the same: measured 5.8e-5
    # relative (bf16: 3.4e-4), correlation 1 - 2e-9.
    assert _relative(half_values, full_values) < 1e-3
    assert float(torch.corrcoef(torch.stack([half_values, full_values]))[0, 1]) > 0.99999


def test_fp16_on_cpu_runs_as_bf16_and_says_so(gpt2_dir: Path) -> None:
    probe = get_probe(f"lm:{gpt2_dir}")
    task = token_task(num=4)
    bf16 = embed_lm(probe, task, LMSettings(head_epochs=0, precision="bf16-mixed"))
    with pytest.warns(UserWarning, match="'16-mixed' is not supported on a CPU"):
        fp16 = embed_lm(probe, task, LMSettings(head_epochs=0, precision="16-mixed"))
    assert fp16.meta["precision"] == "bf16-mixed" and "grad_scale" not in fp16.meta
    assert torch.equal(fp16.hessian, bf16.hessian)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_gpu_is_close_to_float32(gpt2_dir: Path) -> None:
    probe = get_probe(f"lm:{gpt2_dir}")
    task = token_task(num=8)
    full = embed_lm(probe, task, LMSettings(head_epochs=0), device="cuda")
    half = embed_lm(probe, task, LMSettings(head_epochs=0, precision="16-mixed"), device="cuda")
    assert half.meta["precision"] == "16-mixed" and half.meta["grad_scale"] == 1024.0
    assert _relative(half.hessian, full.hessian) < 0.1
    assert float(torch.corrcoef(torch.stack([half.hessian, full.hessian]))[0, 1]) > 0.98


def test_head_fitting_equals_autograd_and_textbook_adamw(gpt2_dir: Path) -> None:
    """The closed-form head gradient and fused AdamW give what autograd through
    ``F.cross_entropy`` and the unfused AdamW give."""
    probe = get_probe(f"lm:{gpt2_dir}")
    task = read_lm_task(token_task(num=10), probe.vocab_size)
    settings = LMSettings(head_lr=1e-2, head_epochs=3, batch_size=4)
    weight, _, loss = fit_lm_head(probe, task, settings, torch.device("cpu"))
    reference = probe.lm_head.weight.detach().clone().requires_grad_()
    optimizer = torch.optim.AdamW(
        [reference], lr=1e-2, eps=1e-8, weight_decay=1e-4, foreach=False, fused=False
    )
    batches = []
    with torch.no_grad():
        for part in task.batches(4):
            ids, mask = task.input_ids[part], task.attention_mask[part]
            hidden = probe.hidden_states(ids, mask)
            has_next = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
            batches.append((hidden[:, :-1][has_next], ids[:, 1:][has_next]))
    for _ in range(3):
        total = count = 0.0
        for hidden, targets in batches:
            step_loss = F.cross_entropy(F.linear(hidden, reference), targets)
            step_loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += float(step_loss.detach()) * targets.numel()
            count += targets.numel()
    torch.testing.assert_close(weight, reference.detach(), rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_head_gradient_with_a_bias_equals_autograd() -> None:
    torch.manual_seed(0)
    hidden, targets = torch.randn(12, 6), torch.randint(0, 9, (12,))
    weight = torch.randn(9, 6, requires_grad=True)
    bias = torch.randn(9, requires_grad=True)
    loss = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    loss.backward()
    loss_sum, grad_weight, grad_bias = _HeadGradient(weight, 12)(
        hidden, targets, weight.detach(), bias.detach()
    )
    assert loss_sum == pytest.approx(12 * float(loss.detach()), rel=1e-6)
    torch.testing.assert_close(grad_weight, weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_bias, bias.grad, rtol=1e-5, atol=1e-7)


def test_lm_options_that_do_not_apply_are_refused(gpt2_dir: Path) -> None:
    probe = get_probe(f"lm:{gpt2_dir}")
    with pytest.raises(ValueError, match=r"exact.*one backward pass per vocabulary entry"):
        Task2Vec(probe, estimator="exact")
    with pytest.raises(ValueError, match=r"variational.*not offered for language models"):
        Task2Vec(probe, method="variational")
    with pytest.raises(ValueError, match="reset_head=True does not apply"):
        Task2Vec(probe, reset_head=True)
    with pytest.raises(ValueError, match="checkpoint_every_n_steps=5 does not apply"):
        Task2Vec(probe, checkpoint_every_n_steps=5)
    with pytest.raises(ValueError, match=r"variational.*not offered for language models"):
        Task2Vec(probe, variational_beta=0.5)
    with pytest.raises(TypeError, match=r"unknown arguments \['devices'\]"):
        lm_settings(devices=2)
    with pytest.raises(ValueError, match="precision='64-true'"):
        Task2Vec(probe, precision="64-true")
    with pytest.raises(ValueError, match="grad_scale must be a positive number"):
        LMSettings(grad_scale=0.0)
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
