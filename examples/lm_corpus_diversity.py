"""Diversity coefficient of a text corpus (SPEC section 8), offline, on a tiny language model.

The example saves everything it needs: a byte-level BPE tokenizer trained on the spot, a GPT-2
with 2 layers of width 32 and *random weights* (``save_pretrained``), and two small JSON-lines
corpora. It then runs :func:`t2v_lightning.corpus_diversity` (the Python form of
``t2v diversity``): the diversity coefficient of each corpus, their cross-diversity, and the
lower and upper bounds. With random weights the probe has learnt nothing about language, so
the numbers show that the pipeline runs, not how diverse the text is; use a trained model
(``--probe lm:gpt2``) for numbers that mean something.

    python examples/lm_corpus_diversity.py            # about a minute on two CPU cores
    t2v diversity --probe lm:lm_corpus_diversity/gpt2 --data lm_corpus_diversity/varied.jsonl \\
        --num_tasks 6 --task_size 16 --max_length 32 --output lm_corpus_diversity/tasks \\
        --bounds --json lm_corpus_diversity/report.json    # the same from the command line
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from t2v_lightning import corpus_diversity

TOPICS = {
    "weather": "rain sun cloud wind storm cold warm snow sky grey bright",
    "cooking": "salt pan oil bread bake onion garlic boil soup butter flour",
    "football": "goal ball match team coach score pitch kick league win",
    "sailing": "boat sail wind mast harbour tide rope deck knot sea",
}


def write_corpora(folder: Path, documents: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """A corpus over four topics and one about a single topic (JSON lines, ``text`` column)."""
    rng = random.Random(seed)
    varied, narrow = folder / "varied.jsonl", folder / "narrow.jsonl"
    with open(varied, "w") as out_varied, open(narrow, "w") as out_narrow:
        for i in range(documents):
            topic = list(TOPICS)[i % len(TOPICS)]
            words = TOPICS[topic].split()
            out_varied.write(json.dumps({"text": " ".join(rng.choices(words, k=20))}) + "\n")
            words = TOPICS["weather"].split()
            out_narrow.write(json.dumps({"text": " ".join(rng.choices(words, k=20))}) + "\n")
    return varied, narrow


def save_tiny_gpt2(folder: Path, texts: list[str]) -> Path:
    """A byte-level BPE tokenizer trained on ``texts`` and a random 2-layer GPT-2, saved."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(fast),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def main(folder: str = "lm_corpus_diversity", num_tasks: int = 6, task_size: int = 16) -> None:
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    varied, narrow = write_corpora(root)
    texts = [json.loads(line)["text"] for line in varied.read_text().splitlines()]
    probe = f"lm:{save_tiny_gpt2(root / 'gpt2', texts)}"
    settings = {
        "num_tasks": num_tasks,
        "task_size": task_size,
        "max_length": 32,
        "accelerator": "cpu",
    }
    print("random weights: these numbers show the pipeline, not the corpora's diversity")
    for name, corpus in (("varied", varied), ("narrow", narrow)):
        div = corpus_diversity(probe, str(corpus), root / f"tasks_{name}", **settings)
        print(
            f"  {name:6s} diversity {div.mean:.4f}  t-interval [{div.ci_low:.4f}, "
            f"{div.ci_high:.4f}]  bootstrap [{div.bootstrap_low:.4f}, "
            f"{div.bootstrap_high:.4f}]"
        )
    cross = corpus_diversity(
        probe, str(varied), root / "tasks_varied", against=str(narrow), **settings
    )
    print(f"  cross-diversity varied x narrow {cross.mean:.4f}")
    for bound in ("lower", "upper"):
        value = corpus_diversity(probe, str(varied), root / "tasks_varied", bound=bound, **settings)
        print(f"  {bound} bound {value.mean:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="lm_corpus_diversity")
    parser.add_argument("--num-tasks", type=int, default=6)
    parser.add_argument("--task-size", type=int, default=16)
    arguments = parser.parse_args()
    main(arguments.folder, arguments.num_tasks, arguments.task_size)
