"""t2v-lightning: Task2Vec task embeddings on PyTorch Lightning.

The public names below are imported lazily, so ``import t2v_lightning`` stays cheap and the
command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from t2v_lightning.version import __version__

_EXPORTS: dict[str, str] = {
    "TaskEmbedding": "t2v_lightning.embedding",
    "get_probe": "t2v_lightning.probe",
    "Task2Vec": "t2v_lightning.task2vec",
    "FisherCallback": "t2v_lightning.fisher.callback",
    "task_distance": "t2v_lightning.similarity.distance",
    "pdist": "t2v_lightning.similarity.distance",
    "cdist": "t2v_lightning.similarity.distance",
    "trivial_embedding": "t2v_lightning.similarity.selection",
    "asymmetric_distance": "t2v_lightning.similarity.selection",
    "select_expert": "t2v_lightning.similarity.selection",
    "diversity_coefficient": "t2v_lightning.similarity.diversity",
    "cross_diversity_coefficient": "t2v_lightning.similarity.diversity",
    "embed_batches": "t2v_lightning.similarity.diversity",
    "plot_distance_matrix": "t2v_lightning.plot",
    "plot_taxonomy_agreement": "t2v_lightning.plot",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from t2v_lightning.embedding import TaskEmbedding  # noqa: F401
    from t2v_lightning.probe import get_probe  # noqa: F401
    from t2v_lightning.task2vec import Task2Vec  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 't2v_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
