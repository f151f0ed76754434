"""One step of language-model head fitting, the closed form against autograd, side by side.

GPT-2 small's head (vocabulary 50,257 × width 768) and one batch of 8 sequences × 127
next-token positions (1,016 tokens), random values. Four ways of one AdamW step, timed in one
process in alternating order (best of ``--repeats``):

* ``autograd``: ``F.cross_entropy`` backward, unfused AdamW (what head fitting did before);
* ``autograd_fused``: the same with the fused AdamW;
* ``closed_form``: :class:`t2v_lightning.lm._HeadGradient` (gradient formed in place in reused
  buffers), unfused AdamW;
* ``closed_form_fused``: the same with the fused AdamW (what :func:`~t2v_lightning.lm.fit_lm_head`
  does).

    python bench/lm_head_step.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from t2v_lightning.lm import _HeadGradient  # noqa: E402


def stepper(
    closed_form: bool,
    fused: bool,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
) -> Callable[[], None]:
    """One AdamW step of head fitting on ``(hidden, targets)`` done one of the four ways."""
    w = weight.clone().requires_grad_(not closed_form)
    optimizer = torch.optim.AdamW([w], lr=5e-5, eps=1e-8, weight_decay=1e-4, fused=fused)
    gradient = _HeadGradient(w, targets.numel())

    def step() -> None:
        if closed_form:
            _, w.grad, _ = gradient(hidden, targets, w, None)
        else:
            F.cross_entropy(F.linear(hidden, w), targets).backward()
        optimizer.step()
        w.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1016)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, width = 50257, 768
    hidden = torch.randn(args.tokens, width)
    targets = torch.randint(0, vocab, (args.tokens,))
    weight = torch.randn(vocab, width) * 0.02
    ways = {
        "autograd": stepper(False, False, hidden, targets, weight),
        "autograd_fused": stepper(False, True, hidden, targets, weight),
        "closed_form": stepper(True, False, hidden, targets, weight),
        "closed_form_fused": stepper(True, True, hidden, targets, weight),
    }
    for step in ways.values():
        step()  # warm-up (optimizer state, buffers)
    seconds: dict[str, float] = {name: float("inf") for name in ways}
    for repeat in range(args.repeats):
        for name in ways if repeat % 2 == 0 else list(ways)[::-1]:
            start = time.perf_counter()
            ways[name]()
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    print(
        f"{args.tokens} tokens x vocabulary {vocab} x width {width}, {args.threads} threads, "
        f"best of {args.repeats}"
    )
    for name, value in seconds.items():
        print(f"{name:<18}{value:8.3f} s  {value / seconds['autograd']:.2f}x autograd")


if __name__ == "__main__":
    main()
