"""Cost of one language-model task embedding, against a plain pass and the published procedure.

A GPT-2 with random weights (GPT-2 small's shapes by default: 12 layers, width 768, vocabulary
50,257) and one task of ``--sequences`` random sequences of ``--length`` tokens. Timed side by
side in one process, in alternating order over ``--repeats`` rounds (best of the rounds, and the
median of each round's ratio to its own plain pass):

* ``plain``: one plain forward+backward over the task's tokens (batches of ``--batch``
  sequences, next-token cross-entropy, gradients into every weight, eval mode);
* ``fisher``: our Fisher pass alone (``per_sample``, the probe's LM head as the head);
* ``fisher_batch``: the same with the ``batch`` estimator;
* ``task``: a whole task (``embed_lm`` at SPEC section 8's defaults: hidden states cached once,
  the untied head copy fitted 5 epochs, the Fisher pass);
* ``task_no_head``: a whole task with ``head_epochs=0``;
* ``reference``: the published procedure as SPEC section 8 describes it, on a copy of the
  model: train mode (dropout on); 5 epochs of AdamW (lr 5e-5, eps 1e-8, weight decay 1e-4) on
  ``lm_head`` only, which through the tie runs the whole model forward and backward; then one
  pass of its ``batch`` Fisher (labels sampled from the softmax at every position, scored one
  position late, squared gradient of each mini-batch's token-mean loss, averaged) and the
  reduction to one value per row.

Peak memory: the resident set size sampled every 5 ms during each run, minus the size before it
(``peak_rss_mib``), so one task's own footprint.

    python bench/lm_diversity.py                          # 64 × 128 tokens, GPT-2 small shapes
    python bench/lm_diversity.py --sequences 16 --repeats 1 --layers 4   # a lighter run
    python bench/lm_diversity.py --json bench/results/lm_diversity.json

Targets (ratios to ``plain``): ``fisher`` <= 1.2, ``task`` <= 2.5, ``task_no_head`` <= 1.3.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from t2v_lightning.causal_lm import CausalLMProbe
from t2v_lightning.lm import LMSettings, embed_lm, lm_fisher, read_lm_task

TARGETS = {"fisher": 1.2, "task": 2.5, "task_no_head": 1.3}
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


class PeakRSS:
    """The largest resident set size seen while the context runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def build_probe(args: argparse.Namespace) -> CausalLMProbe:
    """A GPT-2 with random weights (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=max(1024, args.length),
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=0,
        eos_token_id=0,
    )
    return CausalLMProbe(GPT2LMHeadModel(config).eval(), None, "gpt2-random")


def task_items(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """``--sequences`` random sequences of ``--length`` tokens (no EOS inside, no padding)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (args.sequences, args.length), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]


def plain_pass(probe: CausalLMProbe, items: list[dict[str, torch.Tensor]], batch: int) -> None:
    """One forward+backward over the tokens, gradients into every weight (eval mode)."""
    model = probe.model
    ids = torch.stack([item["input_ids"] for item in items])
    for start in range(0, ids.shape[0], batch):
        part = ids[start : start + batch]
        loss = model(input_ids=part, attention_mask=torch.ones_like(part), labels=part).loss
        loss.backward()
        model.zero_grad(set_to_none=True)


def reference_procedure(
    probe: CausalLMProbe, items: list[dict[str, torch.Tensor]], batch: int, epochs: int = 5
) -> torch.Tensor:
    """SPEC section 8's published procedure on a copy of the model; returns its embedding."""
    model = copy.deepcopy(probe.model)
    model.train()  # dropout on, as in the published code
    eos = int(model.config.eos_token_id)
    optimizer = torch.optim.AdamW(model.lm_head.parameters(), lr=5e-5, eps=1e-8, weight_decay=1e-4)
    ids = torch.stack([item["input_ids"] for item in items])
    mask = torch.stack([item["attention_mask"] for item in items])
    for _ in range(epochs):
        for start in range(0, ids.shape[0], batch):
            part, part_mask = ids[start : start + batch], mask[start : start + batch]
            labels = part.masked_fill(part == eos, -100)
            loss = model(input_ids=part, attention_mask=part_mask, labels=labels).loss
            loss.backward()  # through the tie: the whole model
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    weights = {
        name: module.weight
        for name, module in model.named_modules()
        if "lm_head" not in name and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
    }
    squares = {name: torch.zeros_like(weight) for name, weight in weights.items()}
    batches = 0
    for start in range(0, ids.shape[0], batch):
        part, part_mask = ids[start : start + batch], mask[start : start + batch]
        logits = model(input_ids=part, attention_mask=part_mask).logits
        with torch.no_grad():
            sampled = torch.distributions.Categorical(logits=logits).sample()
        # the published pairing: logits at t with the label drawn at t + 1
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), sampled[:, 1:].reshape(-1)
        )
        model.zero_grad(set_to_none=True)
        loss.backward()
        for name, weight in weights.items():
            if weight.grad is not None:
                squares[name] += weight.grad.square()
        batches += 1
    return torch.cat(
        [(value / batches).reshape(value.shape[0], -1).mean(1) for value in squares.values()]
    )


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} / {five:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["plain", "fisher", "fisher_batch", "task", "task_no_head", "reference"],
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probe = build_probe(args)
    items = task_items(args)
    task = read_lm_task(items, probe.vocab_size)
    cpu = torch.device("cpu")
    head = probe.lm_head.weight.detach().clone()
    settings = LMSettings(batch_size=args.batch, precision=args.precision)
    runs: dict[str, Callable[[], Any]] = {
        "plain": lambda: plain_pass(probe, items, args.batch),
        "fisher": lambda: lm_fisher(
            probe,
            task,
            head,
            None,
            LMSettings(batch_size=args.batch, head_epochs=0, precision=args.precision),
            cpu,
        ),
        "fisher_batch": lambda: lm_fisher(
            probe,
            task,
            head,
            None,
            LMSettings(
                batch_size=args.batch, head_epochs=0, estimator="batch", precision=args.precision
            ),
            cpu,
        ),
        "task": lambda: embed_lm(probe, items, settings, cpu),
        "task_no_head": lambda: embed_lm(
            probe,
            items,
            LMSettings(batch_size=args.batch, head_epochs=0, precision=args.precision),
            cpu,
        ),
        "reference": lambda: reference_procedure(probe, items, args.batch),
    }
    names = [name for name in runs if name in args.runs]
    if "plain" not in names:
        parser.error("--runs must include plain (the ratios' denominator)")
    embed_lm(
        probe, items[: args.batch], LMSettings(batch_size=args.batch, head_epochs=1), cpu
    )  # warm-up
    load_before = machine_load()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, float] = {}
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            with PeakRSS() as memory:
                start = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks.get(name, 0.0), (memory.peak - memory.before) / 2**20)
            print(f"  round {repeat + 1} {name}: {seconds[name][-1]:.1f} s", flush=True)
    best = {name: min(values) for name, values in seconds.items()}
    paired = {
        name: statistics.median(s / p for s, p in zip(values, seconds["plain"]))
        for name, values in seconds.items()
    }
    header = (
        f"GPT-2 random weights: {args.layers} layers, width {args.width}, vocabulary {args.vocab}; "
        f"{args.sequences} sequences x {args.length} tokens, batch {args.batch}, "
        f"{args.precision}, cpu, {args.threads} threads, best of {args.repeats}; load average "
        f"(1 / 5 min) {load_before} -> {machine_load()} on {os.cpu_count()} CPUs"
    )
    lines = [header, f"{'run':<14}{'seconds':>9}{'x plain':>9}{'paired':>8}{'peak RSS MiB':>14}"]
    for name in names:
        lines.append(
            f"{name:<14}{best[name]:>9.2f}{best[name] / best['plain']:>9.2f}"
            f"{paired[name]:>8.2f}{peaks[name]:>14.0f}"
        )
    if "reference" in best and "task" in best:
        lines.append(
            f"whole task (ours, defaults) vs the published procedure: "
            f"{best['task'] / best['reference']:.2f}x its time "
            f"({best['reference'] / best['task']:.1f}x faster)"
        )
    for name, limit in TARGETS.items():
        if name in best:
            ratio = best[name] / best["plain"]
            lines.append(
                f"target {name} <= {limit}x plain: {ratio:.2f}x "
                f"{'met' if ratio <= limit else 'NOT met'}"
            )
    print("\n".join(lines))
    if args.json is not None:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip()
        except OSError:
            commit = ""
        report = {
            "settings": vars(args) | {"json": str(args.json)},
            "seconds": seconds,
            "best": best,
            "paired_ratio": paired,
            "peak_rss_mib": peaks,
            "ratio": {name: best[name] / best["plain"] for name in names},
            "targets": TARGETS,
            "load_average": [load_before, machine_load()],
            "torch": torch.__version__,
            "commit": commit,
            "text": lines,
        }
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
