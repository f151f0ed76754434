"""Cost of the Fisher pass against one plain forward+backward pass over the same examples.

Prints, for one probe and one batch of settings, the wall time of a plain training pass
(forward, cross-entropy on the true labels, backward into every weight) and the time of the
Fisher pass of each estimator as a ratio to it, plus peak memory. Every measurement runs in a
fresh subprocess, so the peak resident memory (CPU) or peak allocated memory (CUDA) belongs to
that measurement alone.

    python bench/fisher_cost.py                       # ResNet-18, 1000 examples of 3x32x32
    python bench/fisher_cost.py --model resnet34 --examples 500 --device cuda

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

MEASUREMENTS = ("plain", "per_sample", "batch", "exact", "lightning_per_sample")


def _measure(args: argparse.Namespace) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from t2v_lightning import get_probe
    from t2v_lightning.fisher.estimators import LayerFisherTaps, batch_filter_sums, embedded_layers

    torch.manual_seed(0)
    device = torch.device(args.device)
    network = get_probe(args.model, num_classes=args.classes).to(device).eval()
    inputs = torch.randn(args.examples, 3, args.size, args.size)
    labels = torch.randint(0, args.classes, (args.examples,))
    batches = [
        (inputs[i : i + args.batch].to(device), labels[i : i + args.batch].to(device))
        for i in range(0, args.examples, args.batch)
    ]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        for x, y in batches:
            network.zero_grad(set_to_none=True)
            F.cross_entropy(network(x), y).backward()

    layers = embedded_layers(network, "fc")

    def fisher(estimator: str) -> None:
        with torch.enable_grad(), LayerFisherTaps(network, layers) as taps:
            for number, (x, _) in enumerate(batches):
                ids = torch.arange(number * args.batch, number * args.batch + x.shape[0])
                batch_filter_sums(
                    network, taps, x, ids, torch.ones(x.shape[0], dtype=torch.bool), estimator, 0
                )

    def lightning_pass() -> None:
        from t2v_lightning.features import TensorInputs
        from t2v_lightning.fisher.callback import FisherCallback
        from t2v_lightning.fisher.module import FisherPassModule
        from t2v_lightning.task2vec import _quiet_lightning

        import lightning.pytorch as pl

        with _quiet_lightning():
            callback = FisherCallback(num_examples=args.examples, head="fc", network="network")
            module = FisherPassModule(network, TensorInputs(inputs), args.batch)
            trainer = pl.Trainer(
                accelerator=device.type, devices=1, max_epochs=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[callback],
            )
            trainer.fit(module)

    for p in network.parameters():
        p.requires_grad_(args.only == "plain")
    run = {
        "plain": plain,
        "per_sample": lambda: fisher("per_sample"),
        "batch": lambda: fisher("batch"),
        "exact": lambda: fisher("exact"),
        "lightning_per_sample": lightning_pass,
    }[args.only]
    # warm-up on the first batch (allocator, kernels), then the timed passes
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"seconds": min(times), "peak_mib": peak, "baseline_mib": baseline / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-exact", action="store_true", help="exact costs ~classes x")
    parser.add_argument("--only", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(_measure(args)))
        return
    results: dict[str, dict[str, float]] = {}
    for name in MEASUREMENTS:
        if name == "exact" and args.skip_exact:
            continue
        command = [sys.executable, __file__, "--only", name] + [
            f"--{key.replace('_', '-')}={value}"
            for key, value in vars(args).items()
            if key not in ("only", "skip_exact")
        ]
        output = subprocess.run(
            command, check=True, capture_output=True, text=True, env=dict(os.environ)
        ).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    plain = results["plain"]
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    print(
        f"{args.model}, {args.examples} examples of 3x{args.size}x{args.size}, batch {args.batch}, "
        f"{args.classes} classes, device {args.device} ({threads} threads), best of {args.repeats}"
    )
    print(f"{'pass':<22}{'seconds':>9}{'x plain':>9}{'peak MiB':>10}")
    for name, result in results.items():
        ratio = result["seconds"] / plain["seconds"]
        print(f"{name:<22}{result['seconds']:>9.2f}{ratio:>9.2f}{result['peak_mib']:>10.0f}")
    print("targets: per_sample <= 1.5x, batch <= 1.1x (exact needs one backward per class)")


if __name__ == "__main__":
    main()
