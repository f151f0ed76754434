"""Cost of a variational embedding against a per-sample Monte Carlo embedding of the same task.

Both go through ``Task2Vec.embed`` on the same probe, examples and settings; ``Task2Vec.prepare``
(labels, selection, working copy, head fitting), which both run first, is also timed alone so that
the Fisher phases can be compared by themselves. Every figure is the fastest of ``--repeats``
runs, taken in alternating order, in wall time and in process CPU time (steadier on a shared
machine when run with ``--threads 1``).

    python bench/variational_cost.py                  # ResNet-18 (random weights), 500 × 3×32×32
    python bench/variational_cost.py --threads 1        # steadier on a busy machine
    python bench/variational_cost.py --model resnet34 --examples 1000 --accelerator gpu

The variational method trains for ``--epochs`` epochs (2 by default, as in the paper): each is a
noisy forward pass plus a backward pass to the variances, so expect about twice the per-sample
Fisher phase, which is one forward pass plus a backward pass to layer outputs.
"""

from __future__ import annotations

import argparse
import logging
import os
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
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()

    import torch

    if args.threads > 0:
        # On a shared machine, one thread per process avoids OpenMP stalls that swamp the
        # difference being measured.
        torch.set_num_threads(args.threads)
    from torch.utils.data import TensorDataset

    from t2v_lightning import Task2Vec, get_probe
    from t2v_lightning.trainers import quiet_lightning

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
            probe,
            method="variational",
            variational_epochs=args.epochs,
            **common,  # type: ignore[arg-type]
        ).embed(dataset),
    }
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    best = {clock: dict.fromkeys(runs, float("inf")) for clock in clocks}
    for repeat in range(args.repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for name in order:
            starts = {clock: read() for clock, read in clocks.items()}
            with quiet_lightning():
                runs[name]()
            for clock, read in clocks.items():
                best[clock][name] = min(best[clock][name], read() - starts[clock])

    print(
        f"{args.model}, {args.examples} examples of 3x{args.size}x{args.size}, batch {args.batch}, "
        f"{args.accelerator}, {torch.get_num_threads()} threads, best of {args.repeats}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    for clock in clocks:
        times = best[clock]
        mc_phase = times["montecarlo"] - times["prepare"]
        var_phase = times["variational"] - times["prepare"]
        print(f"  {clock} time")
        print(f"    prepare (head fitting {args.head_epochs} epochs):   {times['prepare']:8.2f} s")
        print(
            f"    per-sample Monte Carlo embed:        {times['montecarlo']:8.2f} s "
            f"(Fisher phase {mc_phase:.2f} s)"
        )
        print(
            f"    variational embed ({args.epochs} epochs):      {times['variational']:8.2f} s "
            f"(Fisher phase {var_phase:.2f} s)"
        )
        print(
            f"    ratio variational / per-sample:      {times['variational'] / times['montecarlo']:8.2f}"
            + (f" (Fisher phases {var_phase / mc_phase:.2f})" if mc_phase > 0 else "")
        )


if __name__ == "__main__":
    main()
