"""Diversity coefficient (Miranda et al. 2023, "Beyond Scale") of small text datasets.

Each dataset of ``text_tasks.py`` is cut into random batches of sentences; every batch is
embedded with the all-MiniLM-L6-v2 probe (a head fitted to that batch, then the exact Fisher),
and the diversity coefficient is the mean cosine distance between the batch embeddings of one
dataset, with a t confidence interval. The cross-diversity of two datasets is the mean distance
between the batches of one and the batches of the other: it is smaller for two sentiment
datasets than for a sentiment dataset and a topic dataset.

Runs offline (``pip install 't2v-lightning[text]'``), a few minutes on two CPU cores:

    python examples/text_diversity.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from text_tasks import build_tasks

from t2v_lightning import (
    Task2Vec,
    cross_diversity_coefficient,
    diversity_coefficient,
    embed_batches,
    get_probe,
)


def main(batch_size: int = 8, num_batches: int = 3, seed: int = 0) -> None:
    task2vec = Task2Vec(
        get_probe("text:all-MiniLM-L6-v2"),
        estimator="exact",
        max_samples=None,
        balanced_sampling=False,
        head_epochs=10,
        head_lr=1e-2,
        batch_size=batch_size,
        accelerator="cpu",
        progress_bar=False,
        seed=seed,
    )
    batches = {
        name: embed_batches(task2vec, data, batch_size, num_batches, seed=seed)
        for name, data in build_tasks().items()
    }
    print(f"diversity coefficient ({num_batches} batches of {batch_size} sentences, 95% CI)")
    for name, embeddings in batches.items():
        div = diversity_coefficient(embeddings)
        print(f"  {name:22s} {div.mean:.4f}  [{div.ci_low:.4f}, {div.ci_high:.4f}]")
    print("cross-diversity")
    pairs = [
        ("film sentiment", "restaurant sentiment"),
        ("film sentiment", "sport or science"),
        ("film sentiment", "cooking or travel"),
        ("sport or science", "cooking or travel"),
    ]
    for a, b in pairs:
        cross = cross_diversity_coefficient(batches[a], batches[b])
        print(f"  {a} x {b}: {cross.mean:.4f}  [{cross.ci_low:.4f}, {cross.ci_high:.4f}]")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    main(arguments.batch_size, arguments.num_batches, arguments.seed)
