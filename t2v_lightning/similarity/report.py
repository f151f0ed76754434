"""Reading a distance matrix: each task's nearest other task, and the matrix as CSV.

What ``t2v distance`` and the demo report from a matrix of :func:`~t2v_lightning.pdist`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from t2v_lightning.outputs import write_atomically
from t2v_lightning.safety import csv_cell

__all__ = ["nearest_tasks", "write_csv", "write_distance_csv"]


def write_csv(
    path: str | os.PathLike[str],
    rows: Iterable[Sequence[Any]],
    overwrite: bool = False,
    what: str = "--csv",
) -> None:
    """Write ``rows`` (the header first) as CSV, creating the folder, atomically.

    Written through :func:`~t2v_lightning.outputs.write_atomically`; an existing file is
    replaced only with ``overwrite=True``. ``what`` names the destination in messages. Text
    cells pass through :func:`~t2v_lightning.safety.csv_cell`: a task name such as
    ``=HYPERLINK(...)`` (from an artifact) is written as text, never as a formula; numbers
    (also as text, such as ``"-0.05"``) are written as they are.
    """
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(name: str) -> None:
        with open(name, "w", newline="") as handle:
            writer = csv.writer(handle)
            for row in rows:
                writer.writerow([_cell(cell) for cell in row])

    write_atomically(path, write, overwrite, what=what)


def _cell(value: Any) -> Any:
    if isinstance(value, (int, float)):
        return value
    text = str(value)
    try:
        float(text)
    except ValueError:
        return csv_cell(text)
    return text  # a number, negative ones included, is not a formula


def write_distance_csv(
    path: str | os.PathLike[str], names: Sequence[str], matrix: Any, overwrite: bool = False
) -> None:
    """Write a square matrix as CSV with the task names as header row and first column.

    Written atomically (:func:`write_csv`); an existing file is replaced only with
    ``overwrite=True``.
    """
    rows = [[task, *(f"{value:.6g}" for value in row)] for task, row in zip(names, matrix.tolist())]
    write_csv(path, [["task", *names], *rows], overwrite)


def nearest_tasks(names: Sequence[str], matrix: Any) -> list[tuple[str, str, float]]:
    """For each task, its nearest other task and their distance."""
    rows: list[tuple[str, str, float]] = []
    values = matrix.tolist()
    for i, name in enumerate(names):
        others = [(values[i][j], j) for j in range(len(names)) if j != i]
        if not others:
            continue
        distance, j = min(others)
        rows.append((name, names[j], float(distance)))
    return rows
