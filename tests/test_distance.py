"""The SPEC section 4 distances against independent numpy / scipy implementations.

The references below follow the SPEC text literally, one pair at a time, in float64, with
scipy's own cosine, Pearson correlation and entropy; they share no code with the vectorised,
rescaled float32 kernels under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cosine as scipy_cosine
from scipy.stats import entropy as scipy_entropy
from scipy.stats import pearsonr

import t2v_lightning
import t2v_lightning.similarity.distance as distance_module
from t2v_lightning.embedding import IncompatibleEmbeddingsError, TaskEmbedding
from t2v_lightning.similarity.distance import (
    DISTANCES,
    EPSILON,
    cdist,
    pairwise_distances,
    pdist,
    task_distance,
)

# The float32 tiles (cosine, entropy, kl, jsd) agree with float64 to ~1e-6 relative (measured
# worst 1.1e-6 over the regimes below); ~1e-7 absolute for distances close to zero.
FLOAT32_RTOL = 1e-5
FLOAT32_ATOL = 1e-6
# The matrix-product distances and the float64 fallback.
FLOAT64_RTOL = 1e-9
FLOAT64_ATOL = 1e-12
TILED = ("cosine", "entropy", "kl", "jsd")


def reference_distance(
    name: str, ha: np.ndarray, sa: np.ndarray, hb: np.ndarray, sb: np.ndarray
) -> float:
    """SPEC section 4, literally, for one pair (float64)."""
    if name in ("cosine", "entropy"):
        total = ha + hb + EPSILON
        pa, pb = ha / total, hb / total
        if name == "cosine":
            return float(scipy_cosine(pa, pb))
        binary_entropy = scipy_entropy(np.stack([pa, 1.0 - pa]), axis=0)  # natural log
        return float(math.log(2.0) - binary_entropy.mean())
    if name == "normalized_cosine":
        return float(scipy_cosine(sa / ha, sb / hb))
    va, vb = 1.0 / ha, 1.0 / hb
    if name == "correlation":
        return float(1.0 - pearsonr(va, vb).statistic)

    def kl(v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
        return 0.5 * (v0 / v1 - 1.0 + np.log(v1) - np.log(v0))

    if name == "kl":
        return float(np.maximum(kl(va, vb), kl(vb, va)).sum())
    if name == "asymmetric_kl":
        return float(kl(va, vb).sum())
    assert name == "jsd"
    mean = 0.5 * (va + vb)
    return float((0.5 * (kl(va, mean) + kl(vb, mean))).mean())


def reference_pdist(name: str, embeddings: list[TaskEmbedding]) -> np.ndarray:
    h = [e.hessian.double().numpy() for e in embeddings]
    s = [e.scale.double().numpy() for e in embeddings]
    n = len(embeddings)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i < j or (name == "asymmetric_kl" and i != j):
                out[i, j] = reference_distance(name, h[i], s[i], h[j], s[j])
    if name != "asymmetric_kl":
        out = out + out.T
    return out


def make_embeddings(
    n: int,
    d: int = 60,
    *,
    magnitude: float = 1e-6,
    spread: float = 1.0,
    seed: int = 0,
    fingerprint: str = "probe-A",
) -> list[TaskEmbedding]:
    """Log-normal hessians ``magnitude · exp(spread · z)``, log-normal scales, two layers."""
    generator = torch.Generator().manual_seed(seed)
    hessians = magnitude * torch.exp(
        spread * torch.randn(n, d, generator=generator, dtype=torch.float64)
    )
    scales = torch.exp(0.5 * torch.randn(n, d, generator=generator, dtype=torch.float64))
    layers = {"layer1": (0, d // 3), "layer2": (d // 3, d)}
    return [
        TaskEmbedding(
            hessians[i].float(),
            scales[i].float(),
            layers,
            {"probe": "toy", "probe_fingerprint": fingerprint, "task_name": f"t{i}"},
        )
        for i in range(n)
    ]


def tolerances(name: str, float64: bool = False) -> dict[str, float]:
    if name in TILED and not float64:
        return {"rtol": FLOAT32_RTOL, "atol": FLOAT32_ATOL}
    return {"rtol": FLOAT64_RTOL, "atol": FLOAT64_ATOL}


REGIMES = {
    # typical Monte Carlo Fisher values: small, a few orders of magnitude apart
    "typical": {"magnitude": 1e-6, "spread": 1.0},
    # values at the scale of ε = 1e-8, where ε changes cosine and entropy
    "near-epsilon": {"magnitude": 1e-8, "spread": 1.5},
    # nearly identical tasks: distances close to zero
    "close": {"magnitude": 1.0, "spread": 0.01},
}


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("name", DISTANCES)
def test_pdist_matches_reference(name: str, regime: str) -> None:
    embeddings = make_embeddings(6, **REGIMES[regime], seed=hash(regime) % 1000)
    expected = reference_pdist(name, embeddings)
    actual = pdist(embeddings, distance=name)
    assert actual.dtype == torch.float64 and actual.shape == (6, 6)
    np.testing.assert_allclose(actual.numpy(), expected, **tolerances(name))


@pytest.mark.parametrize("name", DISTANCES)
def test_wide_dynamic_range_uses_float64_and_matches(name: str) -> None:
    # Entries spanning e^±40 around their mean leave float32's safe range: float64 fallback.
    embeddings = make_embeddings(5, magnitude=1e-3, spread=12.0, seed=3)
    expected = reference_pdist(name, embeddings)
    np.testing.assert_allclose(
        pdist(embeddings, name).numpy(), expected, **tolerances(name, float64=True)
    )


@pytest.mark.parametrize("name", DISTANCES)
def test_cdist_and_task_distance_match_reference(name: str) -> None:
    first = make_embeddings(3, seed=1)
    second = make_embeddings(4, seed=2)
    matrix = cdist(first, second, distance=name)
    assert matrix.shape == (3, 4)
    for i, a in enumerate(first):
        for j, b in enumerate(second):
            expected = reference_distance(
                name,
                a.hessian.double().numpy(),
                a.scale.double().numpy(),
                b.hessian.double().numpy(),
                b.scale.double().numpy(),
            )
            np.testing.assert_allclose(float(matrix[i, j]), expected, **tolerances(name))
            np.testing.assert_allclose(task_distance(a, b, name), expected, **tolerances(name))


@pytest.mark.parametrize("name", DISTANCES)
def test_pdist_structure(name: str) -> None:
    embeddings = make_embeddings(7, seed=4)
    matrix = pdist(embeddings, name)
    assert torch.all(matrix.diagonal() == 0)
    assert torch.all(matrix >= 0)
    if name == "asymmetric_kl":
        assert not torch.allclose(matrix, matrix.T)  # the full matrix, both directions
        # row i holds KL(e_i ‖ e_j): the direction of cdist(from=e_i, to=e_j)
        np.testing.assert_allclose(
            matrix[2, 5].item(), task_distance(embeddings[2], embeddings[5], name), rtol=1e-9
        )
    else:
        assert torch.equal(matrix, matrix.T)


@pytest.mark.parametrize("name", DISTANCES)
def test_identical_embeddings(name: str) -> None:
    a = make_embeddings(1, seed=5)[0]
    h, s = a.hessian.double().numpy(), a.scale.double().numpy()
    if name == "entropy":
        # ε keeps h/(h + h + ε) below ½: not zero for Fisher values near ε (here ~1e-6)
        expected = reference_distance(name, h, s, h, s)
        assert expected > 1e-6
    else:
        expected = 0.0
    assert task_distance(a, a, name) == pytest.approx(expected, rel=FLOAT32_RTOL, abs=FLOAT32_ATOL)


def test_top_level_exports() -> None:
    assert t2v_lightning.pdist is pdist
    assert t2v_lightning.cdist is cdist
    assert t2v_lightning.task_distance is task_distance


@pytest.mark.parametrize("name", TILED)
def test_tiles_and_thread_pool_give_the_same_matrix(name: str, monkeypatch) -> None:
    embeddings = make_embeddings(9, d=50, seed=6)
    expected = pdist(embeddings, name)
    threads = torch.get_num_threads()
    # Three columns per tile and the thread pool even for this small input.
    monkeypatch.setattr(distance_module, "_TILE_ENTRIES", 150)
    monkeypatch.setattr(distance_module, "_PARALLEL_MIN_ENTRIES", 0)
    monkeypatch.setattr(distance_module, "_pool_size", lambda: 3)
    try:
        tiled = pdist(embeddings, name)
        assert torch.get_num_threads() == threads  # the intra-op setting is restored
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    np.testing.assert_allclose(tiled.numpy(), expected.numpy(), rtol=1e-6, atol=1e-9)
    cross = cdist(embeddings[:4], embeddings, name)
    np.testing.assert_allclose(cross[:, 4:].numpy(), expected[:4, 4:].numpy(), **tolerances(name))


def test_pairwise_distances_on_tensors() -> None:
    embeddings = make_embeddings(4, seed=7)
    hessians = torch.stack([e.hessian for e in embeddings])
    scales = torch.stack([e.scale for e in embeddings])
    np.testing.assert_allclose(
        pairwise_distances(hessians, scales, distance="kl").numpy(),
        pdist(embeddings, "kl").numpy(),
        rtol=1e-12,
    )
    cross = pairwise_distances(hessians[:2], scales[:2], hessians, scales, distance="jsd")
    np.testing.assert_allclose(
        cross.numpy(), cdist(embeddings[:2], embeddings, "jsd").numpy(), rtol=1e-12
    )
    with pytest.raises(ValueError, match="other_scales"):
        pairwise_distances(hessians, scales, hessians)
    bad = hessians.clone()
    bad[1, 0] = 0.0
    with pytest.raises(ValueError, match=r"hessians row 1.*cosine or entropy"):
        pairwise_distances(bad, scales, distance="kl")
    bad[1, 0] = -1.0
    with pytest.raises(ValueError, match="hessians row 1 has 1 negative"):
        pairwise_distances(bad, scales)


@pytest.mark.parametrize("name", ["cosine", "entropy"])
def test_zero_fisher_values_are_accepted_where_the_distance_is_defined(name: str) -> None:
    """Dead ReLU channels give filters whose Fisher is exactly zero."""
    a, b = make_embeddings(2, seed=3)
    a.hessian[:5] = 0.0
    b.hessian[3:8] = 0.0
    ha, hb = a.hessian.double().numpy(), b.hessian.double().numpy()
    pa, pb = ha / (ha + hb + 1e-8), hb / (ha + hb + 1e-8)
    if name == "cosine":
        expected = scipy_cosine(pa, pb)
    else:
        entropy = np.array([scipy_entropy([p, 1 - p]) for p in pa])
        expected = np.log(2) - entropy.mean()
    np.testing.assert_allclose(task_distance(a, b, name), expected, rtol=1e-5, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(min_value=1e-9, max_value=1e3), min_size=6, max_size=6),
    st.lists(st.floats(min_value=1e-9, max_value=1e3), min_size=6, max_size=6),
    st.sampled_from([d for d in DISTANCES if d != "asymmetric_kl"]),
)
def test_symmetric_distances_are_symmetric_and_non_negative(
    xs: list[float], ys: list[float], name: str
) -> None:
    a = TaskEmbedding(torch.tensor(xs), torch.ones(6))
    b = TaskEmbedding(torch.tensor(ys), torch.ones(6))
    if name == "correlation" and (
        np.ptp(1 / np.float32(xs)) == 0 or np.ptp(1 / np.float32(ys)) == 0
    ):
        return  # undefined for a constant vector (tested below)
    forward = task_distance(a, b, name, assume_comparable=True)  # no probe recorded
    backward = task_distance(b, a, name, assume_comparable=True)
    assert forward >= 0.0
    if name == "entropy":
        # Symmetric up to the ε that h'_a = h_a / (h_a + h_b + ε) leaves on b's side (SPEC 4):
        # swapping a and b moves it, which changes the mean entropy by exactly this much.
        ha, hb = np.float64(np.float32(xs)), np.float64(np.float32(ys))
        total = ha + hb + EPSILON

        def shift(h: np.ndarray) -> np.ndarray:
            return (h + EPSILON) * np.log(h + EPSILON) - h * np.log(h)

        epsilon_term = abs(float(np.mean((shift(hb) - shift(ha)) / total)))
        assert abs(forward - backward) <= epsilon_term + 1e-5 * abs(backward) + 1e-6
        return
    assert forward == pytest.approx(backward, rel=1e-5, abs=1e-6)


# --- errors ---------------------------------------------------------------------------------


def test_different_probes_cannot_be_compared() -> None:
    a = make_embeddings(2, fingerprint="probe-A")
    b = make_embeddings(1, fingerprint="probe-B")
    with pytest.raises(IncompatibleEmbeddingsError, match=r"embeddings\[0\].*embeddings\[2\]"):
        pdist(a + b)
    with pytest.raises(IncompatibleEmbeddingsError, match=r"'t0'.*'t0'.*probe weights"):
        task_distance(a[0], b[0])
    with pytest.raises(IncompatibleEmbeddingsError, match=r"from_embeddings.*to_embeddings"):
        cdist(a, b)


def test_different_layouts_cannot_be_compared() -> None:
    a = make_embeddings(1, d=60)[0]
    b = make_embeddings(1, d=30)[0]
    with pytest.raises(IncompatibleEmbeddingsError, match="layer layouts"):
        task_distance(a, b)
    renamed = TaskEmbedding(a.hessian, a.scale, {"layer1": (0, 20), "layer3": (20, 60)}, a.meta)
    with pytest.raises(IncompatibleEmbeddingsError, match="layer3"):
        task_distance(a, renamed)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_hessians_raise_naming_the_embedding(value: float) -> None:
    embeddings = make_embeddings(3)
    bad = embeddings[1].hessian.clone()
    bad[45] = value
    embeddings[1] = TaskEmbedding(
        bad, embeddings[1].scale, embeddings[1].layers, embeddings[1].meta
    )
    # zeros are valid for cosine (the default) and entropy; the other distances divide by h
    with pytest.raises(ValueError, match=r"embeddings\[1\] \('t1'\).*index 45 \(layer 'layer2'\)"):
        pdist(embeddings, "cosine" if value != 0.0 else "kl")
    with pytest.raises(ValueError, match=r"b \('t1'\)"):
        task_distance(embeddings[0], embeddings[1], "kl")


def test_invalid_scale_raises_for_normalized_cosine_only() -> None:
    a, b = make_embeddings(2)
    zero_scale = TaskEmbedding(b.hessian, torch.zeros_like(b.scale), b.layers, b.meta)
    assert task_distance(a, zero_scale, "cosine") >= 0.0
    with pytest.raises(ValueError, match="scale"):
        task_distance(a, zero_scale, "normalized_cosine")


def test_correlation_of_a_constant_embedding_raises() -> None:
    a = make_embeddings(1)[0]
    flat = TaskEmbedding(torch.full_like(a.hessian, 2.0), a.scale, a.layers, a.meta)
    with pytest.raises(ValueError, match="correlation distance is undefined"):
        task_distance(a, flat, "correlation")


def test_argument_errors() -> None:
    embeddings = make_embeddings(2)
    with pytest.raises(ValueError, match="distance must be one of"):
        pdist(embeddings, distance="euclidean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embeddings is empty"):
        pdist([])
    with pytest.raises(TypeError, match="single TaskEmbedding"):
        pdist(embeddings[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"embeddings\[1\] must be a TaskEmbedding"):
        pdist([embeddings[0], torch.ones(60)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="b must be a TaskEmbedding"):
        task_distance(embeddings[0], None)  # type: ignore[arg-type]


def test_embeddings_of_different_scales_warn_once_per_call() -> None:
    """per_sample (F) against batch (F / B) or variational: comparable, with one warning that
    names both scales; per_sample against exact (both F): no warning."""
    import warnings

    from t2v_lightning.embedding import EmbeddingScaleWarning

    items = make_embeddings(4)
    for item, meta in zip(
        items,
        (
            {"method": "montecarlo", "estimator": "per_sample"},
            {"method": "montecarlo", "estimator": "batch", "batch_size": 100},
            {"method": "montecarlo", "estimator": "batch", "batch_size": 100},
            {"method": "montecarlo", "estimator": "exact"},
        ),
    ):
        item.meta.update(meta)
    with pytest.warns(
        EmbeddingScaleWarning, match=r"F \(per-example estimator\) and F / 100"
    ) as caught:
        matrix = pdist(items, "cosine")
    assert len([w for w in caught if issubclass(w.category, EmbeddingScaleWarning)]) == 1
    assert matrix.shape == (4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingScaleWarning)
        task_distance(items[0], items[3], "cosine")
        task_distance(items[1], items[2], "cosine")
        task_distance(items[0], make_embeddings(1)[0], "cosine")  # no estimator recorded
    items[3].meta["method"] = "variational"
    with pytest.warns(EmbeddingScaleWarning, match="variational"):
        task_distance(items[0], items[3], "normalized_cosine")
