"""Tiny causal language models saved with ``save_pretrained``, tokenizers trained on the spot."""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song",
    "cats and dogs play in the sun",
    "a song for the park and the sun",
    "the mat is red and the sun is hot",
]


def train_tokenizer(vocab_size: int = 40) -> object:
    """A byte-level BPE tokenizer with ``<eos>`` (also the padding token), as GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<unk>"])
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )


def save_tiny_gpt2(
    folder: Path,
    vocab_size: int = 40,
    layers: int = 2,
    width: int = 16,
    positions: int = 32,
    seed: int = 0,
    init_std: float = 0.02,
) -> Path:
    """A GPT-2 (tied head, Conv1D projections, learned positions) with random weights.

    A larger ``init_std`` than GPT-2's 0.02 gives peaked next-token distributions that differ
    from one position to the next (a near-uniform model cannot tell positions apart)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        initializer_range=init_std,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # layer norms away from their initial ones so that their rows differ
        for name, param in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(folder)
    train_tokenizer(vocab_size).save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, vocab_size: int = 40, seed: int = 0) -> Path:
    """A Llama (RMSNorm, rotary positions, nn.Linear projections, untied head), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(folder)
    train_tokenizer(vocab_size).save_pretrained(folder)
    return folder


def token_task(
    num: int = 6,
    length: int = 10,
    vocab_size: int = 40,
    seed: int = 0,
    min_length: int = 3,
    side: str = "right",
    pad_to: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Random sequences of varying lengths (repeated tokens included), padded on ``side``."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    total = pad_to if pad_to is not None else length
    for _ in range(num):
        size = int(torch.randint(min_length, length + 1, (1,), generator=generator))
        ids = torch.randint(1, vocab_size, (size,), generator=generator)
        ids[size // 2] = ids[0]  # a token repeated within the sequence
        padded = torch.zeros(total, dtype=torch.int64)
        mask = torch.zeros(total, dtype=torch.int64)
        where = slice(0, size) if side == "right" else slice(total - size, total)
        padded[where] = ids
        mask[where] = 1
        items.append({"input_ids": padded, "attention_mask": mask})
    return items
