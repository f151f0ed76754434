"""Time the closed forms of depthwise convolutions on one device, layer by layer.

The per-example squared gradient rows of a depthwise convolution can be computed three ways:
the patch form (unfold, one small product per example and channel), the per-offset sum (one
product and sum over output positions per kernel offset) and the grouped convolution (each
example's input correlated with its own output gradient, B·C groups). On the CPU the grouped
convolution is 3-5x faster than the patch form on EfficientNet-Lite0's layers and is the default;
off the CPU the per-offset sum is used for kernels of 5x5 and more and patches below, which has
never been timed on a GPU. This script records every depthwise layer's input and output gradient
in one Fisher pass of EfficientNet-Lite0 (random weights) and times the three forms on them.

    python bench/depthwise_forms.py                          # CPU, 25 images of 224 px
    python bench/depthwise_forms.py --device cuda --batch 100
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="timm:tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from t2v_lightning import get_probe
    from t2v_lightning.fisher.estimators import (
        LayerFisherTaps,
        batch_filter_sums,
        embedded_layers,
    )
    from t2v_lightning.fisher.layers.conv import (
        ConvRule,
        conv_patches,
        depthwise_sq_norms,
    )

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    network = get_probe(args.model, num_classes=10).to(device).eval()
    layers = embedded_layers(network, "fc" if hasattr(network, "fc") else "classifier")
    recorded: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
    original = ConvRule.sq_norms

    def record(
        rule: ConvRule, module: Any, inputs: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        channels = grad.shape[1]
        if (
            getattr(module, "groups", 1) > 1
            and module.groups == channels == inputs.shape[1]
            and inputs.ndim == 4
        ):
            recorded.append((rule.geometry(module), inputs.detach().clone(), grad.detach().clone()))
        return original(rule, module, inputs, grad)

    ConvRule.sq_norms = record  # type: ignore[method-assign]
    try:
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        ids = torch.arange(args.batch)
        with torch.enable_grad(), LayerFisherTaps(network, layers) as taps:
            batch_filter_sums(
                network,
                taps,
                x,
                ids,
                torch.ones(args.batch, dtype=torch.bool, device=device),
                "per_sample",
                0,
            )
    finally:
        ConvRule.sq_norms = original  # type: ignore[method-assign]

    def patches(module: Any, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        cols = conv_patches(module, inputs)  # B, C·k, L
        batch, channels = grad.shape[0], grad.shape[1]
        cols = cols.reshape(batch, channels, -1, cols.shape[-1])
        rows = torch.einsum("bcl,bckl->bck", grad.reshape(batch, channels, -1), cols)
        return torch.linalg.vector_norm(rows, dim=-1).square()

    forms = {
        "grouped convolution": lambda m, i, g: depthwise_sq_norms(m, i, g, by_offsets=False),
        "per-offset sum": lambda m, i, g: depthwise_sq_norms(m, i, g, by_offsets=True),
        "patches": patches,
    }

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def kind(module: Any) -> str:
        return f"{module.kernel_size[0]}x{module.kernel_size[1]} stride {module.stride[0]}"

    best: dict[str, collections.Counter[str]] = {}
    worst_error = 0.0
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, form in forms.items():
            seconds: collections.Counter[str] = collections.Counter()
            for module, inputs, grad in recorded:
                sync()
                start = time.perf_counter()
                value = form(module, inputs, grad)
                sync()
                seconds[kind(module)] += time.perf_counter() - start
                reference = forms["patches"](module, inputs, grad) if name != "patches" else value
                error = float(
                    ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).cpu()
                )
                worst_error = max(worst_error, error)
            if name not in best:
                best[name] = seconds
            else:
                best[name] = collections.Counter(
                    {key: min(best[name][key], seconds[key]) for key in seconds}
                )
    kinds = sorted({kind(module) for module, _, _ in recorded})
    print(
        f"{args.model}, {len(recorded)} depthwise layers, batch {args.batch} of "
        f"3x{args.size}x{args.size}, {args.device}, {torch.get_num_threads()} CPU threads, best of "
        f"{args.repeats}"
    )
    print(f"{'form':<22}" + "".join(f"{k:>16}" for k in kinds) + f"{'total s':>10}")
    for name, seconds in best.items():
        print(
            f"{name:<22}"
            + "".join(f"{seconds[k]:>16.4f}" for k in kinds)
            + f"{sum(seconds.values()):>10.4f}"
        )
    print(f"largest relative difference from the patch form: {worst_error:.1e}")


if __name__ == "__main__":
    main()
