"""Time pdist for every distance on random embeddings (default: 1,000 of dimension 10,000).

Usage::

    python bench/distances.py [--num-embeddings 1000] [--dim 10000] [--distances cosine kl]

Prints one line per distance with the wall-clock time of one ``pdist`` call (the best of
``--repeats`` runs), the CPU time it used (all threads; on an otherwise idle machine the wall
time is about CPU time / threads) and the throughput in pair-entries per wall-clock second.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.similarity.distance import DISTANCES, pdist


def random_embeddings(num: int, dim: int, seed: int = 0) -> list[TaskEmbedding]:
    """Log-normal hessians around 1e-6 (spanning a few orders of magnitude), unit scales."""
    generator = torch.Generator().manual_seed(seed)
    hessians = 1e-6 * torch.exp(2.0 * torch.randn(num, dim, generator=generator))
    scales = torch.ones(dim)
    layers = {"layer": (0, dim)}
    meta = {"probe": "bench", "probe_fingerprint": "bench"}
    return [
        TaskEmbedding(h, scales, layers, {**meta, "task_name": f"task{i}"})
        for i, h in enumerate(hessians)
    ]


def _load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-embeddings", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=10000)
    parser.add_argument("--distances", nargs="+", default=list(DISTANCES), choices=DISTANCES)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    embeddings = random_embeddings(args.num_embeddings, args.dim)
    n, d = args.num_embeddings, args.dim
    print(
        f"pdist of {n} embeddings of dimension {d}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"load average {_load_average()}"
    )
    for distance in args.distances:
        best, best_cpu = float("inf"), float("inf")
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            pdist(embeddings, distance=distance)
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - start_cpu)
        pairs = n * (n - 1) / 2 if distance != "asymmetric_kl" else n * n
        print(
            f"{distance:>18s}: {best:7.2f} s wall, {best_cpu:7.2f} s CPU  "
            f"({pairs * d / best / 1e9:5.2f} G pair-entries/s)"
        )


if __name__ == "__main__":
    main()
