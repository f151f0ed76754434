"""The benchmark scripts run end to end on tiny settings and report what the README quotes.

They are measurement tools, not tests of speed: these runs only check that each script still
works against the current library and writes the figures (ratios, noise curves) it promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The benchmark scripts, even on tiny settings, take a minute: `make test-all` runs them.
pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_fisher_cost_prints_ratios_and_paired_ratios(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    text = _run(
        "fisher_cost.py",
        "--examples",
        "20",
        "--batch",
        "10",
        "--size",
        "32",
        "--threads",
        "1",
        "--rounds",
        "1",
        "--repeats",
        "1",
        "--paired-rounds",
        "2",
        "--measure",
        "plain",
        "per_sample",
        "batch",
        "--json",
        str(out),
    )
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"plain", "per_sample", "batch"}
    for name in ("per_sample", "batch"):
        ratio = report["paired"]["ratios"][name]
        low, high = report["paired"]["spread"][name]
        assert 0 < low <= ratio <= high
        assert name in text
    assert "paired: median over 2 rounds" in text


def test_noise_per_second_compares_both_scales(tmp_path: Path) -> None:
    out = tmp_path / "noise.json"
    figure = tmp_path / "noise.png"
    text = _run(
        "noise_per_second.py",
        "--max-per-sample",
        "200",
        "--max-batch",
        "200",
        "--batch",
        "100",
        "--threads",
        "1",
        "--json",
        str(out),
        "--figure",
        str(figure),
    )
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"batch", "batch_over_B", "per_sample", "per_sample_over_B"}
    assert [r["examples"] for r in report["results"]["per_sample"]] == [100, 200]
    for rows in report["results"].values():
        assert all(0 <= r["noise"] <= 2 and r["seconds"] > 0 for r in rows)
    # Same embeddings, two scales: the noise differs only through the cosine distance's epsilon.
    stored = [r["noise"] for r in report["results"]["batch_over_B"]]
    scaled = [r["noise"] for r in report["results"]["batch"]]
    assert stored != scaled and stored == pytest.approx(scaled, rel=0.5)
    assert len(report["matches"]) == 3
    assert figure.stat().st_size > 10_000
    assert "batch x B at 200 examples" in text


def test_depthwise_forms_agree_and_are_timed() -> None:
    pytest.importorskip("timm")
    text = _run(
        "depthwise_forms.py", "--batch", "2", "--size", "64", "--repeats", "1", "--threads", "1"
    )
    for form in ("grouped convolution", "per-offset sum", "patches"):
        assert form in text
    error = float(text.rsplit("patch form: ", 1)[1].split()[0])
    assert error < 1e-5


def test_step_cost_reports_both_steps_and_the_ratio() -> None:
    text = _run(
        "step_cost.py",
        "--batch",
        "4",
        "--size",
        "32",
        "--pairs",
        "3",
        "--threads",
        "1",
        "--estimator",
        "per_sample",
    )
    assert "per_sample, 1 threads, 3 pairs" in text
    low, high = (float(value) for value in text.split("quartiles ")[1].rstrip(")\n").split("-"))
    median = float(text.split("ratio median ")[1].split()[0])
    assert 0 < low <= median <= high


@pytest.mark.parametrize("allocator", [[], ["--steady-allocator"]])
def test_embed_cost_reports_ratios_and_page_faults(tmp_path: Path, allocator: list[str]) -> None:
    output = tmp_path / "embed.json"
    text = _run(
        "embed_cost.py",
        "--examples",
        "20",
        "--batch",
        "10",
        "--head-epochs",
        "0",
        "--keep-head",
        "--all-examples",
        "--skip",
        "0",
        "--repeats",
        "2",
        "--threads",
        "1",
        "--estimator",
        "batch",
        "--json",
        str(output),
        *allocator,
    )
    steady = bool(allocator)
    assert ("steady allocator (no heap trimming)" in text) is steady
    assert "target: whole embed <= 1.15x" in text and "page faults" in text
    results = json.loads(output.read_text())
    assert results["steady_allocator"] is steady
    assert set(results["page_faults"]) == {"plain", "prepare skip 0", "embed skip 0"}
    assert all(len(runs) == 2 and min(runs) >= 0 for runs in results["page_faults"].values())
    if steady:  # freed memory stays in the process: the plain pass faults in (almost) nothing new
        assert min(results["page_faults"]["plain"]) < 1000


def test_lm_diversity_times_ours_against_plain_and_the_published_procedure(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "lm.json"
    text = _run(
        "lm_diversity.py",
        "--sequences",
        "4",
        "--length",
        "16",
        "--batch",
        "2",
        "--layers",
        "2",
        "--width",
        "32",
        "--heads",
        "2",
        "--vocab",
        "64",
        "--repeats",
        "2",
        "--threads",
        "1",
        "--json",
        str(out),
    )
    report = json.loads(out.read_text())
    names = {"plain", "fisher", "fisher_batch", "task", "task_no_head", "reference"}
    assert set(report["best"]) == names and set(report["peak_rss_mib"]) == names
    assert all(len(report["seconds"][name]) == 2 for name in names)
    assert report["ratio"]["plain"] == 1.0 and report["ratio"]["reference"] > 0
    assert "vs the published procedure" in text and "target task <= 2.5x plain" in text


def test_lm_head_step_times_the_four_ways_against_autograd() -> None:
    text = _run("lm_head_step.py", "--threads", "1", "--repeats", "1", "--tokens", "16")
    rows = [line.split() for line in text.splitlines()[1:]]
    assert [row[0] for row in rows] == [
        "autograd",
        "autograd_fused",
        "closed_form",
        "closed_form_fused",
    ]
    assert rows[0][3] == "1.00x"
