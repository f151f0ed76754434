r"""Causal language models as Task2Vec probes: the task embedding of a set of token sequences.

Python API::

    from t2v_lightning import Task2Vec, get_probe

    probe = get_probe("lm:path/to/save_pretrained_dir")   # or a hub id ("gpt2") when online
    probe.tokenizer                                       # its tokenizer (transformers)
    task = [{"input_ids": ids, "attention_mask": mask}, ...]   # any dataset of such mappings
    embedding = Task2Vec(probe).embed(task)              # a TaskEmbedding, SPEC section 8

    # or without Task2Vec, on a chosen device (what a driver running many tasks calls):
    from t2v_lightning.lm import LMSettings, embed_lm
    embedding = embed_lm(probe, task, LMSettings(seed=3), device=torch.device("cpu"))

A task is any map-style dataset (or sequence) whose items are mappings with ``input_ids`` and
``attention_mask`` (1-D tensors or lists of ints; lengths may differ, padding on either side);
there is no label: the task is next-token prediction. Other keys are ignored.

What :func:`embed_lm` computes (SPEC section 8, with its items 1-5):

1. the probe's final hidden states (after the last norm) are computed once over the task
   (eval mode, no dropout, ``position_ids`` from the attention mask so that left padding does
   not shift positions) and cached;
2. an *untied copy* of the LM head is fitted on them: AdamW (lr 5e-5, eps 1e-8, weight decay
   1e-4), 5 epochs of batches of 8 sequences in order, next-token cross-entropy on the real
   positions whose next token is real. The probe itself never changes (its weights and
   fingerprint are the same after the call);
3. the Fisher pass (:mod:`t2v_lightning.fisher.tokens`): at every real position :math:`t` a
   token is sampled from :math:`p(\cdot \mid x_{\le t})` (the logits at :math:`t`) and scored at
   :math:`t`; padding is masked by the attention mask. ``per_sample`` sums the per-sequence
   squared gradients (one value per sequence, the default); ``batch`` squares the token-mean
   gradient of each mini-batch of ``batch_size`` sequences, as the published code does (its
   expectation is smaller and noisier; recorded in the meta);
4. the embedding: one value per row of ``weight.reshape(weight.shape[0], -1)`` of every module
   of the model but the LM head with a weight: token table, position table (where the model
   has one), layer norms / RMSNorms, attention and MLP projections (``Conv1D``: a row is an
   input feature; ``nn.Linear``: an output unit), each by its rule in the layer table
   (:mod:`t2v_lightning.fisher.layers.table`). GPT-2 small gives 134,993 values.

Label draws are keyed by ``(seed, sequence index in the task, real position, draw)``: a task's
artifact depends on its sequences and ``seed`` only, not on the batch size, the padding or the
process that computes it (a driver giving every task its own seed gives tasks independent
draws). ``precision="bf16-mixed"`` runs the model under bfloat16 autocast; head fitting, the
likelihood and the sums stay float32 / float64; ``"16-mixed"`` runs it under float16 with the
image path's loss scale (``grad_scale``, undone in float32 before squaring).
``estimator="exact"`` and ``method="variational"`` are refused with a message saying why.

The gradient of :math:`\log p(y_t)` with respect to the final hidden state is
:math:`W_{y_t} - \sum_k p_t(k) W_k` (:math:`W` the fitted head), so the pass backpropagates
that directly from the hidden states: the logits never enter the autograd graph.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import lightning
import torch
import torch.nn.functional as F
from torch import nn

from t2v_lightning.causal_lm import (
    CausalLMProbe,
    is_language_model,
    lm_probe,
    position_ids_from_mask,
)
from t2v_lightning.choices import ESTIMATOR_FACTS, METHODS, FisherError, check_choice
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.features import DatasetError
from t2v_lightning.fisher.estimators import filter_values
from t2v_lightning.fisher.faults import precision_hint
from t2v_lightning.fisher.likelihoods import Predictions
from t2v_lightning.fisher.taps import FP16_GRAD_SCALE
from t2v_lightning.fisher.tokens import (
    EXACT_REFUSED,
    TOKEN_LIKELIHOOD,
    SequenceLayer,
    SequenceTaps,
    TokenCategorical,
    sequence_layers,
    token_draw_ids,
)
from t2v_lightning.probe import ProbeError, probe_fingerprint
from t2v_lightning.safety import check_seed, is_int
from t2v_lightning.version import __version__

__all__ = [
    "LM_ESTIMATORS",
    "LM_PRECISIONS",
    "CausalLMProbe",
    "LMSettings",
    "LMTask",
    "embed_lm",
    "fit_lm_head",
    "is_language_model",
    "lm_fisher",
    "lm_probe",
    "lm_settings",
    "LM_TASK2VEC_OPTIONS",
    "read_lm_task",
]

log = logging.getLogger(__name__)

LM_ESTIMATORS: tuple[str, ...] = ("per_sample", "batch")
LM_PRECISIONS: tuple[str, ...] = ("32-true", "bf16-mixed", "16-mixed")
# The autocast type of each mixed precision.
_AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

# Estimators and methods of the image path that language models do not offer, and why.
_REFUSED_ESTIMATORS: dict[str, str] = {"exact": EXACT_REFUSED}
_REFUSED_METHODS: dict[str, str] = {
    "variational": (
        "method='variational' is not offered for language models: its weight-noise layers "
        "cover conv and linear layers, not the token and position tables, HF Conv1D or "
        "RMSNorm that an LM embedding is made of; use method='montecarlo'"
    ),
}


@dataclass(frozen=True)
class LMSettings:
    """How a language-model task is embedded (SPEC section 8's defaults).

    Args:
        estimator: ``"per_sample"`` (per-sequence squared gradients) or ``"batch"`` (squared
            token-mean gradient of each mini-batch of ``batch_size`` sequences, the published
            code's). ``"exact"`` is refused (one backward per vocabulary entry and position).
        mc_samples: labels drawn per position (``per_sample``).
        batch_size: sequences per step (head fitting, caching, Fisher; the ``batch``
            estimator's mini-batch).
        head_epochs: epochs of fitting the untied copy of the LM head (0: the head as it is).
        head_lr: AdamW learning rate of head fitting.
        head_eps: AdamW epsilon.
        head_weight_decay: AdamW weight decay.
        max_samples: the first ``max_samples`` sequences are used (``None``: all).
        seed: seed of the label draws.
        precision: ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"`` (autocast; head fitting,
            the likelihood and the sums stay float32 / float64). ``"16-mixed"`` scales the
            backward by ``grad_scale`` and divides the gradients by it in float32 before
            squaring, as the image path does; on a CPU it runs as ``"bf16-mixed"`` (a warning
            says so), as Lightning does.
        grad_scale: the float16 loss scale (``None``: 1024 under ``"16-mixed"``, else 1).
    """

    estimator: Literal["per_sample", "batch"] = "per_sample"
    mc_samples: int = 1
    batch_size: int = 8
    head_epochs: int = 5
    head_lr: float = 5e-5
    head_eps: float = 1e-8
    head_weight_decay: float = 1e-4
    max_samples: int | None = None
    seed: int = 0
    precision: str = "32-true"
    grad_scale: float | None = None

    def __post_init__(self) -> None:
        if self.estimator in _REFUSED_ESTIMATORS:
            raise ValueError(_REFUSED_ESTIMATORS[self.estimator])
        check_choice("estimator", self.estimator, LM_ESTIMATORS)
        if not is_int(self.mc_samples) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {self.mc_samples!r}")
        if not ESTIMATOR_FACTS[self.estimator].uses_mc_samples and self.mc_samples != 1:
            raise ValueError(f"mc_samples does not apply to estimator={self.estimator!r}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not is_int(self.head_epochs) or self.head_epochs < 0:
            raise ValueError(
                f"head_epochs must be a non-negative integer, got {self.head_epochs!r}"
            )
        for name in ("head_lr", "head_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if not isinstance(self.head_weight_decay, (int, float)) or not self.head_weight_decay >= 0:
            raise ValueError(f"head_weight_decay must be >= 0, got {self.head_weight_decay!r}")
        if self.max_samples is not None and (not is_int(self.max_samples) or self.max_samples < 1):
            raise ValueError(
                f"max_samples must be a positive integer or None, got {self.max_samples!r}"
            )
        check_seed(self.seed)
        if self.precision not in LM_PRECISIONS:
            raise ValueError(
                f"precision={self.precision!r} is not offered for language-model probes; use one of "
                f"{LM_PRECISIONS}"
            )
        if self.grad_scale is not None and (
            isinstance(self.grad_scale, bool)
            or not isinstance(self.grad_scale, (int, float))
            or not 0 < self.grad_scale < math.inf
        ):
            raise ValueError(f"grad_scale must be a positive number, got {self.grad_scale!r}")

    @property
    def loss_scale(self) -> float:
        """The factor on the backward: ``grad_scale``, or 1024 under float16 and 1 otherwise."""
        if self.grad_scale is not None:
            return float(self.grad_scale)
        return FP16_GRAD_SCALE if self.precision == "16-mixed" else 1.0

    def for_device(self, device: torch.device) -> LMSettings:
        """These settings as they run on ``device``: float16 autocast becomes bfloat16 on a CPU,
        with a warning (Lightning does the same for ``Trainer(precision="16-mixed")``)."""
        if self.precision != "16-mixed" or device.type != "cpu":
            return self
        warnings.warn(
            "precision='16-mixed' is not supported on a CPU: running with 'bf16-mixed' instead "
            "(recorded so in the artifact)",
            stacklevel=3,
        )
        return replace(self, precision="bf16-mixed", grad_scale=None)


# Task2Vec's options that a language model reads, with the value that means "not given".
_TASK2VEC_DEFAULTS: dict[str, Any] = {
    "method": "montecarlo",
    "estimator": None,
    "mc_samples": None,
    "likelihood": "categorical",
    "max_samples": None,
    "skip_layers": 0,
    "balanced_sampling": None,
    "batch_size": None,
    "reset_head": None,
    "head_epochs": None,
    "head_lr": None,
    "head_weight_decay": 1e-4,
    "head_optimizer": None,
    "seed": 0,
    "precision": "32-true",
    "checkpoint_dir": None,
    "checkpoint_every_n_steps": None,
    "resume_from": None,
    "variational_epochs": None,
    "variational_lr": None,
    "variational_head_lr": None,
    "variational_beta": None,
}
LM_TASK2VEC_OPTIONS: tuple[str, ...] = tuple(_TASK2VEC_DEFAULTS)
"""The :class:`~t2v_lightning.Task2Vec` arguments that :func:`lm_settings` reads."""


def lm_settings(**options: Any) -> LMSettings:
    """:class:`LMSettings` from :class:`~t2v_lightning.Task2Vec`'s arguments, by name (an
    argument left out or ``None``: SPEC section 8's value). An argument that does not apply to
    a language model is refused with a ``ValueError`` that names it and says why; an unknown
    name with a ``TypeError``."""
    unknown = sorted(set(options) - set(_TASK2VEC_DEFAULTS))
    if unknown:
        raise TypeError(f"lm_settings() got unknown arguments {unknown}")
    given = {**_TASK2VEC_DEFAULTS, **options}
    method, estimator = given["method"], given["estimator"]
    if estimator in _REFUSED_ESTIMATORS:
        raise ValueError(_REFUSED_ESTIMATORS[estimator])
    if any(given[name] is not None for name in given if name.startswith("variational_")):
        method = "variational"  # its options were given
    if method in _REFUSED_METHODS:
        raise ValueError(_REFUSED_METHODS[method])
    check_choice("method", method, ("montecarlo",))
    refused = {
        "likelihood": (
            given["likelihood"] != "categorical",
            "a language model's likelihood is the next-token distribution",
        ),
        "skip_layers": (given["skip_layers"] != 0, "a language model has no prefix to skip"),
        "balanced_sampling": (
            bool(given["balanced_sampling"]),
            "a language-model task has no classes",
        ),
        "reset_head": (
            bool(given["reset_head"]),
            "the head is always a copy of the model's LM head, fitted (head_epochs)",
        ),
        "head_optimizer": (
            given["head_optimizer"] not in (None, "adamw"),
            "the LM head is fitted with AdamW, as in the published code",
        ),
        "checkpoint_dir": (
            given["checkpoint_dir"] is not None,
            "a task's pass is short; runs of many tasks resume task by task",
        ),
        "checkpoint_every_n_steps": (
            given["checkpoint_every_n_steps"] is not None,
            "a task's pass is short; runs of many tasks resume task by task",
        ),
        "resume_from": (
            given["resume_from"] is not None,
            "a task's pass is short; runs of many tasks resume task by task",
        ),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise ValueError(
                f"{name}={given[name]!r} does not apply to a language-model probe: {why}"
            )
    defaults = LMSettings()
    filled = {
        name: getattr(defaults, name) if given[name] is None else given[name]
        for name in ("mc_samples", "batch_size", "head_epochs", "head_lr")
    }
    return LMSettings(
        estimator=estimator or LM_ESTIMATORS[0],  # type: ignore[arg-type]
        head_weight_decay=given["head_weight_decay"],
        max_samples=given["max_samples"],
        seed=given["seed"],
        precision=given["precision"],
        **filled,
    )


@dataclass
class LMTask:
    """A task's token sequences, right-padded to a common length.

    Attributes:
        input_ids: N × T int64.
        attention_mask: N × T int64 (1 real, 0 padding).
        dataset_size: items in the dataset it was read from.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    dataset_size: int
    lengths: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = self.attention_mask.sum(-1)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batches(self, batch_size: int) -> list[slice]:
        """Consecutive slices of ``batch_size`` sequences."""
        return [slice(s, min(len(self), s + batch_size)) for s in range(0, len(self), batch_size)]


def _as_row(value: Any, key: str, index: int) -> torch.Tensor:
    try:
        row = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DatasetError(f"item {index} of the task: {key!r} is not a sequence of ints") from err
    if row.ndim == 2 and row.shape[0] == 1:
        row = row[0]
    if row.ndim != 1 or (row.numel() and (row.is_floating_point() or row.is_complex())):
        raise DatasetError(
            f"item {index} of the task: {key!r} must be a 1-D sequence of ints, got shape "
            f"{tuple(row.shape)} of {row.dtype}"
        )
    return row.to(torch.int64)


def read_lm_task(dataset: Any, vocab_size: int, max_samples: int | None = None) -> LMTask:
    """Read a task's sequences (the first ``max_samples``) and check them.

    Raises:
        DatasetError: an item that is not a mapping with ``input_ids`` / ``attention_mask``,
            shapes that differ, a mask that is not 0/1, a sequence without a real token, or ids
            outside the vocabulary (items named by index).
    """
    try:
        size = len(dataset)
    except TypeError as err:
        raise DatasetError(
            "the task must be a map-style dataset or a sequence (it has no len())"
        ) from err
    if size == 0:
        raise DatasetError("the task is empty")
    count = size if max_samples is None else min(size, max_samples)
    ids_rows: list[torch.Tensor] = []
    mask_rows: list[torch.Tensor] = []
    for index in range(count):
        item = dataset[index]
        if not isinstance(item, Mapping) or "input_ids" not in item or "attention_mask" not in item:
            what = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise DatasetError(
                f"item {index} of the task is {what}; a language-model task's items are mappings "
                "with 'input_ids' and 'attention_mask' (no label)"
            )
        ids = _as_row(item["input_ids"], "input_ids", index)
        mask = _as_row(item["attention_mask"], "attention_mask", index)
        if ids.shape != mask.shape:
            raise DatasetError(
                f"item {index} of the task: input_ids has {ids.numel()} entries but "
                f"attention_mask has {mask.numel()}"
            )
        if bool(((mask != 0) & (mask != 1)).any()):
            raise DatasetError(
                f"item {index} of the task: attention_mask holds values other than 0 and 1"
            )
        if int(mask.sum()) == 0:
            raise DatasetError(
                f"item {index} of the task has no real token (its attention_mask is all 0)"
            )
        real = ids[mask.bool()]
        if bool(((real < 0) | (real >= vocab_size)).any()):
            raise DatasetError(
                f"item {index} of the task holds token ids outside the probe's vocabulary "
                f"[0, {vocab_size})"
            )
        ids_rows.append(torch.where(mask.bool(), ids, 0))
        mask_rows.append(mask)
    length = max(int(row.numel()) for row in ids_rows)
    input_ids = torch.zeros(count, length, dtype=torch.int64)
    attention_mask = torch.zeros(count, length, dtype=torch.int64)
    for row, (ids, mask) in enumerate(zip(ids_rows, mask_rows)):
        input_ids[row, : ids.numel()] = ids
        attention_mask[row, : mask.numel()] = mask
    return LMTask(input_ids, attention_mask, size)


def _autocast(device: torch.device, precision: str) -> Any:
    dtype = _AUTOCAST_DTYPES.get(precision)
    return torch.autocast(
        device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
    )


def _autocast_dtype(settings: LMSettings) -> torch.dtype:
    """The type the model's gradients have under ``settings.precision``."""
    return _AUTOCAST_DTYPES.get(settings.precision, torch.float32)


@torch.no_grad()
def _cached_targets(
    probe: CausalLMProbe, task: LMTask, settings: LMSettings, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of sequences: the final hidden states of the real positions whose next token is
    real (float32, M × D), and those next tokens (M)."""
    cached: list[tuple[torch.Tensor, torch.Tensor]] = []
    for part in task.batches(settings.batch_size):
        ids = task.input_ids[part].to(device)
        mask = task.attention_mask[part].to(device)
        with _autocast(device, settings.precision):
            hidden = probe.hidden_states(ids, mask)
        has_next = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
        cached.append((hidden[:, :-1][has_next].float(), ids[:, 1:][has_next]))
    return cached


# Devices whose AdamW has a fused kernel (one pass over the head per step instead of several).
_FUSED_ADAMW_DEVICES = frozenset({"cpu", "cuda"})


class _HeadGradient:
    """The token-mean next-token cross-entropy of one batch and its gradient, in closed form.

    ``d loss / d logits = (softmax(logits) - onehot(targets)) / M``, formed in place in the
    logits' buffer: the same values as autograd through ``F.cross_entropy`` (float32 rounding
    apart) without its three M × V temporaries, which dominate head fitting's cost with a
    50k-token vocabulary. The M × V logits and the V × D gradient live in buffers reused from
    step to step: a fresh 200 MB tensor per step is given back to the system and faulted in
    again each time.

    Args:
        weight: the head's weight (V × D), for the buffers' shape, type and device.
        max_tokens: the most tokens of one batch.
    """

    def __init__(self, weight: torch.Tensor, max_tokens: int) -> None:
        self._logits = weight.new_empty(max_tokens, weight.shape[0])
        self._grad = torch.empty_like(weight)

    @torch.no_grad()
    def __call__(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[float, torch.Tensor, torch.Tensor | None]:
        """``(summed loss over the M tokens, weight gradient, bias gradient or None)``; the
        weight gradient is the object's buffer, overwritten by the next call."""
        count = targets.numel()
        logits = self._logits[:count]  # M × V
        if bias is None:
            torch.mm(hidden, weight.t(), out=logits)
        else:
            torch.addmm(bias, hidden, weight.t(), out=logits)
        target_logits = logits.gather(1, targets[:, None])
        peak = logits.amax(1, keepdim=True)
        probs = logits.sub_(peak).exp_()
        normaliser = probs.sum(1, keepdim=True)
        loss_sum = float((normaliser.log() + peak - target_logits).sum())
        grad_logits = probs.div_(normaliser.mul_(count))
        grad_logits[torch.arange(count, device=targets.device), targets] -= 1.0 / count
        grad_bias = None if bias is None else grad_logits.sum(0)
        torch.mm(grad_logits.t(), hidden, out=self._grad)
        return loss_sum, self._grad, grad_bias


def fit_lm_head(
    probe: CausalLMProbe, task: LMTask, settings: LMSettings, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """An untied copy of the LM head, fitted on the task's cached final hidden states.

    AdamW (``head_lr``, ``head_eps``, ``head_weight_decay``), ``head_epochs`` epochs over
    batches of ``batch_size`` sequences in order, token-mean next-token cross-entropy over the
    real positions whose next token is real. The probe is not touched.

    Returns:
        ``(weight, bias, last epoch's mean loss)`` in float32 on ``device``.
    """
    head = probe.lm_head
    weight = head.weight.detach().to(device, torch.float32).clone()
    bias = None if head.bias is None else head.bias.detach().to(device, torch.float32).clone()
    if settings.head_epochs == 0:
        return weight, bias, None
    cached = [batch for batch in _cached_targets(probe, task, settings, device) if batch[1].numel()]
    if not cached:
        raise DatasetError(
            "no sequence of the task has two real tokens: there is no next token to fit the head "
            "on (use head_epochs=0)"
        )
    params = [weight] + ([] if bias is None else [bias])
    optimizer = torch.optim.AdamW(
        params,
        lr=settings.head_lr,
        eps=settings.head_eps,
        weight_decay=settings.head_weight_decay,
        fused=device.type in _FUSED_ADAMW_DEVICES,
    )
    gradient = _HeadGradient(weight, max(targets.numel() for _, targets in cached))
    last = 0.0
    for _ in range(settings.head_epochs):
        total, count = 0.0, 0
        for hidden, targets in cached:
            loss_sum, weight.grad, grad_bias = gradient(hidden, targets, weight, bias)
            if bias is not None:
                bias.grad = grad_bias
            optimizer.step()
            for param in params:
                param.grad = None
            total += loss_sum
            count += targets.numel()
        last = total / count
    if not math.isfinite(last):
        raise FisherError(f"head fitting diverged (loss {last}); lower head_lr")
    weight = weight.detach()
    return weight, (None if bias is None else bias.detach()), last


def lm_fisher(
    probe: CausalLMProbe,
    task: LMTask,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    settings: LMSettings,
    device: torch.device,
    sequence_ids: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], int, list[SequenceLayer]]:
    """The Fisher sums of every embedded layer of ``probe`` over ``task``.

    Args:
        probe: the language model (its parameters' ``requires_grad`` flags are restored).
        task: the sequences.
        head_weight: the (fitted) head, V × D.
        head_bias: its bias, or None.
        settings: estimator, draws, batch size, seed, precision.
        device: where to run.
        sequence_ids: the id of each sequence in the label draws (default ``0..N-1``).

    Returns:
        ``(sums, count, layers)``: per layer, float64 per-row sums of squared gradient rows (not
        divided by the row size); ``count`` is the number of sequences (``per_sample``) or of
        mini-batches (``batch``).
    """
    layers = sequence_layers(probe.body, probe.body_prefix)
    ids_of = torch.arange(len(task)) if sequence_ids is None else sequence_ids
    facts = ESTIMATOR_FACTS[settings.estimator]
    mc = settings.mc_samples if facts.uses_mc_samples else 1
    count = 0
    was_training = probe.training
    probe.eval()
    weight = head_weight.to(device, torch.float32)
    bias = None if head_bias is None else head_bias.to(device, torch.float32)
    try:
        with SequenceTaps(probe, layers, grad_scale=settings.loss_scale) as taps:
            for part in task.batches(settings.batch_size):
                ids = task.input_ids[part].to(device)
                mask = task.attention_mask[part].to(device)
                real = mask.bool()
                taps.start_batch(mask, one_sequence=facts.per_batch)
                with _autocast(device, settings.precision):
                    hidden = probe.hidden_states(ids, mask)
                states = hidden[real]  # M × D, real positions in order
                with torch.no_grad():
                    logits = F.linear(states.detach().float(), weight, bias)
                    log_probs = TOKEN_LIKELIHOOD.log_probs(logits)
                    del logits
                    predictions = Predictions(log_probs, log_probs.exp())
                    expected_row = predictions.probs @ weight  # Σ_k p_t(k) W_k
                    positions = position_ids_from_mask(mask)[real].cpu()
                    rows = ids_of[part].unsqueeze(1).expand_as(mask)[real.cpu()]
                    keys = token_draw_ids(rows, positions)
                scale = (1.0 / mc) ** 0.5
                if facts.per_batch:
                    scale = 1.0 / states.shape[0]  # token mean of the mini-batch
                scale *= settings.loss_scale  # divided out again, in float32, by the taps
                for draw in range(mc):
                    labels = TOKEN_LIKELIHOOD.sample(predictions, keys, settings.seed, draw)
                    with torch.no_grad():
                        grad_states = TOKEN_LIKELIHOOD.hidden_score_gradient(
                            predictions.probs, labels, weight, expected_row
                        ).mul_(scale)
                    torch.autograd.grad(
                        states,
                        taps.roots,
                        grad_outputs=grad_states.to(states.dtype),
                        retain_graph=draw < mc - 1,
                        allow_unused=True,
                    )
                del predictions, log_probs, expected_row
                taps.check_all_fired()
                if taps.nonfinite:
                    raise FisherError(
                        f"non-finite per-sequence gradients (NaN or inf) at layers "
                        f"{sorted(taps.nonfinite)[:5]} for sequences {ids_of[part].tolist()[:5]}"
                        + precision_hint(_autocast_dtype(settings), settings.loss_scale),
                        example_ids=ids_of[part].tolist(),
                    )
                count += 1 if facts.per_batch else int(ids.shape[0])
            sums = dict(taps.sums)
    finally:
        probe.train(was_training)
    return sums, count, layers


# Fingerprints of probes, kept while their parameters are the same tensors at the same versions
# (an in-place change bumps a tensor's version): hashing GPT-2's weights takes a second.
_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def cached_fingerprint(probe: CausalLMProbe) -> str:
    """:func:`~t2v_lightning.probe.probe_fingerprint` of the probe's model, hashed again only
    when a parameter or buffer changed (another tensor, or an in-place write)."""
    state = tuple(
        (name, tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device)
        for name, tensor in probe.model.state_dict(keep_vars=True).items()
    )
    known = _FINGERPRINTS.get(probe)
    if known is not None and known[0] == state:
        return known[1]
    fingerprint = probe_fingerprint(probe.model)
    _FINGERPRINTS[probe] = (state, fingerprint)
    return fingerprint


def embed_lm(
    probe: CausalLMProbe,
    dataset: Any,
    settings: LMSettings | None = None,
    device: torch.device | str = "cpu",
    task_name: str | None = None,
) -> TaskEmbedding:
    """The Task2Vec embedding of a language-model task (module docstring).

    Args:
        probe: from ``get_probe("lm:...")``; its weights are never modified (it is moved to
            ``device`` and left there).
        dataset: items with ``input_ids`` and ``attention_mask``.
        settings: the method's options (default: SPEC section 8's).
        device: where to run.
        task_name: recorded in the meta.
    """
    if not isinstance(probe, CausalLMProbe):
        raise ProbeError(
            f"embed_lm needs a probe from get_probe('lm:...'), got {type(probe).__name__}"
        )
    settings = LMSettings() if settings is None else settings
    device = torch.device(device)
    settings = settings.for_device(device)
    task = read_lm_task(dataset, probe.vocab_size, settings.max_samples)
    probe.model.to(device)  # first: a move gives the tensors new addresses (hashed again)
    fingerprint = cached_fingerprint(probe)
    weight, bias, loss = fit_lm_head(probe, task, settings, device)
    sums, count, layers = lm_fisher(probe, task, weight, bias, settings, device)
    hessian, offsets = filter_values(sums, count, [(layer.name, layer.module) for layer in layers])
    facts = ESTIMATOR_FACTS[settings.estimator]
    meta: dict[str, Any] = {
        "probe": f"lm:{probe.source}",
        "probe_class": type(probe.model).__name__,
        "probe_fingerprint": fingerprint,
        "head": "lm_head (untied copy, fitted)",
        "num_classes": probe.vocab_size,
        "skip_layers": 0,
        "likelihood": TokenCategorical.name,
        "dataset_size": task.dataset_size,
        "max_samples": settings.max_samples,
        "batch_size": settings.batch_size,
        "head_epochs": settings.head_epochs,
        "head_optimizer": "adamw",
        "head_lr": settings.head_lr,
        "head_eps": settings.head_eps,
        "head_weight_decay": settings.head_weight_decay,
        "head_train_loss": loss,
        "versions": {
            "t2v_lightning": __version__,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
        },
        "method": METHODS[0],
        "estimator": settings.estimator,
        "mc_samples": settings.mc_samples if facts.uses_mc_samples else None,
        "seed": settings.seed,
        "world_size": 1,
        "precision": settings.precision,
        "num_tokens": int(task.attention_mask.sum()),
        "max_length": int(task.input_ids.shape[1]),
    }
    if settings.precision == "16-mixed":
        meta["grad_scale"] = settings.loss_scale
    if facts.per_batch:
        meta["num_batches"] = count
        meta["num_samples"] = len(task)
    else:
        meta["num_samples"] = count
    if task_name is not None:
        meta["task_name"] = str(task_name)
    return TaskEmbedding(hessian, torch.ones_like(hessian), offsets, meta)
