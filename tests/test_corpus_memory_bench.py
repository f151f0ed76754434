"""``bench/corpus_memory.py`` runs end to end on a tiny corpus and reports every case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_bench import _run

pytestmark = pytest.mark.slow


def test_corpus_memory_reports_both_sizes_both_modes_and_cleans_up(tmp_path: Path) -> None:
    folder, out = tmp_path / "work", tmp_path / "memory.json"
    _run(
        "corpus_memory.py",
        "--size_gb",
        "0.0004",
        "--folder",
        str(folder),
        "--num_tasks",
        "2",
        "--task_size",
        "20",
        "--max_length",
        "16",
        "--out",
        str(out),
    )
    report = json.loads(out.read_text())
    cases = report["cases"]
    assert [c["streaming"] for c in cases] == [True, False, True, False]
    small, large = cases[0]["documents"], cases[2]["documents"]
    assert 3 * small < large and cases[1]["documents"] == small
    for case in cases:
        assert case["tasks"] == 2 and case["documents_read"] == 40
        assert case["peak_rss_mb"] >= case["rss_after_imports_mb"] > 0
        assert case["peak_anonymous_mb"] > 0
    assert not folder.exists()
