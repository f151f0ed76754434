"""Cost of the Fisher pass against one plain forward+backward pass over the same examples.

The limit a Fisher pass is measured against is one plain training pass over the same examples:
forward, cross-entropy on the true labels, backward into every weight. For one probe, this
prints the wall time of that plain pass and of the Fisher pass of each estimator as a ratio to it,
plus peak memory beside the plain pass's.

* ``per_sample`` / ``exact`` / ``batch``: :func:`batch_filter_sums` inside
  :class:`LayerFisherTaps`, batch by batch (``exact`` needs one backward pass per class);
* ``variational``: one epoch of the variational method (noisy forward with the local
  reparametrisation, cross-entropy + KL, backward into the variances, Adam step); the method
  trains for 2 epochs by default, so its Fisher phase costs twice this row;
* ``lightning_per_sample``: ``per_sample`` through ``FisherCallback`` in a Lightning ``fit``
  (the overhead of the trainer).

Every measurement runs in fresh subprocesses, taken in alternating order over ``--rounds``
rounds (plain, fisher..., then the reverse), and each figure is the best of all its timed passes:
on a shared machine both sides of a ratio see the same conditions. The peak resident memory
(CPU; ``ru_maxrss``, model and data included) or peak allocated memory (CUDA) belongs to that
measurement alone. A last subprocess times ``per_sample`` and ``batch`` back to back with the plain
pass, ``--paired-rounds`` times in alternating order, and prints the median of the per-round
ratios with their range ("paired"): the shared machine's speed drifts from one subprocess to the
next, and two passes run next to each other see nearly the same machine.

    python bench/fisher_cost.py                                   # ResNet-18, 300 × 3×32×32
    python bench/fisher_cost.py --model resnet34 --threads 1
    python bench/fisher_cost.py --model timm:tf_efficientnet_lite0 --size 224 --examples 200
    python bench/fisher_cost.py --model resnet34 --size 224 --device cuda --precision bf16 \\
        --examples 2000 --batch 200 --channels-last                 # images/s on a GPU

Targets: per_sample <= 1.5x, batch <= 1.1x the plain pass.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

MEASUREMENTS = ("plain", "per_sample", "batch", "exact", "variational", "lightning_per_sample")


def _measure(args: argparse.Namespace) -> dict[str, float]:
    import logging
    from contextlib import nullcontext

    import torch
    import torch.nn.functional as F

    from t2v_lightning import get_probe
    from t2v_lightning.fisher.estimators import LayerFisherTaps, batch_filter_sums, embedded_layers

    logging.getLogger("t2v_lightning").setLevel(logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    network = get_probe(args.model, num_classes=args.classes).to(device).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    network = network.to(memory_format=memory_format)
    inputs = torch.randn(args.examples, 3, args.size, args.size)
    labels = torch.randint(0, args.classes, (args.examples,))
    batches = [
        (
            inputs[i : i + args.batch].to(device).contiguous(memory_format=memory_format),
            labels[i : i + args.batch].to(device),
        )
        for i in range(0, args.examples, args.batch)
    ]
    head = "fc" if hasattr(network, "fc") else "classifier"

    def autocast() -> torch.autocast | nullcontext[None]:
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        for x, y in batches:
            network.zero_grad(set_to_none=True)
            with autocast():
                logits = network(x)
            F.cross_entropy(logits.float(), y).backward()

    layers = embedded_layers(network, head)

    def fisher(estimator: str) -> None:
        with torch.enable_grad(), LayerFisherTaps(network, layers) as taps:
            for number, (x, _) in enumerate(batches):
                ids = torch.arange(number * args.batch, number * args.batch + x.shape[0])
                batch_filter_sums(
                    network,
                    taps,
                    x,
                    ids,
                    torch.ones(x.shape[0], dtype=torch.bool, device=device),
                    estimator,
                    0,
                    forward_context=autocast,  # type: ignore[arg-type]
                )

    def variational_epoch() -> None:
        from t2v_lightning.fisher.variational import VariationalLayers

        variational = VariationalLayers(network, head).to(device)
        head_params = list(network.get_submodule(head).parameters())
        for p in head_params:
            p.requires_grad_(True)
        optimiser = torch.optim.Adam(
            [{"params": list(variational.parameters())}, {"params": head_params, "lr": 5e-4}],
            lr=1e-2,
        )
        for x, y in batches:
            optimiser.zero_grad(set_to_none=True)
            with variational.noisy(network), autocast():
                logits = network(x)
            loss = F.cross_entropy(logits.float(), y) + 1e-7 * variational.kl()
            loss.backward()
            optimiser.step()

    def lightning_pass() -> None:
        from t2v_lightning.features import TensorInputs
        from t2v_lightning.fisher.callback import FisherCallback
        from t2v_lightning.fisher.montecarlo import FisherPassModule
        from t2v_lightning.trainers import TrainerSpec, quiet_lightning

        with quiet_lightning():
            callback = FisherCallback(
                at="train_batch", num_examples=args.examples, head=head, network="network"
            )
            module = FisherPassModule(network, TensorInputs(inputs), args.batch)
            trainer = TrainerSpec(
                accelerator="gpu" if device.type == "cuda" else "cpu",
                progress_bar=False,
                precision="bf16-mixed" if args.precision == "bf16" else "32-true",
            ).build("Fisher pass", 1, [callback])
            trainer.fit(module)

    if args.only == "paired":
        for p in network.parameters():
            p.requires_grad_(True)  # the taps freeze them inside their context and restore them
        return _paired_ratios(args, plain, fisher, sync)
    for p in network.parameters():
        p.requires_grad_(args.only == "plain")
    run = {
        "plain": plain,
        "per_sample": lambda: fisher("per_sample"),
        "batch": lambda: fisher("batch"),
        "exact": lambda: fisher("exact"),
        "variational": variational_epoch,
        "lightning_per_sample": lightning_pass,
    }[args.only]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [_timed(run, sync) for _ in range(args.repeats)]
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "seconds": min(times),
        "peak_mib": peak,
        "baseline_mib": baseline / 1024,
        "threads": torch.get_num_threads(),
    }


PAIRED = ("per_sample", "batch")


def _paired_ratios(args: argparse.Namespace, plain: Any, fisher: Any, sync: Any) -> dict[str, Any]:
    """Ratios to the plain pass timed back to back in one process, round after round.

    A shared machine's speed drifts between (and within) subprocesses; a pass and the plain pass
    run next to each other see nearly the same machine, so the median of their per-round ratios
    is steadier than a ratio of two separate bests.
    """
    import statistics

    import torch

    run = {"plain": plain, **{name: (lambda name=name: fisher(name)) for name in PAIRED}}
    for name in run:  # warm-up
        _timed(run[name], sync)
    ratios: dict[str, list[float]] = {name: [] for name in PAIRED}
    for round_ in range(args.paired_rounds):
        order = list(run) if round_ % 2 == 0 else list(reversed(run))
        seconds = {name: _timed(run[name], sync) for name in order}
        for name in PAIRED:
            ratios[name].append(seconds[name] / seconds["plain"])
    return {
        "ratios": {name: statistics.median(values) for name, values in ratios.items()},
        "spread": {name: [min(values), max(values)] for name, values in ratios.items()},
        "rounds": args.paired_rounds,
        "threads": torch.get_num_threads(),
    }


def _timed(run: Any, sync: Any) -> float:
    """Wall time of one call of ``run`` (device work included)."""
    sync()
    start = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - start


def _in_subprocess(args: argparse.Namespace, only: str) -> dict[str, Any]:
    """Run one measurement (``--only``) in a fresh Python process with the same options."""
    command = (
        [sys.executable, __file__, "--only", only]
        + [
            f"--{key.replace('_', '-')}={value}"
            for key, value in vars(args).items()
            if key not in ("only", "measure", "json", "channels_last")
        ]
        + (["--channels-last"] if args.channels_last else [])
    )
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, env=dict(os.environ)
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def _load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="get_probe name (timm:<name> too)")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="alternating subprocess rounds")
    parser.add_argument(
        "--measure",
        nargs="+",
        choices=MEASUREMENTS,
        default=[m for m in MEASUREMENTS if m != "lightning_per_sample"],
    )
    parser.add_argument(
        "--paired-rounds", type=int, default=6, help="rounds of the paired measurement (0: skip it)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--only", choices=(*MEASUREMENTS, "paired"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(_measure(args)))
        return
    names = ["plain"] + [name for name in args.measure if name != "plain"]
    results: dict[str, dict[str, float]] = {}
    load_before = _load_average()
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else list(reversed(names)):
            result = _in_subprocess(args, name)
            if name not in results or result["seconds"] < results[name]["seconds"]:
                results[name] = result
    paired = _in_subprocess(args, "paired") if args.paired_rounds > 0 else {}
    plain = results["plain"]
    threads = int(plain["threads"])
    print(
        f"{args.model}, {args.examples} examples of 3x{args.size}x{args.size}, batch {args.batch}, "
        f"{args.classes} classes, {args.device} {args.precision}"
        f"{' channels-last' if args.channels_last else ''}, {threads} torch threads on "
        f"{os.cpu_count()} CPUs, best of {args.rounds}x{args.repeats}; load average "
        f"{load_before} -> {_load_average()}"
    )
    print(
        f"{'pass':<22}{'seconds':>9}{'x plain':>9}{'images/s':>10}{'peak MiB':>10}"
        f"{'paired x plain (range)':>26}"
    )
    for name in names:
        result = results[name]
        ratio = result["seconds"] / plain["seconds"]
        pair = ""
        if name in paired.get("ratios", {}):
            low, high = paired["spread"][name]
            pair = f"{paired['ratios'][name]:.2f} ({low:.2f}-{high:.2f})"
        print(
            f"{name:<22}{result['seconds']:>9.2f}{ratio:>9.2f}"
            f"{args.examples / result['seconds']:>10.0f}{result['peak_mib']:>10.0f}{pair:>26}"
        )
    if paired:
        print(
            f"paired: median over {paired['rounds']} rounds of (pass / plain pass) timed back to "
            "back in one process"
        )
    print(
        "targets: per_sample <= 1.5x, batch <= 1.1x (exact: one backward per class; "
        "variational: one of its epochs)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "args": {k: v for k, v in vars(args).items() if k != "only"},
                    "load_average": load_before,
                    "results": results,
                    "paired": paired,
                },
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
