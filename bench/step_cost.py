"""One Fisher step against one plain training step on the same batch and network, side by side.

Whole-pass timings on a shared machine drift by 10-20% from run to run. This takes the steps
apart: ``--pairs`` alternating pairs of (plain step, Fisher step) on one batch of ResNet-18 inputs
in one process, and reports the median time of each and the median and quartiles of the per-pair
ratio. The Fisher step is :func:`~t2v_lightning.fisher.estimators.batch_filter_sums` inside the
taps, as the Fisher callback runs it; the plain step is a forward, a cross-entropy and a
backward into every weight.

    python bench/step_cost.py --estimator batch --threads 2
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        python bench/step_cost.py --estimator batch   # glibc keeps freed memory between steps
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--estimator", default="batch")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from t2v_lightning import get_probe
    from t2v_lightning.fisher.estimators import LayerFisherTaps, batch_filter_sums, embedded_layers

    torch.manual_seed(0)
    inputs = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.arange(args.batch) % 10
    ids = torch.arange(args.batch)
    valid = torch.ones(args.batch, dtype=torch.bool)
    network = get_probe(args.model, num_classes=10).eval()
    layers = embedded_layers(network, "fc")

    def plain() -> None:
        network.zero_grad(set_to_none=True)
        F.cross_entropy(network(inputs), labels).backward()

    def fisher() -> None:
        with torch.enable_grad(), LayerFisherTaps(network, layers) as taps:
            batch_filter_sums(network, taps, inputs, ids, valid, args.estimator, 0)

    for _ in range(3):
        plain()
        fisher()
    pairs: list[tuple[float, float]] = []
    for index in range(args.pairs):
        seconds = {}
        for name, step in (("plain", plain), ("fisher", fisher))[:: 1 if index % 2 == 0 else -1]:
            start = time.perf_counter()
            step()
            seconds[name] = time.perf_counter() - start
        pairs.append((seconds["plain"], seconds["fisher"]))
    ratios = sorted(fisher / plain for plain, fisher in pairs)
    print(
        f"{args.model}, {args.batch} x 3x{args.size}x{args.size}, {args.estimator}, "
        f"{torch.get_num_threads()} threads, {args.pairs} pairs: plain step "
        f"{statistics.median(p for p, _ in pairs) * 1e3:.1f} ms, Fisher step "
        f"{statistics.median(f for _, f in pairs) * 1e3:.1f} ms, ratio median "
        f"{statistics.median(ratios):.3f} (quartiles {ratios[len(ratios) // 4]:.3f}-"
        f"{ratios[3 * len(ratios) // 4]:.3f})"
    )


if __name__ == "__main__":
    main()
