"""What the artifact of :class:`~t2v_lightning.fisher.callback.FisherCallback` records.

The Fisher values of the reduced sums with the facts of the measurement: the estimator and its
settings, the Trainer's world size and precision, the probe and head fingerprints of a
``"fit_end"`` pass, and the number of examples (or batches) summed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from t2v_lightning.choices import ESTIMATOR_FACTS, Estimator, Likelihood
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.fisher.estimators import filter_values
from t2v_lightning.probe import probe_fingerprint

__all__ = ["fisher_embedding"]


def fisher_embedding(
    trainer: pl.Trainer,
    network: nn.Module,
    sums: dict[str, torch.Tensor],
    total: int,
    layers: Sequence[tuple[str, nn.Module]],
    meta: Mapping[str, Any],
    extra: Mapping[str, Any],
    *,
    estimator: Estimator,
    mc_samples: int,
    likelihood: Likelihood,
    seed: int,
    at: str,
    head: str | None,
    exclude: Sequence[str],
) -> TaskEmbedding:
    """The embedding of the reduced ``sums`` over ``total`` examples, with its facts.

    Args:
        trainer: the Trainer of the measurement (world size, precision; rank 0 warns).
        network: the embedded network.
        sums: per layer, the float64 sums of squared gradient rows over all ranks.
        total: the examples (batches for ``estimator="batch"``) summed over all ranks.
        layers: the embedded layers, in order.
        meta: the user's facts, overridden by the measurement's own.
        extra: facts of this pass (the checkpoint the weights came from), recorded last.
        estimator: the estimator.
        mc_samples: labels drawn per example (recorded where the estimator draws them).
        likelihood: the likelihood.
        seed: the seed of the label sampling.
        at: when the callback measured (``"fit_end"`` or ``"train_batch"``).
        head: the head's qualified name, or ``None``.
        exclude: the layers left out.
    """
    hessian, offsets = filter_values(sums, total, layers)
    record = dict(meta)
    if at == "fit_end":
        record.setdefault("probe_class", type(network).__name__)
        record.setdefault("probe_fingerprint", probe_fingerprint(network, exclude=head))
        record.setdefault("head", head)
        record["method"] = "montecarlo"
    record.update(
        estimator=estimator,
        mc_samples=mc_samples if ESTIMATOR_FACTS[estimator].uses_mc_samples else None,
        likelihood=likelihood,
        seed=seed,
        world_size=int(trainer.world_size),
        precision=str(trainer.precision),
        fisher_at=at,
    )
    if head is not None:
        record["head_fingerprint"] = probe_fingerprint(network.get_submodule(head))
    if ESTIMATOR_FACTS[estimator].per_batch:
        record["num_batches"] = total
    else:
        record["num_samples"] = total
    record.update(extra)
    if exclude:
        record["exclude"] = list(exclude)
    embedding = TaskEmbedding(hessian, torch.ones_like(hessian), offsets, record)
    if trainer.is_global_zero and not bool(hessian.any()):
        rank_zero_warn(
            "FisherCallback: every value of the embedding is zero (does the model's output "
            "depend on the embedded layers? a one-output model under likelihood='categorical' "
            "has no Fisher)"
        )
    return embedding
