"""Same seed, same bytes: each configuration of :mod:`tests.reference_artifacts` against its record.

On the platform the references were recorded on (torch version, CPU kernels) the artifact must
be byte-identical (sha256 of the file, versions pinned). Elsewhere float sums may round
differently, so the values are compared with :data:`OTHER_PLATFORM_RTOL` and everything else
(layers, meta) exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from t2v_lightning.embedding import TaskEmbedding
from tests.reference_artifacts import (
    CONFIGS,
    FOLDER,
    NEEDS,
    load_record,
    platform_facts,
    write_artifact,
)

OTHER_PLATFORM_RTOL = 1e-4  # float32 sums in another order (other CPU kernels or torch build)


def _missing(name: str) -> list[str]:
    return [package for package in NEEDS.get(name, ()) if importlib.util.find_spec(package) is None]


def test_every_configuration_has_a_record() -> None:
    record = load_record()
    assert set(record["sha256"]) == set(CONFIGS)
    for name, digest in record["sha256"].items():
        stored = FOLDER / f"{name}.safetensors"
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_gives_the_recorded_artifact(name: str, tmp_path: Path) -> None:
    missing = _missing(name)
    if missing:
        pytest.skip(f"needs {missing}")
    record = load_record()
    digest = write_artifact(name, tmp_path / "artifact.safetensors")
    if digest == record["sha256"][name]:
        return
    got = TaskEmbedding.load(tmp_path / "artifact.safetensors")
    want = TaskEmbedding.load(FOLDER / f"{name}.safetensors")
    assert got.layers == want.layers
    assert got.meta == want.meta
    difference = float(
        ((got.hessian.double() - want.hessian.double()).abs() / want.hessian.double().abs()).max()
    )
    assert platform_facts() != record["platform"], (
        f"{name}: the artifact differs from the recorded one on the platform it was recorded on "
        f"(largest relative difference of the hessian {difference:.3g})"
    )
    torch.testing.assert_close(got.hessian, want.hessian, rtol=OTHER_PLATFORM_RTOL, atol=0)
    torch.testing.assert_close(got.scale, want.scale, rtol=OTHER_PLATFORM_RTOL, atol=0)
