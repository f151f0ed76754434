"""Peak memory of cutting a large local corpus into language-model tasks.

Writes a JSON-lines corpus of ``--size_gb`` gigabytes (and a quarter of it) under ``--folder``,
then, in a fresh process per case, cuts ``--num_tasks`` tasks of ``--task_size`` sequences of
``--max_length`` tokens from one shuffled pass (``t2v_lightning.data.corpus.token_tasks``),
streamed and not streamed, and records the process's peak resident memory (``ru_maxrss``) and
the time; the resident memory is also split (sampled after each task) into anonymous memory
(the process's own) and file-backed pages (the memory-mapped Arrow files of a non-streamed
corpus: page cache that the kernel reclaims under pressure). Memory that stays the same from
the small corpus to the large one is what "flat" means. Everything written (corpus, ``datasets``' Arrow cache) is deleted at the end unless
``--keep``.

The tokenizer is a byte-level BPE (vocabulary 2,000) trained on the corpus's first documents:
no network. Reading a non-streamed local corpus first converts it to Arrow files (as
``datasets`` always does; disk about the corpus's size), which the time includes.

    python bench/corpus_memory.py --size_gb 1.0 --folder /tmp/corpus_memory \
        --out bench/results/corpus_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "can",
    "more",
    "other",
    "what",
    "time",
    "into",
    "only",
    "some",
    "could",
    "them",
    "see",
    "these",
    "first",
    "new",
    "people",
    "corpus",
    "language",
    "model",
    "token",
    "sequence",
    "diversity",
    "coefficient",
    "data",
    "quality",
    "measure",
    "task",
]


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> int:
    """JSON lines of ``{"id", "text"}`` with 100-300 word documents; returns the count."""
    rng = random.Random(seed)
    written = count = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < size_bytes:
            words = rng.choices(WORDS, k=rng.randint(100, 300))
            line = json.dumps({"id": count, "text": " ".join(words)}) + "\n"
            handle.write(line)
            written += len(line)
            count += 1
    return count


def train_tokenizer(corpus: Path, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(corpus, encoding="utf-8") as handle:
        for _, line in zip(range(2000), handle):
            texts.append(json.loads(line)["text"])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>"
    ).save_pretrained(folder)


def resident() -> tuple[float, float]:
    """This process's resident anonymous and file-backed memory now (MB, Linux)."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024
    return fields.get("RssAnon", float("nan")), fields.get("RssFile", float("nan"))


def read(args: argparse.Namespace) -> None:
    """One case, in this process: cut the tasks and print peak RSS as JSON."""
    from transformers import AutoTokenizer

    from t2v_lightning.data.corpus import CorpusSpec, CorpusStats, token_tasks

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    spec = CorpusSpec(args.read, streaming=args.streaming, cache_dir=args.cache_dir)
    stats = CorpusStats()
    start = time.perf_counter()
    tasks = 0
    anon_peak = file_peak = 0.0
    for _ in token_tasks(
        spec, tokenizer, args.num_tasks, args.task_size, args.max_length, seed=0, stats=stats
    ):
        tasks += 1
        anon, mapped = resident()
        anon_peak, file_peak = max(anon_peak, anon), max(file_peak, mapped)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "tasks": tasks,
                "documents_read": stats.documents,
                "seconds": round(seconds, 1),
                "rss_after_imports_mb": round(base / 1024, 1),
                "peak_rss_mb": round(peak / 1024, 1),
                "peak_anonymous_mb": round(anon_peak, 1),
                "peak_file_backed_mb": round(file_peak, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_gb", type=float, default=1.0)
    parser.add_argument("--folder", default="/tmp/corpus_memory")
    parser.add_argument("--num_tasks", type=int, default=200)
    parser.add_argument("--task_size", type=int, default=512)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    parser.add_argument("--read", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        read(args)
        return
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {
        "num_tasks": args.num_tasks,
        "task_size": args.task_size,
        "max_length": args.max_length,
        "cases": [],
    }
    try:
        corpora = []
        for fraction in (0.25, 1.0):
            path = folder / f"corpus_{fraction:g}.jsonl"
            count = write_corpus(path, int(args.size_gb * fraction * 1e9))
            corpora.append((path, count))
        tokenizer = folder / "tokenizer"
        train_tokenizer(corpora[0][0], tokenizer)
        for path, count in corpora:
            for streaming in (True, False):
                command = [
                    sys.executable,
                    __file__,
                    "--read",
                    str(path),
                    "--tokenizer",
                    str(tokenizer),
                    "--cache_dir",
                    str(folder / "hf_cache"),
                    "--num_tasks",
                    str(args.num_tasks),
                    "--task_size",
                    str(args.task_size),
                    "--max_length",
                    str(args.max_length),
                ]
                if streaming:
                    command.append("--streaming")
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
                done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
                case = json.loads(done.stdout.strip().splitlines()[-1])
                case.update(
                    corpus_gb=round(path.stat().st_size / 1e9, 3),
                    documents=count,
                    streaming=streaming,
                )
                print(json.dumps(case), flush=True)
                results["cases"].append(case)  # type: ignore[attr-defined]
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
