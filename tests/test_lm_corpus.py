"""Corpora cut into language-model tasks: formats, one shuffled pass, determinism, errors.

Every expectation is computed independently of the reader: the documents in the order of
:func:`permuted_indices` (itself checked to be a bijection), tokenised one by one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from t2v_lightning.data import corpus as corpus_module
from t2v_lightning.data.corpus import (
    CorpusError,
    CorpusSpec,
    CorpusStats,
    TokenTask,
    permuted_indices,
    read_documents,
    synthetic_task,
    token_tasks,
)
from tests.lm_corpus_helpers import documents, train_tokenizer, write_corpus

pytest.importorskip("datasets")

NUM_DOCS = 60


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer()


def spec(path: Path, tmp_path: Path, **options: Any) -> CorpusSpec:
    return CorpusSpec(str(path), cache_dir=str(tmp_path / "hf_cache"), **options)


def rows(task: TokenTask) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(task.input_ids, task.attention_mask)]


def expected_sequences(
    docs: list[str], tokenizer: Any, seed: int, max_length: int
) -> list[list[int]]:
    order = permuted_indices(len(docs), seed, 0, len(docs))
    kept = [docs[i] for i in order if docs[i] and docs[i].strip()]
    return [tokenizer(doc)["input_ids"][:max_length] for doc in kept]


# ------------------------------------------------------------------------------ permutation
@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 17, 1000, 4097])
def test_permutation_is_a_bijection_computed_in_any_chunks(size: int) -> None:
    whole = permuted_indices(size, 3, 0, size)
    assert sorted(whole.tolist()) == list(range(size))
    middle = size // 3
    parts = np.concatenate(
        [permuted_indices(size, 3, 0, middle), permuted_indices(size, 3, middle, size)]
    )
    assert (parts == whole).all()


def test_permutation_depends_on_the_seed_and_moves_elements() -> None:
    a, b = permuted_indices(1000, 0, 0, 1000), permuted_indices(1000, 1, 0, 1000)
    assert (a != b).mean() > 0.9
    assert (a != np.arange(1000)).mean() > 0.9
    # No visible structure: first half of positions spreads over the whole range.
    assert np.abs(np.sort(a[:500]).mean() - 500) < 60


# ------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
def test_every_format_gives_the_documents_in_the_permuted_order(
    suffix: str, tokenizer: Any, tmp_path: Path
) -> None:
    docs = documents(NUM_DOCS, empty_every=7)
    path = write_corpus(tmp_path / f"corpus{suffix}", docs)
    stats = CorpusStats()
    tasks = list(
        token_tasks(
            spec(path, tmp_path),
            tokenizer,
            num_tasks=3,
            task_size=10,
            max_length=8,
            seed=5,
            stats=stats,
        )
    )
    expected = expected_sequences(docs, tokenizer, 5, 8)
    assert [len(t) for t in tasks] == [10, 10, 10]
    assert [t.index for t in tasks] == [0, 1, 2]
    got = [row for task in tasks for row in rows(task)]
    assert got == expected[:30]
    assert all(t.input_ids.shape == (10, 8) for t in tasks)
    # Empty documents (blank strings; ".csv" reads "" as missing) are skipped and counted.
    assert stats.sequences == 30
    assert stats.documents - stats.empty_documents == 30
    order = permuted_indices(len(docs), 5, 0, len(docs))[: stats.documents]
    assert stats.empty_documents == sum(1 for i in order if not docs[i].strip())


def test_missing_text_counts_as_empty(tokenizer: Any, tmp_path: Path) -> None:
    docs: list[Any] = documents(30)
    docs[3] = None
    path = write_corpus(tmp_path / "c.jsonl", docs)
    stats = CorpusStats()
    list(token_tasks(spec(path, tmp_path), tokenizer, 1, 29, 8, stats=stats))
    assert stats.empty_documents == 1 and stats.documents == 30


def test_a_folder_of_files_is_one_corpus(tokenizer: Any, tmp_path: Path) -> None:
    docs = documents(40)
    write_corpus(tmp_path / "folder" / "a.jsonl", docs[:20])
    write_corpus(tmp_path / "folder" / "b.jsonl", docs[20:])
    texts = list(read_documents(spec(tmp_path / "folder", tmp_path), seed=0))
    assert sorted(texts) == sorted(docs)


def test_tasks_are_distinct_deterministic_and_do_not_depend_on_their_number(
    tokenizer: Any, tmp_path: Path
) -> None:
    path = write_corpus(tmp_path / "c.jsonl", documents(NUM_DOCS))
    four = list(token_tasks(spec(path, tmp_path), tokenizer, 4, 12, 16, seed=1))
    again = list(token_tasks(spec(path, tmp_path), tokenizer, 4, 12, 16, seed=1))
    two = list(token_tasks(spec(path, tmp_path), tokenizer, 2, 12, 16, seed=1))
    other = list(token_tasks(spec(path, tmp_path), tokenizer, 4, 12, 16, seed=2))
    assert [t.fingerprint() for t in four] == [t.fingerprint() for t in again]
    assert [t.fingerprint() for t in two] == [t.fingerprint() for t in four[:2]]
    assert [t.fingerprint() for t in other] != [t.fingerprint() for t in four]
    sequences = [tuple(r) for t in four for r in rows(t)]
    assert len(set(sequences)) == len(sequences) == 48  # documents are distinct: so are rows


def test_streamed_pass_is_deterministic_distinct_and_shuffled(
    tokenizer: Any, tmp_path: Path
) -> None:
    docs = documents(NUM_DOCS)
    path = write_corpus(tmp_path / "c.jsonl", docs)
    streamed = spec(path, tmp_path, streaming=True, shuffle_buffer=16)
    first = list(token_tasks(streamed, tokenizer, 4, 12, 16, seed=1))
    second = list(token_tasks(streamed, tokenizer, 4, 12, 16, seed=1))
    assert [t.fingerprint() for t in first] == [t.fingerprint() for t in second]
    got = [tuple(r) for t in first for r in rows(t)]
    assert len(set(got)) == 48
    every = {tuple(tokenizer(d)["input_ids"][:16]) for d in docs}
    assert set(got) <= every
    in_file_order = [tuple(tokenizer(d)["input_ids"][:16]) for d in docs[:48]]
    assert got != in_file_order


def test_packing_joins_documents_with_eos_and_cuts_full_sequences(
    tokenizer: Any, tmp_path: Path
) -> None:
    docs = documents(NUM_DOCS, empty_every=9)
    path = write_corpus(tmp_path / "c.jsonl", docs)
    stats = CorpusStats()
    tasks = list(
        token_tasks(spec(path, tmp_path), tokenizer, 2, 5, 8, seed=0, packing=True, stats=stats)
    )
    stream: list[int] = []
    order = permuted_indices(len(docs), 0, 0, len(docs))
    for i in order:
        if docs[i].strip():
            stream += tokenizer(docs[i])["input_ids"] + [tokenizer.eos_token_id]
    got = [row for task in tasks for row in rows(task)]
    assert all(len(row) == 8 for row in got)
    assert [token for row in got for token in row] == stream[:80]
    assert all(t.attention_mask.all() for t in tasks)


# ------------------------------------------------------------------------------ errors
def test_too_small_a_corpus_is_refused_before_reading(tokenizer: Any, tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "c.jsonl", documents(20))
    with pytest.raises(
        CorpusError,
        match=r"too small: 3 tasks x 10 sequences need 30, it has 20 "
        r"documents; lower --num_tasks or --task_size",
    ):
        next(token_tasks(spec(path, tmp_path), tokenizer, 3, 10, 8))


@pytest.mark.parametrize("options", [{"streaming": True}, {"packing": True}])
def test_too_small_a_stream_is_refused_when_it_ends(
    options: dict[str, Any], tokenizer: Any, tmp_path: Path
) -> None:
    path = write_corpus(tmp_path / "c.jsonl", documents(20, empty_every=5))
    packing = options.pop("packing", False)
    tasks = token_tasks(spec(path, tmp_path, **options), tokenizer, 50, 10, 8, packing=packing)
    with pytest.raises(
        CorpusError,
        match=r"too small: 50 tasks x 10 sequences need 500, it has "
        r"\d+ sequences from 20 documents \(4 empty, skipped\)",
    ):
        list(tasks)


@pytest.mark.parametrize("streaming", [False, True])
def test_unknown_column_lists_the_existing_ones(
    streaming: bool, tokenizer: Any, tmp_path: Path
) -> None:
    path = write_corpus(tmp_path / "c.jsonl", documents(20), column="content")
    with pytest.raises(
        CorpusError,
        match=r"--text_column 'text' is not a column of .*c.jsonl; "
        r"its columns: id, content$",
    ):
        list(token_tasks(spec(path, tmp_path, streaming=streaming), tokenizer, 1, 5, 8))


@pytest.mark.parametrize("streaming", [False, True])
def test_unreadable_files_are_one_line_errors(
    streaming: bool, tokenizer: Any, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut sh\n')
    with pytest.raises(CorpusError, match=r"broken.jsonl") as caught:
        list(token_tasks(spec(broken, tmp_path, streaming=streaming), tokenizer, 1, 1, 8))
    assert "\n" not in str(caught.value)
    with pytest.raises(CorpusError, match=r"--data .*missing.parquet does not exist"):
        list(token_tasks(spec(tmp_path / "missing.parquet", tmp_path), tokenizer, 1, 1, 8))
    odd = tmp_path / "corpus.docx"
    odd.write_text("x")
    with pytest.raises(CorpusError, match=r"cannot read files of this type"):
        list(token_tasks(spec(odd, tmp_path), tokenizer, 1, 1, 8))


def test_a_stream_failing_part_way_names_where(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = documents(400)

    class FailingStream:
        column_names: ClassVar[list[str]] = ["text"]

        def shuffle(self, seed: int, buffer_size: int) -> FailingStream:
            return self

        def __iter__(self) -> Iterator[dict[str, str]]:
            for i, doc in enumerate(docs):
                if i == 300:
                    raise ConnectionError("connection reset by peer")
                yield {"text": doc}

    monkeypatch.setattr(corpus_module, "_load", lambda spec: FailingStream())
    tasks = token_tasks(CorpusSpec("some/corpus", streaming=True), tokenizer, 6, 60, 8)
    assert [next(tasks).index for _ in range(5)] == [0, 1, 2, 3, 4]  # documents 0-299
    with pytest.raises(
        CorpusError,
        match=r"reading --data some/corpus failed after 300 "
        r"documents: connection reset by peer",
    ):
        next(tasks)


def test_bad_shapes_name_the_option(tokenizer: Any, tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "c.jsonl", documents(5))
    with pytest.raises(CorpusError, match="--task_size must be a positive integer"):
        next(token_tasks(spec(path, tmp_path), tokenizer, 1, 0, 8))


# ------------------------------------------------------------------------------ bounds
def test_lower_bound_repeats_one_non_eos_token_per_sequence() -> None:
    vocab, eos = 5, 2
    task = synthetic_task("lower", 3, 400, 6, vocab, eos, seed=0, pad_id=eos)
    ids, mask = task.input_ids, task.attention_mask
    first = ids[:, 0]
    assert (first != eos).all() and set(first.tolist()) == {0, 1, 3, 4}
    assert ((ids == first[:, None]) | (mask == 0)).all()
    lengths = mask.sum(1)
    # Each later position ends the sequence with probability 1/V: P(length = 1) = 1/5.
    assert abs(float((lengths == 1).float().mean()) - 0.2) < 0.06
    assert (mask[:, 0] == 1).all() and (mask[:, :-1] >= mask[:, 1:]).all()
    again = synthetic_task("lower", 3, 400, 6, vocab, eos, seed=0, pad_id=eos)
    assert torch.equal(again.input_ids, ids)
    assert not torch.equal(synthetic_task("lower", 4, 400, 6, vocab, eos, 0, eos).input_ids, ids)


def test_upper_bound_is_uniform_over_the_vocabulary() -> None:
    task = synthetic_task("upper", 0, 200, 50, 7, 2, seed=1)
    counts = torch.bincount(task.input_ids.flatten(), minlength=7).double()
    assert counts.numel() == 7 and task.attention_mask.all()
    expected = 200 * 50 / 7
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 22.5  # chi-square with 6 degrees of freedom, p = 0.001
