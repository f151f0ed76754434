r"""Estimator quality per second: seed-to-seed noise of the embedding against examples and time.

Two embeddings of the same task that differ only in their seed (which examples are drawn from
the task, and which labels are sampled from the model) should be close; their distance is the
estimator's noise floor, below which no distance between tasks can be read. This measures it,
as the Task2Vec ``cosine`` distance (:func:`task_distance`) between the embeddings of seeds 0 and
1, for ``per_sample`` and ``batch``, after every checkpoint number of examples, beside the wall
time the Fisher pass took to get there (examples drawn, label sampling, forward, backward and
closed forms; the time to generate the synthetic images is not counted).

Task: synthetic images of ``--classes`` classes (a fixed random template per class, smoothed,
plus Gaussian noise), drawn i.i.d. by a generator seeded by (seed, batch): each seed sees its own
examples. The probe (random weights: no download) gets its head fitted once on 1,000 examples
(``Task2Vec.prepare``), and both seeds share that network, so the figure isolates the Fisher
estimate's noise from head fitting.

Scale. ``batch`` estimates F / B (the mean-loss gradient of a batch of B, squared), ``per_sample``
estimates F. The ``cosine`` distance is not scale-free: its ``ε = 1e-8`` in ``h / (h_a + h_b + ε)``
is absolute, so at F / B it flattens ``batch``'s smallest filters to zero on both sides, and
those are where the seed-to-seed noise lives (filters that only rare examples activate: on the
default task 1% of the filters carry 59% of ``per_sample``'s distance). The comparison is
therefore made with ``batch``'s embedding multiplied by B, an estimate of F like ``per_sample``'s.
Two more comparisons are printed beside it: both estimators at the scale F / B (``per_sample``'s
embedding divided by B, so ε flattens the same filters on both sides), and each at the scale it
is stored (``batch`` at F / B, ``per_sample`` at F: ε then helps ``batch`` only).

Prints the table, how many examples and seconds ``per_sample`` needs to reach ``batch``'s noise at
its largest checkpoint (log-log interpolation), and writes a figure of noise against time.

    python bench/noise_per_second.py --threads 1          # ResNet-18, up to 10,000 examples
    python bench/noise_per_second.py --max-per-sample 2000 --max-batch 2000   # quick look

Target: ``per_sample`` reaches ``batch``'s 10,000-example noise in a third of ``batch``'s time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import time
from datetime import date
from typing import Any


def _checkpoints(limit: int, batch: int) -> list[int]:
    points = [n for n in (100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000) if n <= limit]
    points = [max(batch, n - n % batch) for n in points]
    return sorted(set(points) | {limit - limit % batch})


def _crossing(rows: list[dict[str, float]], noise: float) -> dict[str, float] | None:
    """Examples and seconds at which a falling noise curve reaches ``noise`` (log-log)."""
    if rows and rows[0]["noise"] <= noise:
        return {"examples": rows[0]["examples"], "seconds": rows[0]["seconds"]}
    for low, high in itertools.pairwise(rows):
        if low["noise"] >= noise >= high["noise"]:
            share = math.log(low["noise"] / noise) / math.log(low["noise"] / high["noise"])
            return {
                key: math.exp(math.log(low[key]) + share * math.log(high[key] / low[key]))
                for key in ("examples", "seconds")
            }
    return None


def _concentration(a: Any, b: Any) -> dict[str, float]:
    """How much of the cosine distance between two embeddings a few filters carry.

    The distance compares ``h_a / (h_a + h_b + ε)`` with ``h_b / (h_a + h_b + ε)`` entry by
    entry; each filter's share is its squared difference of the two over their sum.
    """
    total = (a + b + 1e-8).double()
    contribution = ((a.double() - b.double()) / total).square()
    ordered = contribution.sort(descending=True).values
    share = {
        f"top_{percent}%": float(
            ordered[: max(1, round(ordered.numel() * percent / 100))].sum() / ordered.sum()
        )
        for percent in (1, 5)
    }
    middle = ((a + b) / 2).double()
    ranks = middle.argsort().argsort().double() / max(1, middle.numel() - 1)
    share["smallest_quarter"] = float(contribution[ranks < 0.25].sum() / contribution.sum())
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--max-per-sample", type=int, default=10000)
    parser.add_argument("--max-batch", type=int, default=10000)
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument(
        "--probe-seed",
        type=int,
        default=0,
        help="seed of the probe's random weights (another probe, another curve)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--figure", default=os.path.join(os.path.dirname(__file__), "results", "noise_vs_time.png")
    )
    parser.add_argument("--json", help="also write the curves to this JSON file")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from t2v_lightning import Task2Vec, get_probe
    from t2v_lightning.embedding import TaskEmbedding
    from t2v_lightning.fisher.estimators import (
        LayerFisherTaps,
        batch_filter_sums,
        embedded_layers,
        filter_values,
    )
    from t2v_lightning.similarity.distance import task_distance
    from t2v_lightning.trainers import quiet_lightning

    logging.getLogger("t2v_lightning").setLevel(logging.WARNING)
    device = torch.device(args.device)
    shape = (3, args.size, args.size)
    templates = torch.randn(args.classes, *shape, generator=torch.Generator().manual_seed(123))
    templates = F.avg_pool2d(templates, 5, stride=1, padding=2) * 3.0

    def draw(seed: int, number: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(1_000_003 * (seed + 1) + number)
        labels = torch.randint(0, args.classes, (count,), generator=generator)
        images = templates[labels] + torch.randn(count, *shape, generator=generator)
        return images, labels

    images, labels = draw(99, 0, 1000)
    torch.manual_seed(args.probe_seed)  # the probe's random weights and its head's fitting
    probe = get_probe(args.model, num_classes=args.classes)
    with quiet_lightning():
        network, _, _, _ = Task2Vec(
            probe,
            max_samples=1000,
            batch_size=args.batch,
            accelerator=args.device,
            progress_bar=False,
        ).prepare(TensorDataset(images, labels))
    head = "fc" if hasattr(network, "fc") else "classifier"
    network = network.to(device).eval()
    layers = embedded_layers(network, head)
    meta = {"probe": args.model, "probe_fingerprint": "bench", "task_name": "synthetic"}

    def curve(
        estimator: str, seed: int, limit: int, scale: float
    ) -> list[tuple[int, float, TaskEmbedding]]:
        points = _checkpoints(limit, args.batch)
        totals: dict[str, torch.Tensor] = {}
        count, seen, elapsed = 0, 0, 0.0
        out: list[tuple[int, float, TaskEmbedding]] = []
        with torch.enable_grad(), LayerFisherTaps(network, layers) as taps:
            for number in range(points[-1] // args.batch):
                x, _ = draw(seed, number, args.batch)
                x = x.to(device)
                ids = torch.arange(seen, seen + args.batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                sums, n = batch_filter_sums(
                    network,
                    taps,
                    x,
                    ids,
                    torch.ones(args.batch, dtype=torch.bool, device=device),
                    estimator,
                    seed,  # type: ignore[arg-type]
                )
                for name, value in sums.items():
                    totals[name] = totals.get(name, 0) + value.detach().double()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed += time.perf_counter() - start
                count += n
                seen += args.batch
                if seen in points:
                    hessian, offsets = filter_values(totals, count, layers)
                    embedding = TaskEmbedding(
                        hessian * scale, torch.ones_like(hessian), offsets, meta
                    )
                    out.append((seen, elapsed, embedding))
        return out

    results: dict[str, list[dict[str, float]]] = {}
    concentration: dict[str, float] = {}
    for estimator, limit in (("batch", args.max_batch), ("per_sample", args.max_per_sample)):
        scale = float(args.batch) if estimator == "batch" else 1.0
        first = curve(estimator, args.seeds[0], limit, scale)
        second = curve(estimator, args.seeds[1], limit, scale)
        results[estimator] = [
            {"examples": n, "seconds": (t0 + t1) / 2, "noise": task_distance(a, b, "cosine")}
            for (n, t0, a), (_, t1, b) in zip(first, second)
        ]
        # The same embeddings at the scale batch stores them (F / B).
        divisor = scale if estimator == "batch" else float(args.batch)
        results[f"{estimator}_over_B"] = [
            {
                **row,
                "noise": task_distance(
                    TaskEmbedding(a.hessian / divisor, a.scale, a.layers, meta),
                    TaskEmbedding(b.hessian / divisor, b.scale, b.layers, meta),
                    "cosine",
                ),
            }
            for row, (_, _, a), (_, _, b) in zip(results[estimator], first, second)
        ]
        if estimator == "per_sample" and first:
            concentration = _concentration(first[-1][2].hessian, second[-1][2].hessian)

    print(
        f"{args.model} (random weights, seed {args.probe_seed}), synthetic {args.classes}-class "
        f"task of 3x{args.size}x{args.size}, batch "
        f"{args.batch}, {args.device}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load average "
        f"{os.getloadavg()[0]:.1f}, {date.today()}"
    )
    print(f"{'estimator':<16}{'examples':>9}{'seconds':>9}{'cosine noise':>14}")
    names = {
        "batch": "batch x B",
        "batch_over_B": "batch (F/B)",
        "per_sample": "per_sample",
        "per_sample_over_B": "per_sample / B",
    }
    for estimator, rows in results.items():
        for row in rows:
            print(
                f"{names[estimator]:<16}{row['examples']:>9d}{row['seconds']:>9.1f}"
                f"{row['noise']:>14.2e}"
            )
    if results.get("per_sample"):
        print(
            f"per_sample at {results['per_sample'][-1]['examples']} examples: the top 1% of the "
            f"filters carry {concentration['top_1%']:.0%} of the squared differences behind the "
            f"distance, the top 5% "
            f"{concentration['top_5%']:.0%}; the quarter of filters with the smallest Fisher "
            f"{concentration['smallest_quarter']:.0%}"
        )
    matches: dict[str, dict[str, float] | None] = {}
    comparisons = (
        ("per_sample", "batch", "both at the scale of F"),
        ("per_sample_over_B", "batch_over_B", "both at the scale of F / B"),
        ("per_sample", "batch_over_B", "each at the scale it is stored"),
    )
    for ours, reference, words in comparisons:
        target = results[reference][-1]
        match = _crossing(results[ours], target["noise"])
        matches[f"{ours} vs {reference}"] = match
        print(
            f"{names[reference]} at {target['examples']} examples ({words}): noise "
            f"{target['noise']:.2e} in {target['seconds']:.1f} s"
        )
        if match is None:
            print(f"  {names[ours]} does not reach it within the measured range")
        else:
            first = match["examples"] == results[ours][0]["examples"]
            print(
                f"  {names[ours]} reaches it {'by ' if first else 'at ~'}"
                f"{match['examples']:.0f} examples, ~{match['seconds']:.1f} s "
                f"({match['seconds'] / target['seconds']:.2f}x batch's time; target <= 0.33x)"
            )
    target = results["batch"][-1]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for estimator, rows in results.items():
        style = "o--" if estimator.endswith("_over_B") else "o-"
        axis.loglog(
            [r["seconds"] for r in rows], [r["noise"] for r in rows], style, label=names[estimator]
        )
        for r in rows if not estimator.endswith("_over_B") else []:
            axis.annotate(
                f"{r['examples']}",
                (r["seconds"], r["noise"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    axis.axhline(target["noise"], color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("Fisher pass wall time (s)")
    axis.set_ylabel("seed-to-seed cosine distance")
    axis.set_title(
        f"{args.model}, 3x{args.size}x{args.size}, {args.device} "
        f"{torch.get_num_threads()} thread(s), {date.today()}",
        fontsize=9,
    )
    axis.legend(title="estimator (labels: examples)")
    axis.grid(True, which="both", linewidth=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
    figure.savefig(args.figure, dpi=120)
    print(f"figure: {args.figure}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "args": vars(args),
                    "results": results,
                    "matches": matches,
                    "per_sample_concentration": concentration,
                },
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
