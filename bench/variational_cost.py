"""Cost of a variational embedding against a per-sample Monte Carlo embedding of the same task.

Both go through ``Task2Vec.embed`` on the same probe, examples and settings; ``Task2Vec.prepare``
(labels, selection, working copy, head fitting), which both run first, is also timed alone so that
the Fisher phases can be compared by themselves. Every figure is the fastest of ``--repeats``
runs, taken in alternating order.

    python bench/variational_cost.py                  # ResNet-18 (random weights), 500 × 3×32×32
    python bench/variational_cost.py --model resnet34 --examples 1000 --accelerator gpu

The variational method trains for ``--epochs`` epochs (2 by default, as in the paper): each is a
noisy forward pass plus a backward pass to the variances, so expect about twice the per-sample
Fisher phase, which is one forward pass plus a backward pass to layer outputs.
"""

from __future__ import annotations

import argparse
import logging
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2, help="variational epochs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()

    import torch
    from torch.utils.data import TensorDataset

    from t2v_lightning import Task2Vec, get_probe
    from t2v_lightning.task2vec import _quiet_lightning

    logging.getLogger("t2v_lightning").setLevel(logging.WARNING)
    torch.manual_seed(0)
    probe = get_probe(args.model, num_classes=args.classes)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.examples, 3, args.size, args.size, generator=generator)
    labels = torch.arange(args.examples) % args.classes
    dataset = TensorDataset(images, labels)
    common = dict(
        max_samples=args.examples,
        batch_size=args.batch,
        head_epochs=args.head_epochs,
        accelerator=args.accelerator,
        progress_bar=False,
    )
    runs = {
        "prepare": lambda: Task2Vec(probe, **common).prepare(dataset),  # type: ignore[arg-type]
        "montecarlo": lambda: Task2Vec(probe, method="montecarlo", **common).embed(dataset),  # type: ignore[arg-type]
        "variational": lambda: Task2Vec(
            probe, method="variational", variational_epochs=args.epochs, **common  # type: ignore[arg-type]
        ).embed(dataset),
    }
    best = dict.fromkeys(runs, float("inf"))
    for repeat in range(args.repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            with _quiet_lightning():
                runs[name]()
            best[name] = min(best[name], time.perf_counter() - start)

    prepare = best["prepare"]
    mc_phase = best["montecarlo"] - prepare
    var_phase = best["variational"] - prepare
    print(
        f"{args.model}, {args.examples} examples of 3x{args.size}x{args.size}, batch {args.batch}, "
        f"{args.accelerator}, {torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(f"  prepare (labels, copy, head fitting {args.head_epochs} epochs): {prepare:8.2f} s")
    print(f"  per-sample Monte Carlo embed:                  {best['montecarlo']:8.2f} s "
          f"(Fisher phase {mc_phase:.2f} s)")
    print(f"  variational embed ({args.epochs} epochs):               {best['variational']:8.2f} s "
          f"(Fisher phase {var_phase:.2f} s)")
    print(f"  ratio variational / per-sample, whole embed:   {best['variational'] / best['montecarlo']:8.2f}")
    if mc_phase > 0:
        print(f"  ratio variational / per-sample, Fisher phase:  {var_phase / mc_phase:8.2f}")


if __name__ == "__main__":
    main()
