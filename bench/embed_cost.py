"""Cost of a whole ``Task2Vec.embed`` against one plain forward+backward pass over its examples.

``embed`` reads the labels, selects the examples, copies the probe, runs the skipped prefix once
(``skip_layers``), computes the penultimate features, fits the head on them (``--head-epochs``)
and runs the Fisher pass, each through a Lightning Trainer. The limit it is measured against is
one plain training pass over the same examples (forward, cross-entropy, backward into every
weight). ``Task2Vec.prepare`` (everything before the Fisher pass) is also timed alone, so that the
Fisher phase can be read as ``embed - prepare``.

Runs are taken in alternating order (plain, prepare, embed, then the reverse) in one process;
every figure is the best of ``--repeats``, and beside it the median (and range) over repeats of
the run's ratio to the plain pass of the same repeat, and the median number of minor page faults
of a run. With glibc's default malloc, memory freed at the end of a step is often given back to
the system and faulted in again by the next step, by each pass to a different degree from run to
run; ``--steady-allocator`` first calls :func:`t2v_lightning.allocator.keep_freed_memory`, as the
``t2v`` command does at start-up, so that freed memory stays in the process (both passes alike).

    python bench/embed_cost.py                         # ResNet-18, 300 × 3×32×32, skip 0 and 6
    python bench/embed_cost.py --threads 1 --model resnet34
    python bench/embed_cost.py --accelerator gpu --size 224 --examples 2000
    python bench/embed_cost.py --examples 1000 --head-epochs 0 --keep-head --all-examples \
        --skip 0 --repeats 5 --estimator batch      # nothing but the Fisher pass
    python bench/embed_cost.py ... --steady-allocator   # the same without heap trimming

Targets: whole embed <= 1.5x the plain pass with head fitting; without it (``--head-epochs 0
--keep-head --all-examples``, where an embed is one Trainer and the Fisher pass) <= 1.25x for
``per_sample`` and <= 1.15x for ``batch``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import time


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def target(args: argparse.Namespace) -> float:
    """The ratio a whole embed should stay under in the setting of ``args``."""
    if args.head_epochs == 0 and args.keep_head:
        return {"per_sample": 1.25, "batch": 1.15}.get(args.estimator, 1.5)
    return 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--estimator", default="per_sample")
    parser.add_argument(
        "--keep-head",
        action="store_true",
        help="reset_head=False: keep the probe's head (no fresh head)",
    )
    parser.add_argument(
        "--all-examples",
        action="store_true",
        help="every example once (max_samples=None, balanced_sampling=False)",
    )
    parser.add_argument("--skip", type=int, nargs="+", default=[0, 6], help="skip_layers values")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--steady-allocator",
        action="store_true",
        help="run with glibc's malloc keeping freed memory (no heap trimming)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    steady = False
    if args.steady_allocator:
        from t2v_lightning.allocator import keep_freed_memory

        steady = keep_freed_memory()
        if not steady:
            parser.error(
                "--steady-allocator: keep_freed_memory() changed nothing (not glibc, "
                "MALLOC_* / GLIBC_TUNABLES set, or T2V_DEFAULT_MALLOC set)"
            )

    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from t2v_lightning import Task2Vec, get_probe
    from t2v_lightning.trainers import quiet_lightning

    logging.getLogger("t2v_lightning").setLevel(logging.WARNING)
    torch.manual_seed(0)
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
    probe = get_probe(args.model, num_classes=args.classes)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.examples, 3, args.size, args.size, generator=generator)
    labels = torch.arange(args.examples) % args.classes
    dataset = TensorDataset(images, labels)
    network = get_probe(args.model, num_classes=args.classes).to(device).eval()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        for start in range(0, args.examples, args.batch):
            x = images[start : start + args.batch].to(device)
            y = labels[start : start + args.batch].to(device)
            network.zero_grad(set_to_none=True)
            F.cross_entropy(network(x), y).backward()
        sync()

    def t2v(skip: int) -> Task2Vec:
        return Task2Vec(
            probe,
            estimator=args.estimator,
            skip_layers=skip,
            batch_size=args.batch,
            head_epochs=args.head_epochs,
            accelerator=args.accelerator,
            progress_bar=False,
            reset_head=not args.keep_head,
            max_samples=None if args.all_examples else args.examples,
            balanced_sampling=not args.all_examples,
        )

    runs = {"plain": plain}
    for skip in args.skip:
        runs[f"prepare skip {skip}"] = lambda skip=skip: t2v(skip).prepare(dataset)  # type: ignore[misc]
        runs[f"embed skip {skip}"] = lambda skip=skip: t2v(skip).embed(dataset)  # type: ignore[misc]
    plain()  # warm-up
    load_before = os.getloadavg()[0]
    timings: dict[str, list[float]] = {name: [] for name in runs}
    faults: dict[str, list[int]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name in list(runs) if repeat % 2 == 0 else list(reversed(runs)):
            faults_before = minor_faults()
            start = time.perf_counter()
            with quiet_lightning():
                runs[name]()
            timings[name].append(time.perf_counter() - start)
            faults[name].append(minor_faults() - faults_before)
    best = {name: min(seconds) for name, seconds in timings.items()}
    # Each repeat's ratio to the plain pass of the same repeat: steadier when the machine's
    # speed drifts (a shared machine), reported as the median and the range.
    paired = {
        name: sorted(t / p for t, p in zip(seconds, timings["plain"]))
        for name, seconds in timings.items()
    }
    print(
        f"{args.model}, {args.examples} examples of 3x{args.size}x{args.size}, batch {args.batch}, "
        f"{args.classes} classes, head {args.head_epochs} epochs"
        f"{' (probe head kept)' if args.keep_head else ''}"
        f"{', all examples' if args.all_examples else ''}, {args.estimator}, "
        f"{args.accelerator}, {torch.get_num_threads()} threads, best of {args.repeats}, load "
        f"average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
        f"{'steady allocator (no heap trimming)' if steady else 'default allocator'}"
    )
    print(f"{'run':<18}{'seconds':>9}{'x plain':>9}   paired x plain (range)   page faults")
    for name, seconds in best.items():
        ratios = paired[name]
        median = statistics.median(ratios)
        print(
            f"{name:<18}{seconds:>9.2f}{seconds / best['plain']:>9.2f}   "
            f"{median:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}){'':>10}"
            f"{statistics.median(faults[name]):>9.0f}"
        )
    for skip in args.skip:
        fisher = best[f"embed skip {skip}"] - best[f"prepare skip {skip}"]
        print(f"Fisher phase skip {skip}: {fisher:.2f} s ({fisher / best['plain']:.2f}x plain)")
    print(f"target: whole embed <= {target(args)}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "args": vars(args),
                    "load_average": load_before,
                    "seconds": best,
                    "timings": timings,
                    "page_faults": faults,
                    "steady_allocator": steady,
                },
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
