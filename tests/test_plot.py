"""Figures render to PNG without pyplot state; the taxonomy curves match hand-computed values."""

from __future__ import annotations

import io
import itertools

import matplotlib.image
import matplotlib.pyplot as plt  # only to check that no pyplot figure is created
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import pdist as scipy_pdist
from scipy.spatial.distance import squareform

import t2v_lightning
from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.plot import (
    plot_distance_matrix,
    plot_taxonomy_agreement,
    taxonomic_distances,
    taxonomy_agreement,
)
from t2v_lightning.similarity.distance import pdist

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def render(fig: Figure, dpi: float = 50) -> np.ndarray:
    """Save as PNG in memory; check it is a non-empty, non-blank image and return its pixels."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    data = buffer.getvalue()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert pixels.ndim == 3 and pixels.std() > 0.05  # something was drawn
    return pixels


def clustered_points(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(5, 3))
    return centres[np.arange(n) % 5] + rng.normal(size=(n, 3))


def embeddings(n: int) -> list[TaskEmbedding]:
    generator = torch.Generator().manual_seed(0)
    hessians = torch.exp(torch.randn(n, 20, generator=generator))
    return [
        TaskEmbedding(
            h,
            torch.ones(20),
            {"layer": (0, 20)},
            {"probe_fingerprint": "fp", "task_name": f"task{i}"},
        )
        for i, h in enumerate(hessians)
    ]


def test_distance_matrix_from_embeddings() -> None:
    open_figures = plt.get_fignums()
    tasks = embeddings(6)
    fig = plot_distance_matrix(tasks, distance="jsd", title="six tasks")
    render(fig)
    heat = fig.axes[0]
    order = leaves_list(
        linkage(
            squareform(pdist(tasks, "jsd").numpy(), checks=False),
            method="complete",
            optimal_ordering=True,
        )
    )
    expected = pdist(tasks, "jsd").numpy()[np.ix_(order, order)]
    np.testing.assert_allclose(heat.images[0].get_array(), expected)
    names = [f"task{i}" for i in order]
    assert [t.get_text() for t in heat.get_xticklabels()] == names
    assert [t.get_text() for t in heat.get_yticklabels()] == names
    assert heat.images[0].get_cmap().name == "viridis_r"
    assert plt.get_fignums() == open_figures  # no pyplot figure was created or left open
    assert t2v_lightning.plot_distance_matrix is plot_distance_matrix


def test_distance_matrix_from_a_matrix_follows_the_clustering() -> None:
    points = clustered_points(12)
    matrix = squareform(scipy_pdist(points))
    labels = [f"p{i}" for i in range(12)]
    fig = plot_distance_matrix(torch.from_numpy(matrix), labels)
    render(fig)
    order = leaves_list(linkage(scipy_pdist(points), method="complete", optimal_ordering=True))
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), matrix[np.ix_(order, order)])
    # the five clusters come out as contiguous blocks
    clusters = [
        int(label[1:]) % 5 for label in (t.get_text() for t in fig.axes[0].get_xticklabels())
    ]
    assert sum(a != b for a, b in itertools.pairwise(clusters)) == 4


@pytest.mark.parametrize("n", [5, 250])
def test_distance_matrix_scales_from_5_to_250_tasks(n: int) -> None:
    matrix = squareform(scipy_pdist(clustered_points(n)))
    groups = [f"family {i % 5}" for i in range(n)]
    fig = plot_distance_matrix(matrix, [f"species {i}" for i in range(n)], groups=groups)
    pixels = render(fig, dpi=20 if n > 50 else 50)
    width, height = fig.get_size_inches()
    font = fig.axes[0].get_yticklabels()[0].get_fontsize()
    if n == 5:
        assert font == 10 and width < 8
    else:
        # 250 rows of 4 pt text need a taller heatmap: the figure grows, the font shrinks
        assert font == 4 and height > 15
        row_points = fig.axes[0].get_position().height * height * 72 / n
        assert row_points >= font  # one line of text per row fits
    # group colours: the name of each task is drawn in its group's colour
    colours = {t.get_color() for t in fig.axes[0].get_xticklabels()}
    assert len(colours) == 5
    assert pixels.shape[2] in (3, 4)


def test_distance_matrix_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        plot_distance_matrix(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="labels has 2 entries for 3 tasks"):
        plot_distance_matrix(np.ones((3, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="group_colors has no colour"):
        plot_distance_matrix(np.ones((3, 3)), groups=["x", "y", "y"], group_colors={"x": "red"})
    with pytest.raises(ValueError, match="non-finite"):
        plot_distance_matrix(np.full((3, 3), np.nan))


# --- taxonomy agreement ---------------------------------------------------------------------

# Four tasks: t0 and t1 share an order; t2 another order of the same class; t3 another class.
HIERARCHY = [("o1", "c1"), ("o1", "c1"), ("o2", "c1"), ("o3", "c2")]
TAXONOMIC = np.array([[0, 0, 1, 2], [0, 0, 1, 2], [1, 1, 0, 2], [2, 2, 2, 0]])
# Embedding distances: t0's nearest is t2 (a mistake), then t1, then t3.
DISTANCE = np.array(
    [
        [0.0, 0.2, 0.1, 0.3],
        [0.2, 0.0, 0.5, 0.4],
        [0.1, 0.5, 0.0, 0.6],
        [0.3, 0.4, 0.6, 0.0],
    ]
)
# Neighbours by DISTANCE and their taxonomic distances, row by row:
#   t0: t2, t1, t3 -> 1, 0, 2   running means 1, 1/2, 1
#   t1: t0, t3, t2 -> 0, 2, 1                 0, 1,   1
#   t2: t0, t1, t3 -> 1, 1, 2                 1, 1,   4/3
#   t3: t0, t1, t2 -> 2, 2, 2                 2, 2,   2
EXPECTED_EMBEDDING = [(1 + 0 + 1 + 2) / 4, (0.5 + 1 + 1 + 2) / 4, (1 + 1 + 4 / 3 + 2) / 4]
# By taxonomic distance itself: t0 0,1,2 -> 0, 1/2, 1; t1 the same; t2 and t3 as above.
EXPECTED_TAXONOMY = [(0 + 0 + 1 + 2) / 4, (0.5 + 0.5 + 1 + 2) / 4, (1 + 1 + 4 / 3 + 2) / 4]
EXPECTED_CHANCE = 2 * (0 + 1 + 2 + 1 + 2 + 2) / 12


def test_taxonomic_distances() -> None:
    np.testing.assert_array_equal(taxonomic_distances(HIERARCHY), TAXONOMIC)
    # an order name reused in another class is another order
    homonyms = [("Unknown", "Aves"), ("Unknown", "Insecta"), ("Unknown", "Aves")]
    np.testing.assert_array_equal(taxonomic_distances(homonyms), [[0, 2, 0], [2, 0, 2], [0, 2, 0]])
    # four levels, and plain strings as one level
    deep = [("o1", "c1", "p1", "k1"), ("o2", "c2", "p1", "k1"), ("o3", "c3", "p2", "k2")]
    np.testing.assert_array_equal(taxonomic_distances(deep), [[0, 2, 4], [2, 0, 4], [4, 4, 0]])
    np.testing.assert_array_equal(
        taxonomic_distances(["a", "b", "a"]), [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    )
    with pytest.raises(ValueError, match="same non-zero number"):
        taxonomic_distances([("o1", "c1"), ("o2",)])


def test_taxonomy_agreement_on_a_constructed_matrix() -> None:
    curves = taxonomy_agreement(DISTANCE, HIERARCHY)
    np.testing.assert_array_equal(curves.k, [1, 2, 3])
    np.testing.assert_allclose(curves.embedding, EXPECTED_EMBEDDING, rtol=1e-12)
    np.testing.assert_allclose(curves.taxonomy, EXPECTED_TAXONOMY, rtol=1e-12)
    np.testing.assert_allclose(curves.chance, [EXPECTED_CHANCE] * 3, rtol=1e-12)
    np.testing.assert_array_equal(curves.taxonomic_distance, TAXONOMIC)
    assert curves.levels == 2
    assert len(taxonomy_agreement(DISTANCE, HIERARCHY, max_k=2).k) == 2


def test_chance_is_the_exact_mean_over_random_neighbourhoods() -> None:
    rng = np.random.default_rng(1)
    n = 7
    hierarchy = [(f"o{rng.integers(3)}", f"c{rng.integers(2)}", "k") for _ in range(n)]
    matrix = rng.random((n, n))
    curves = taxonomy_agreement(matrix, hierarchy)
    taxonomic = taxonomic_distances(hierarchy)
    for k in (1, 3, 6):
        # average over every k-subset of the other tasks, for every task: the exact expectation
        per_task = [
            np.mean(
                [
                    taxonomic[i, list(c)].mean()
                    for c in itertools.combinations([j for j in range(n) if j != i], k)
                ]
            )
            for i in range(n)
        ]
        assert curves.chance[k - 1] == pytest.approx(np.mean(per_task), rel=1e-12)
    # the taxonomy's own curve is the best possible; all curves meet at k = n - 1
    assert np.all(curves.taxonomy <= curves.embedding + 1e-12)
    assert curves.embedding[-1] == pytest.approx(curves.chance[-1])
    assert curves.taxonomy[-1] == pytest.approx(curves.chance[-1])


def test_plot_taxonomy_agreement_returns_figure_and_numbers() -> None:
    open_figures = plt.get_fignums()
    fig, curves = plot_taxonomy_agreement(
        torch.tensor(DISTANCE), HIERARCHY, level_names=("order", "class"), title="toy"
    )
    render(fig)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), EXPECTED_EMBEDDING)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), EXPECTED_TAXONOMY)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["same order", "same class", "unrelated"]
    np.testing.assert_allclose(curves.embedding, EXPECTED_EMBEDDING)
    assert plt.get_fignums() == open_figures
    assert t2v_lightning.plot_taxonomy_agreement is plot_taxonomy_agreement


def test_taxonomy_errors() -> None:
    with pytest.raises(ValueError, match="hierarchy has 3 entries for 4 tasks"):
        taxonomy_agreement(DISTANCE, HIERARCHY[:3])
    with pytest.raises(ValueError, match="max_k"):
        taxonomy_agreement(DISTANCE, HIERARCHY, max_k=4)
    with pytest.raises(ValueError, match="level_names has 1 names for 2 levels"):
        plot_taxonomy_agreement(DISTANCE, HIERARCHY, level_names=["order"])
    with pytest.raises(TypeError, match="hierarchy"):
        taxonomy_agreement(DISTANCE, "o1")  # type: ignore[arg-type]
