r"""Text corpora cut into language-model tasks: one shuffled pass, consecutive tasks of B sequences.

A *corpus* is a Hugging Face ``datasets`` dataset (name, config, split; streamed or not) or local
files that ``datasets`` reads (``.jsonl`` / ``.json``, ``.txt`` — one document per line —,
``.csv``, ``.parquet``; compressed ``.gz`` / ``.bz2`` / ``.xz`` / ``.zst`` too, or a folder of
such files), with a text column. :func:`token_tasks` reads it once in a shuffled order, tokenises
each document with the probe's tokenizer and cuts the stream of sequences into consecutive tasks
of ``task_size`` distinct sequences (SPEC section 8, item 4): task ``k`` holds sequences
``k·B … (k+1)·B − 1`` of the pass, so it depends on the seed and the settings but not on how
many tasks are asked for, on resuming, or on which process embeds it.

Sequences (``packing=False``, the default, as in the published code and the paper): one
document gives one sequence, its first ``max_length`` tokens (the rest is dropped). With
``packing=True`` documents are joined, each followed by the tokenizer's end-of-sequence token,
and the stream is cut into sequences of exactly ``max_length`` tokens (nothing is dropped but
the incomplete last one).

Shuffling, in memory that does not grow with the corpus:

* not streamed: the rows are visited in the order of a keyed pseudo-random permutation
  (:func:`permuted_indices`: a Feistel network with cycle walking), computed chunk by chunk, so
  no index array of the corpus's size is ever built; the rows are read from ``datasets``'
  memory-mapped Arrow files;
* streamed: ``datasets``' own shuffle (shard order, then a buffer of ``shuffle_buffer``
  documents), an approximate shuffle whose memory is the buffer.

Documents whose text is missing, blank, or tokenises to nothing are skipped and counted
(:class:`CorpusStats`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from t2v_lightning.safety import is_int

__all__ = [
    "CorpusError",
    "CorpusSpec",
    "CorpusStats",
    "SyntheticCorpus",
    "TokenTask",
    "corpus_label",
    "local_builder",
    "pad_token_id",
    "permuted_indices",
    "read_documents",
    "synthetic_task",
    "token_tasks",
]

# ``datasets``' packaged builders for local files, by extension.
_BUILDERS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".txt": "text",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_READ_CHUNK = 1024  # documents read (and tokenised) at a time


class CorpusError(ValueError):
    """A corpus that cannot be read or is too small; the message is one line naming the corpus."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True)
class CorpusSpec:
    """Where the text of a corpus comes from.

    Args:
        data: a Hugging Face dataset name (``"allenai/c4"``), a local file or a folder of files.
        config: the dataset's configuration (``"en"``); ``None`` for local files.
        split: the split to read (local files have ``"train"`` only).
        text_column: the column holding the documents' text (``.txt`` files: ``"text"``).
        streaming: read as a stream (nothing downloaded or converted first).
        shuffle_buffer: documents held by the streamed shuffle (ignored when not streamed).
        cache_dir: where ``datasets`` keeps what it downloads and prepares (``None``: its
            default, ``~/.cache/huggingface/datasets``).
    """

    data: str
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    shuffle_buffer: int = 10_000
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or not self.data.strip():
            raise CorpusError(f"--data must name a dataset or a file, got {self.data!r}")
        if not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 1:
            raise CorpusError(
                f"shuffle_buffer must be a positive integer, got {self.shuffle_buffer!r}"
            )

    def identity(self) -> dict[str, Any]:
        """What decides the order of the pass (recorded in each task's artifact)."""
        facts = asdict(self)
        facts.pop("cache_dir")
        if not self.streaming:
            facts.pop("shuffle_buffer")
        return facts


@dataclass
class CorpusStats:
    """What one pass read.

    Attributes:
        documents: documents read.
        empty_documents: documents skipped (missing or blank text, or no tokens).
        sequences: sequences produced.
    """

    documents: int = 0
    empty_documents: int = 0
    sequences: int = 0


@dataclass(frozen=True)
class SyntheticCorpus:
    """The bounds of SPEC section 8: token sequences made up, no text.

    ``"lower"``: each sequence repeats one token drawn uniformly from the vocabulary without the
    end-of-sequence token (a new token per sequence); every position after the first ends the
    sequence with probability ``1/V``. ``"upper"``: every token uniform over the vocabulary.

    Args:
        kind: ``"lower"`` or ``"upper"``.
    """

    kind: Literal["lower", "upper"]

    def __post_init__(self) -> None:
        if self.kind not in ("lower", "upper"):
            raise ValueError(f"kind must be 'lower' or 'upper', got {self.kind!r}")

    def identity(self) -> dict[str, Any]:
        """Recorded in each task's artifact."""
        return {"synthetic": f"{self.kind}_bound"}


class TokenTask(Dataset[dict[str, torch.Tensor]]):
    """A language-model task: ``B`` token sequences, right-padded to one length.

    Each item is ``{"input_ids": LongTensor[L], "attention_mask": LongTensor[L]}`` (no label: the
    task is next-token prediction), as :meth:`Task2Vec.embed` takes it with a language-model
    probe.

    Args:
        input_ids: ``B x L`` token ids (padding positions hold ``pad_id``).
        attention_mask: ``B x L``, 1 on real tokens, 0 on padding.
        index: the task's place in the pass.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: int) -> None:
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids and attention_mask must be two B x L tensors of one shape, got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        self.input_ids = input_ids.long()
        self.attention_mask = attention_mask.long()
        self.index = index

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[item], "attention_mask": self.attention_mask[item]}

    def fingerprint(self) -> str:
        """SHA-256 of the real tokens of every sequence (padding and its value excluded)."""
        digest = hashlib.sha256()
        for ids, mask in zip(self.input_ids, self.attention_mask):
            real = ids[mask.bool()].to(torch.int64).numpy()
            digest.update(np.int64(real.size).tobytes())
            digest.update(real.tobytes())
        return digest.hexdigest()


# ------------------------------------------------------------------------------ the permutation
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z & _MASK64


def _round_keys(seed: int, rounds: int) -> list[np.uint64]:
    digest = hashlib.sha256(f"t2v-corpus-permutation:{seed}".encode()).digest()
    return [np.uint64(int.from_bytes(digest[4 * r : 4 * r + 8], "little")) for r in range(rounds)]


def permuted_indices(size: int, seed: int, start: int, stop: int) -> np.ndarray:
    """Positions ``start … stop − 1`` of a pseudo-random permutation of ``range(size)``.

    A balanced Feistel network (6 rounds keyed by ``seed``) permutes the smallest power-of-4
    domain that holds ``size`` values; values that land outside ``range(size)`` are permuted
    again until they fall inside (cycle walking), which keeps it a bijection. Nothing of size
    ``size`` is built: memory is that of the ``stop − start`` positions asked for.

    Args:
        size: the number of elements permuted.
        seed: the permutation's key.
        start: first position.
        stop: one past the last position (at most ``size``).

    Returns:
        ``int64`` array of ``stop − start`` distinct values in ``range(size)``.
    """
    if size < 1 or not 0 <= start <= stop <= size:
        raise ValueError(f"positions {start}..{stop} are not inside a permutation of {size}")
    half_bits = max(1, math.ceil(math.log2(size) / 2)) if size > 1 else 1
    low_mask = np.uint64((1 << half_bits) - 1)
    keys = _round_keys(seed, 6)
    values = np.arange(start, stop, dtype=np.uint64)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half_bits), x & low_mask
        for key in keys:
            with np.errstate(over="ignore"):
                mixed = _mix64(right + key * np.uint64(0x9E3779B97F4A7C15)) & low_mask
            left, right = right, left ^ mixed
        return (left << np.uint64(half_bits)) | right

    out = feistel(values)
    outside = out >= np.uint64(size)
    while outside.any():
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(size)
    return out.astype(np.int64)


# ------------------------------------------------------------------------------ reading
def local_builder(path: Path) -> tuple[str, list[str]]:
    """The ``datasets`` builder and the files of a local corpus (a file or a folder).

    Raises:
        CorpusError: an extension ``datasets`` does not read, a folder without such files, or
            with files of several formats.
    """

    def builder_of(file: Path) -> str | None:
        suffixes = [s.lower() for s in file.suffixes]
        if suffixes and suffixes[-1] in _COMPRESSIONS:
            suffixes = suffixes[:-1]
        return _BUILDERS.get(suffixes[-1]) if suffixes else None

    known = ", ".join(sorted(_BUILDERS))
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and builder_of(f))
        if not files:
            raise CorpusError(f"--data folder {path} holds no corpus files ({known})")
        kinds = {builder_of(f) for f in files}
        if len(kinds) > 1:
            raise CorpusError(
                f"--data folder {path} mixes file formats ({', '.join(sorted(map(str, kinds)))}); "
                "keep one"
            )
        return str(kinds.pop()), [str(f) for f in files]
    kind = builder_of(path)
    if kind is None:
        raise CorpusError(f"--data {path}: cannot read files of this type (known: {known})")
    return kind, [str(path)]


def _looks_like_path(data: str) -> bool:
    lowered = data.lower()
    return (
        data.startswith(("/", "./", "../", "~"))
        or os.sep in data.strip("/").split("/", 1)[-1]
        or any(
            lowered.endswith(ext) or lowered.endswith(ext + c)
            for ext in _BUILDERS
            for c in ("", *_COMPRESSIONS)
        )
    )


def corpus_label(spec: CorpusSpec | SyntheticCorpus) -> str:
    """A short human name of a corpus (its file name, or dataset name and config)."""
    if isinstance(spec, SyntheticCorpus):
        return f"{spec.kind}_bound"
    if Path(spec.data).exists():
        return Path(spec.data).name
    return spec.data if spec.config is None else f"{spec.data}/{spec.config}"


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < 400 else text[:400] + " …"


def _load(spec: CorpusSpec) -> Any:
    """The ``datasets`` object of a corpus (an ``IterableDataset`` when streamed)."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - the extra is installed with the package's
        raise ImportError(
            "reading a corpus needs the 'datasets' package: pip install 't2v-lightning[lm]'"
        ) from err
    datasets.disable_progress_bars()
    path = Path(spec.data).expanduser()
    try:
        if path.exists():
            builder, files = local_builder(path)
            if spec.config is not None:
                raise CorpusError(
                    f"--data_config {spec.config!r} applies to hub datasets, not to local files "
                    f"({spec.data})"
                )
            if not os.access(files[0], os.R_OK):
                raise CorpusError(f"--data {files[0]} is not readable (permissions)")
            return datasets.load_dataset(
                builder,
                data_files=files,
                split=spec.split,
                streaming=spec.streaming,
                cache_dir=spec.cache_dir,
            )
        if _looks_like_path(spec.data):
            raise CorpusError(f"--data {spec.data} does not exist")
        return datasets.load_dataset(
            spec.data,
            spec.config,
            split=spec.split,
            streaming=spec.streaming,
            cache_dir=spec.cache_dir,
        )
    except CorpusError:
        raise
    except Exception as err:
        raise CorpusError(f"cannot read --data {spec.data}: {_first_line(err)}") from err


def _missing_column(spec: CorpusSpec, columns: Sequence[str]) -> CorpusError:
    return CorpusError(
        f"--text_column {spec.text_column!r} is not a column of {spec.data}; its columns: "
        f"{', '.join(map(str, columns)) or '(none)'}"
    )


def read_documents(spec: CorpusSpec, seed: int, dataset: Any = None) -> Iterator[str | None]:
    """The documents' texts in the shuffled order of the pass (``None`` for a missing text).

    Args:
        spec: the corpus.
        seed: the shuffle's seed.
        dataset: the corpus already opened (``None``: opened here).

    Raises:
        CorpusError: the corpus cannot be opened, the text column is unknown (the message lists
            the existing ones), or reading fails part way (the message says after how many
            documents).
    """
    dataset = _load(spec) if dataset is None else dataset
    column = spec.text_column
    columns = getattr(dataset, "column_names", None)
    if columns is not None and column not in columns:
        raise _missing_column(spec, columns)
    read = 0
    try:
        if spec.streaming:
            shuffled = dataset.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)
            for example in shuffled:
                if column not in example:
                    raise _missing_column(spec, list(example))
                read += 1
                yield example[column]
            return
        size = len(dataset)
        if size == 0:
            return
        dataset = dataset.select_columns([column])
        for start in range(0, size, _READ_CHUNK):
            indices = permuted_indices(size, seed, start, min(size, start + _READ_CHUNK))
            texts = dataset[indices.tolist()][column]
            for text in texts:
                read += 1
                yield text
    except CorpusError:
        raise
    except Exception as err:
        raise CorpusError(
            f"reading --data {spec.data} failed after {read} documents: {_first_line(err)}"
        ) from err


# ------------------------------------------------------------------------------ tokenising
def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's padding id: ``pad_token_id``, else ``eos_token_id``, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _eos_id(tokenizer: Any) -> int:
    value = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(value, int):
        raise CorpusError(
            "packing=True separates documents with the end-of-sequence token, and this "
            "tokenizer has none (use packing=False)"
        )
    return value


def _sequences(
    documents: Iterator[str | None],
    tokenizer: Any,
    max_length: int,
    packing: bool,
    stats: CorpusStats,
    chunk: int = 256,
) -> Iterator[list[int]]:
    """Token sequences in the order of ``documents``; ``stats`` counts the documents consumed
    (texts are tokenised ``chunk`` at a time, but counted as their sequences are taken)."""
    eos = _eos_id(tokenizer) if packing else None
    pending: list[int] = []
    batch: list[str | None] = []

    def flush() -> Iterator[list[int]]:
        nonlocal pending
        texts = [t for t in batch if isinstance(t, str) and t.strip()]
        encoded = iter(
            tokenizer(
                texts,
                truncation=not packing,
                max_length=None if packing else max_length,
                verbose=False,
            )["input_ids"]
            if texts
            else []
        )
        for text in batch:
            stats.documents += 1
            ids = list(next(encoded)) if isinstance(text, str) and text.strip() else []
            if not ids:
                stats.empty_documents += 1
                continue
            if not packing:
                stats.sequences += 1
                yield ids[:max_length]
                continue
            pending.extend(ids)
            pending.append(eos)  # type: ignore[arg-type]
            while len(pending) >= max_length:
                stats.sequences += 1
                yield pending[:max_length]
                pending = pending[max_length:]
        batch.clear()

    for text in documents:
        batch.append(text)
        if len(batch) >= chunk:
            yield from flush()
    if batch:
        yield from flush()


def _task_tensors(
    sequences: list[list[int]], max_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(sequences), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), max_length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def check_task_shape(num_tasks: int, task_size: int, max_length: int) -> None:
    """Refuse non-positive task counts and sizes (the message names the option)."""
    for name, value in (
        ("num_tasks", num_tasks),
        ("task_size", task_size),
        ("max_length", max_length),
    ):
        if not is_int(value) or value < 1:
            raise CorpusError(f"--{name} must be a positive integer, got {value!r}")


def token_tasks(
    spec: CorpusSpec,
    tokenizer: Any,
    num_tasks: int,
    task_size: int,
    max_length: int,
    seed: int = 0,
    packing: bool = False,
    stats: CorpusStats | None = None,
) -> Iterator[TokenTask]:
    """Tasks ``0 … num_tasks − 1`` of one shuffled pass over a corpus, in order, as they fill.

    Only one task's sequences are held at a time. Reading stops as soon as the last task is
    full.

    Args:
        spec: the corpus.
        tokenizer: the probe's tokenizer (a ``transformers`` tokenizer: called on a list of
            texts, it returns ``{"input_ids": [[...], ...]}``).
        num_tasks: ``N``.
        task_size: ``B``, sequences per task.
        max_length: ``L``, tokens per sequence at most.
        seed: the shuffle's seed.
        packing: join documents and cut ``L``-token sequences (default: one document, one
            sequence, truncated).
        stats: filled with what the pass read (documents, empty documents, sequences).

    Raises:
        CorpusError: as :func:`read_documents`, and when the corpus ends before ``N x B``
            sequences (the message gives the counts). A corpus whose size is known up front
            (not streamed, not packed) is refused before anything is read.
    """
    check_task_shape(num_tasks, task_size, max_length)
    stats = stats if stats is not None else CorpusStats()
    needed = num_tasks * task_size
    # Unpacked and not streamed, the size is known: a corpus too small is refused up front.
    dataset = None if packing or spec.streaming else _load(spec)
    if dataset is not None and len(dataset) < needed:
        raise _too_small(spec, num_tasks, task_size, len(dataset), None)
    pad_id = pad_token_id(tokenizer)
    # Tokenised a task at a time at most: a stream that fails part way has written what it could.
    documents = read_documents(spec, seed, dataset)
    sequences = _sequences(
        documents, tokenizer, max_length, packing, stats, chunk=min(256, task_size)
    )
    current: list[list[int]] = []
    index = 0
    for sequence in sequences:
        current.append(sequence)
        if len(current) == task_size:
            ids, mask = _task_tensors(current, max_length, pad_id)
            yield TokenTask(ids, mask, index)
            index += 1
            current = []
            if index == num_tasks:
                return
    raise _too_small(spec, num_tasks, task_size, stats.sequences, stats)


def _too_small(
    spec: CorpusSpec, num_tasks: int, task_size: int, found: int, stats: CorpusStats | None
) -> CorpusError:
    counted = (
        f"{found} documents"
        if stats is None
        else f"{found} sequences from {stats.documents} documents ({stats.empty_documents} empty, "
        "skipped)"
    )
    return CorpusError(
        f"--data {spec.data} is too small: {num_tasks} tasks x {task_size} sequences need "
        f"{num_tasks * task_size}, it has {counted}; lower --num_tasks or --task_size"
    )


# ------------------------------------------------------------------------------ bounds
def synthetic_task(
    kind: Literal["lower", "upper"],
    index: int,
    task_size: int,
    max_length: int,
    vocab_size: int,
    eos_id: int | None,
    seed: int,
    pad_id: int = 0,
) -> TokenTask:
    """Task ``index`` of a bound of SPEC section 8 (see :class:`SyntheticCorpus`).

    Drawn from a generator seeded by ``(seed, kind, index)`` alone, so a task is the same
    whoever draws it, in any order.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    entropy = [seed, 1 if kind == "lower" else 2, index]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    if kind == "upper":
        ids = torch.from_numpy(rng.integers(0, vocab_size, size=(task_size, max_length)))
        return TokenTask(ids, torch.ones_like(ids), index)
    tokens = rng.integers(
        0, vocab_size - (eos_id is not None and 0 <= eos_id < vocab_size), size=task_size
    )
    if eos_id is not None and 0 <= eos_id < vocab_size:
        tokens = tokens + (tokens >= eos_id)  # skip the end-of-sequence token
    # Each position after the first ends the sequence with probability 1/V: the length is
    # 1 + the number of positions before the first end (a geometric draw), at most max_length.
    lengths = np.minimum(max_length, rng.geometric(1.0 / vocab_size, size=task_size))
    positions = np.arange(max_length)[None, :]
    mask = torch.from_numpy((positions < lengths[:, None]).astype(np.int64))
    ids = torch.from_numpy(np.repeat(tokens[:, None], max_length, axis=1))
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return TokenTask(ids, mask, index)
