"""The figures people look at (SPEC section 5): a clustered distance matrix and the agreement of
embedding distances with a known taxonomy.

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot state, nothing is
shown, nothing is left open) and returns it; save it with ``fig.savefig(path)`` or let a
notebook display it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.safety import is_int, plot_label
from t2v_lightning.similarity.distance import Distance, pdist

__all__ = [
    "TaxonomyAgreement",
    "plot_distance_matrix",
    "plot_taxonomy_agreement",
    "taxonomic_distances",
    "taxonomy_agreement",
]

_Matrix = np.ndarray | torch.Tensor


def _as_square_matrix(matrix: Any, argument: str) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().to(torch.float64).numpy()
    array = np.asarray(matrix, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"{argument} must be a square matrix, got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"{argument} must cover at least 2 tasks, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{argument} has non-finite entries")
    return array


# --------------------------------------------------------------------------------------------
# Clustered distance matrix
# --------------------------------------------------------------------------------------------


def _font_size(n: int) -> float:
    # 10 pt up to 30 tasks, then shrinking so that the rows stay legible down to 4 pt.
    return float(np.clip(300.0 / n, 4.0, 10.0))


def _default_group_colors(groups: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    unique = list(dict.fromkeys(groups))
    palette = colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {g: palette(i % palette.N) for i, g in enumerate(unique)}


def plot_distance_matrix(
    embeddings_or_matrix: Sequence[TaskEmbedding] | _Matrix,
    labels: Sequence[str] | None = None,
    distance: Distance = "cosine",
    groups: Sequence[str] | None = None,
    group_colors: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Figure:
    """A distance matrix ordered by hierarchical clustering, with its dendrograms.

    The tasks are clustered by complete linkage with optimal leaf ordering (SciPy) on the
    matrix (symmetrised as ``(D + Dᵀ) / 2`` when it is not symmetric); rows and columns are
    shown in leaf order with the reversed viridis colour map (yellow: close, purple: far;
    the colour range spans the off-diagonal entries), the dendrogram on the left and on top,
    task names on both axes (bottom and right). Font and figure size scale with the number
    of tasks, legibly from 5 to 250.

    Args:
        embeddings_or_matrix: task embeddings (their :func:`~t2v_lightning.pdist` is plotted)
            or a square distance matrix (numpy array or tensor).
        labels: one name per task; by default the embeddings' task names, else their indices.
        distance: the distance computed between embeddings (ignored for a matrix).
        groups: optional group of each task (e.g. its taxonomic class): coloured strips along
            both axes, coloured names and a legend.
        group_colors: colour of each group (default: the ``tab10`` / ``tab20`` palettes).
        title: optional figure title.

    Returns:
        The figure (the heatmap is its first axes' image).
    """
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    if isinstance(embeddings_or_matrix, (np.ndarray, torch.Tensor)):
        matrix = _as_square_matrix(embeddings_or_matrix, "embeddings_or_matrix")
        default_labels = [str(i) for i in range(matrix.shape[0])]
        colorbar_label = "distance"
    else:
        embeddings = list(embeddings_or_matrix)
        matrix = _as_square_matrix(pdist(embeddings, distance), "embeddings_or_matrix")
        default_labels = [e.name or str(i) for i, e in enumerate(embeddings)]
        colorbar_label = f"{distance} distance"
    n = matrix.shape[0]
    # names come from artifacts: shown as written ('$' is not mathtext, escapes are visible)
    names = [plot_label(label) for label in (labels if labels is not None else default_labels)]
    if len(names) != n:
        raise ValueError(f"labels has {len(names)} entries for {n} tasks")
    if groups is not None:
        groups = [str(g) for g in groups]
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for {n} tasks")
        colors = dict(group_colors) if group_colors is not None else _default_group_colors(groups)
        missing = sorted(set(groups) - set(colors))
        if missing:
            raise ValueError(f"group_colors has no colour for groups {missing}")

    symmetric = (matrix + matrix.T) / 2.0
    np.fill_diagonal(symmetric, 0.0)
    tree = linkage(squareform(symmetric, checks=False), method="complete", optimal_ordering=True)
    leaves = dendrogram(tree, no_plot=True)["leaves"]
    ordered = matrix[np.ix_(leaves, leaves)]

    # Layout in inches, converted to figure fractions.
    font = _font_size(n)
    side = max(4.5, n * font * 1.15 / 72.0)
    dendro = float(np.clip(0.15 * side, 0.8, 2.5))
    strip = 0.15 if groups is not None else 0.0
    gap = 0.05
    label_space = max(len(s) for s in names) * font * 0.62 / 72.0 + 0.15
    top_margin = 0.45 if title else 0.15
    width = 0.1 + dendro + gap + strip + (gap if strip else 0) + side + label_space + 0.1
    height = top_margin + dendro + gap + strip + (gap if strip else 0) + side + label_space + 0.1
    fig = Figure(figsize=(width, height))

    def axes(left: float, bottom: float, w: float, h: float) -> Any:
        return fig.add_axes((left / width, bottom / height, w / width, h / height))

    heat_left = 0.1 + dendro + gap + strip + (gap if strip else 0)
    heat_bottom = label_space + 0.1
    heat = axes(heat_left, heat_bottom, side, side)
    off_diagonal = matrix[~np.eye(n, dtype=bool)]
    image = heat.imshow(
        ordered,
        cmap="viridis_r",
        aspect="auto",
        interpolation="nearest",
        vmin=float(off_diagonal.min()),
        vmax=float(off_diagonal.max()),
    )
    ordered_names = [names[i] for i in leaves]
    # Tick parameters first: applied to ticks as they are created rather than to each of
    # hundreds of ticks afterwards.
    heat.yaxis.tick_right()
    heat.tick_params(length=2, pad=1, labelsize=font)
    heat.tick_params(axis="x", labelrotation=90)
    heat.set_xticks(range(n), ordered_names)
    heat.set_yticks(range(n), ordered_names)

    left_tree = axes(0.1, heat_bottom, dendro, side)
    top_tree = axes(
        heat_left, heat_bottom + side + gap + strip + (gap if strip else 0), side, dendro
    )
    for ax, orientation in ((left_tree, "left"), (top_tree, "top")):
        dendrogram(
            tree, ax=ax, orientation=orientation, no_labels=True, link_color_func=lambda _: "0.25"
        )
        ax.set_axis_off()
    left_tree.set_ylim(10 * n, 0)  # leaf k sits at 10 k + 5; row 0 of the heatmap is on top
    top_tree.set_xlim(0, 10 * n)

    if groups is not None:
        rgba = np.array([colors[groups[i]] for i in leaves], dtype=object)
        from matplotlib.colors import to_rgba

        rgba = np.array([to_rgba(c) for c in rgba])
        row_strip = axes(0.1 + dendro + gap, heat_bottom, strip, side)
        row_strip.imshow(rgba[:, None, :], aspect="auto", interpolation="nearest")
        col_strip = axes(heat_left, heat_bottom + side + gap, side, strip)
        col_strip.imshow(rgba[None, :, :], aspect="auto", interpolation="nearest")
        for ax in (row_strip, col_strip):
            ax.set_axis_off()
        for ticks in (heat.get_xticklabels(), heat.get_yticklabels()):
            for tick, leaf in zip(ticks, leaves, strict=True):
                tick.set_color(colors[groups[leaf]])
        handles = [Patch(color=colors[g], label=plot_label(g)) for g in dict.fromkeys(groups)]
        fig.legend(
            handles=handles,
            loc="upper right",
            fontsize=max(font, 6.0),
            frameon=False,
            bbox_to_anchor=(1.0 - 0.05 / width, 1.0 - top_margin / height),
        )

    corner_bottom = heat_bottom + side + gap + strip + (gap if strip else 0)
    cbar_ax = axes(
        0.1 + 0.1 * dendro, corner_bottom + 0.45 * dendro, 0.8 * dendro, min(0.12, 0.15 * dendro)
    )
    colorbar = fig.colorbar(image, cax=cbar_ax, orientation="horizontal")
    colorbar.ax.tick_params(labelsize=max(font, 6.0) * 0.8, length=2)
    colorbar.ax.set_title(colorbar_label, fontsize=max(font, 6.0) * 0.9)
    if title:
        fig.suptitle(title, fontsize=max(font, 8.0) * 1.2, y=1.0 - 0.08 / height, va="top")
    return fig


# --------------------------------------------------------------------------------------------
# Agreement with a taxonomy (paper Fig. 3)
# --------------------------------------------------------------------------------------------


def _paths(hierarchy: Sequence[Sequence[Hashable] | str], n: int | None) -> list[tuple]:
    if isinstance(hierarchy, (str, bytes)) or not isinstance(hierarchy, Sequence):
        raise TypeError("hierarchy must be a sequence with one list of ancestors per task")
    paths = [(entry,) if isinstance(entry, str) else tuple(entry) for entry in hierarchy]
    if n is not None and len(paths) != n:
        raise ValueError(f"hierarchy has {len(paths)} entries for {n} tasks")
    depths = {len(p) for p in paths}
    if len(depths) != 1 or 0 in depths:
        raise ValueError(
            f"every task needs the same non-zero number of ancestor levels; got depths "
            f"{sorted(depths)}"
        )
    return paths


def taxonomic_distances(hierarchy: Sequence[Sequence[Hashable] | str]) -> np.ndarray:
    """The taxonomic distance between tasks, from each task's list of ancestors.

    With ``hierarchy[i] = (a_0, a_1, ..., a_{L-1})`` (e.g. order, class, phylum, kingdom), the
    distance between tasks ``i`` and ``j`` is the first level ``ℓ`` at which they share their
    ancestor (0: same order, 1: same class, ...), and ``L`` when they share none. An ancestor
    is identified by its whole path upwards, ``(a_ℓ, ..., a_{L-1})``, so two orders that share
    a name in different classes are different orders.

    Args:
        hierarchy: one sequence of ``L`` ancestor labels per task, from nearest to farthest
            (a plain string counts as one level).

    Returns:
        The ``(n, n)`` integer matrix, with a zero diagonal.
    """
    paths = _paths(hierarchy, None)
    depth = len(paths[0])
    distances = np.full((len(paths), len(paths)), depth, dtype=np.int64)
    for level in reversed(range(depth)):
        codes: dict[tuple, int] = {}
        ids = np.array([codes.setdefault(p[level:], len(codes)) for p in paths])
        distances[ids[:, None] == ids[None, :]] = level
    np.fill_diagonal(distances, 0)
    return distances


@dataclass(frozen=True)
class TaxonomyAgreement:
    """Top-k curves of the taxonomy agreement (paper Fig. 3).

    Attributes:
        k: neighbourhood sizes ``1 … max_k``.
        embedding: for each ``k``, the taxonomic distance from a task to its ``k`` nearest
            tasks by embedding distance, averaged over those ``k`` and over all tasks.
        taxonomy: the same curve with the neighbours chosen by taxonomic distance itself (the
            best any embedding can do).
        chance: the expected value of the curve for neighbours drawn at random (it does not
            depend on ``k``): the mean taxonomic distance over all pairs of different tasks.
        taxonomic_distance: the ``(n, n)`` taxonomic distance matrix.
        levels: the number of ancestor levels ``L`` (the largest taxonomic distance).
    """

    k: np.ndarray
    embedding: np.ndarray
    taxonomy: np.ndarray
    chance: np.ndarray
    taxonomic_distance: np.ndarray
    levels: int


def _top_k_curve(ranking: np.ndarray, taxonomic: np.ndarray, max_k: int) -> np.ndarray:
    n = ranking.shape[0]
    ranking = ranking.astype(np.float64, copy=True)
    np.fill_diagonal(ranking, np.inf)  # a task is not its own neighbour
    order = np.argsort(ranking, axis=1, kind="stable")[:, :max_k]
    nearest = np.take_along_axis(taxonomic, order, axis=1).astype(np.float64)
    running_mean = np.cumsum(nearest, axis=1) / np.arange(1, max_k + 1)
    return running_mean.mean(axis=0) if n else running_mean


def taxonomy_agreement(
    distance_matrix: _Matrix,
    hierarchy: Sequence[Sequence[Hashable] | str],
    max_k: int | None = None,
) -> TaxonomyAgreement:
    r"""How well nearest tasks by embedding distance agree with a known taxonomy (SPEC 5).

    For task :math:`i` let :math:`N_k(i)` be its :math:`k` nearest other tasks by
    ``distance_matrix[i]`` (ties broken by index) and :math:`T` the taxonomic distance
    (:func:`taxonomic_distances`). The curve is

    .. math::

        c(k) = \frac{1}{n} \sum_i \frac{1}{k} \sum_{j \in N_k(i)} T_{ij},

    computed also with :math:`N_k` taken from :math:`T` itself (the oracle) and, exactly, for
    random neighbours: :math:`\frac{1}{n} \sum_i \frac{1}{n-1} \sum_{j \neq i} T_{ij}`.

    Args:
        distance_matrix: ``(n, n)`` distances between the tasks' embeddings (row ``i``: from
            task ``i``).
        hierarchy: each task's ancestors, nearest first (see :func:`taxonomic_distances`).
        max_k: largest neighbourhood (default and maximum ``n - 1``).

    Returns:
        A :class:`TaxonomyAgreement`.
    """
    matrix = _as_square_matrix(distance_matrix, "distance_matrix")
    n = matrix.shape[0]
    paths = _paths(hierarchy, n)
    if max_k is None:
        max_k = n - 1
    if not is_int(max_k) or not 1 <= max_k <= n - 1:
        raise ValueError(f"max_k must be an integer in [1, {n - 1}], got {max_k!r}")
    taxonomic = taxonomic_distances(paths)
    chance_value = taxonomic.sum() / (n * (n - 1))
    return TaxonomyAgreement(
        k=np.arange(1, max_k + 1),
        embedding=_top_k_curve(matrix, taxonomic, max_k),
        taxonomy=_top_k_curve(taxonomic, taxonomic, max_k),
        chance=np.full(max_k, chance_value),
        taxonomic_distance=taxonomic,
        levels=len(paths[0]),
    )


def plot_taxonomy_agreement(
    distance_matrix: _Matrix,
    hierarchy: Sequence[Sequence[Hashable] | str],
    max_k: int | None = None,
    level_names: Sequence[str] | None = None,
    label: str = "Task2Vec",
    title: str | None = None,
) -> tuple[Figure, TaxonomyAgreement]:
    """Plot :func:`taxonomy_agreement`: mean taxonomic distance of the k nearest tasks vs k.

    Three curves: the embedding's, the taxonomy's own (the best achievable) and chance. Lower
    is better; a good embedding follows the taxonomy curve at small ``k``.

    Args:
        distance_matrix: ``(n, n)`` distances between the tasks' embeddings.
        hierarchy: each task's ancestors, nearest first, e.g. ``("Passeriformes", "Aves",
            "Chordata", "Animalia")``.
        max_k: largest neighbourhood (default ``n - 1``).
        level_names: names of the levels (e.g. ``("order", "class", "phylum", "kingdom")``)
            for the y-axis ticks.
        label: legend entry of the embedding curve.
        title: optional axes title.

    Returns:
        ``(figure, curves)``.
    """
    curves = taxonomy_agreement(distance_matrix, hierarchy, max_k)
    if level_names is not None:
        level_names = [str(name) for name in level_names]
        if len(level_names) != curves.levels:
            raise ValueError(f"level_names has {len(level_names)} names for {curves.levels} levels")
    fig = Figure(figsize=(6.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(curves.k, curves.embedding, marker="o", markersize=3, label=label)
    ax.plot(curves.k, curves.taxonomy, linestyle="--", color="0.2", label="taxonomic distance")
    ax.plot(curves.k, curves.chance, linestyle=":", color="0.5", label="chance")
    if len(curves.k) > 1:
        ax.set_xscale("log")
    ax.set_xlim(curves.k[0], curves.k[-1])
    ax.set_ylim(-0.05 * curves.levels, curves.levels * 1.05)
    ax.set_xlabel("size k of the neighbourhood")
    ax.set_ylabel("mean taxonomic distance of the k nearest tasks")
    if level_names is not None:
        ticks = list(range(curves.levels + 1))
        ax.set_yticks(ticks, [f"same {name}" for name in level_names] + ["unrelated"])
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return fig, curves
