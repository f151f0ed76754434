"""Corpora and a byte-level tokenizer built on the spot (no network), for the corpus tests.

A byte-level BPE tokenizer is trained with ``tokenizers`` on a few documents; the tiny GPT-2 and
Llama models of ``tests.lm_models`` are saved with it, as a user's ``lm:DIR`` probe would be.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "dog",
    "ran",
    "far",
    "away",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "river",
    "stone",
    "green",
    "light",
]


def documents(count: int, empty_every: int = 0, seed: int = 0) -> list[str]:
    """``count`` short documents (distinct: each starts with its number); every
    ``empty_every``-th is blank (``""`` or spaces)."""
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(count):
        if empty_every and i % empty_every == 0:
            docs.append("" if i % 2 == 0 else "   ")
            continue
        length = 3 + int(torch.randint(0, 12, (1,), generator=generator))
        picks = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
        docs.append(f"doc{i} " + " ".join(WORDS[p] for p in picks))
    return docs


def train_tokenizer(vocab_size: int = 300) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``<eos>`` (also the padding token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents(300), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


def save_tiny_lm(folder: Path, arch: str = "gpt2", seed: int = 0) -> Path:
    """A tiny random ``arch`` (``"gpt2"`` or ``"llama"``) from ``tests.lm_models``, with the
    byte-level tokenizer of :func:`train_tokenizer` (every text has tokens, no unknowns)."""
    from tests.lm_models import save_tiny_gpt2, save_tiny_llama

    tokenizer = train_tokenizer()
    if arch == "gpt2":
        save_tiny_gpt2(folder, vocab_size=len(tokenizer), positions=64, seed=seed)
    elif arch == "llama":
        save_tiny_llama(folder, vocab_size=len(tokenizer), seed=seed)
    else:
        raise ValueError(arch)
    tokenizer.save_pretrained(folder)  # replaces the word-level one: token 0 is <eos> in both
    return folder


def write_corpus(path: Path, docs: Sequence[str | None], column: str = "text") -> Path:
    """Write documents as ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or ``.txt`` (by suffix),
    with an ``id`` column besides the text (``.txt``: one document per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, column: doc} for i, doc in enumerate(docs)]
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", column])
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": [r["id"] for r in rows], column: list(docs)}), path)
    elif suffix == ".txt":
        path.write_text("".join((doc or "") + "\n" for doc in docs))
    else:
        raise ValueError(suffix)
    return path
