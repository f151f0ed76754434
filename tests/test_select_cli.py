"""``t2v select``: experts ranked for a target by the asymmetric distance, driven as a user would.

Tiny artifacts are written by the tests; the expected ranking is computed here with numpy from
SPEC section 4 (cosine on h_a/(h_a+h_b+ε), d_asym = d(target, source) − α·d(source, trivial),
the trivial embedding's hessian equal to its scale).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from t2v_lightning.embedding import TaskEmbedding
from t2v_lightning.similarity.selection import ranked_experts, select_expert
from tests.cli_runner import run_t2v as run_cli

META = {"probe": "toy", "probe_fingerprint": "fp"}
EXPERTS = ("mnist", "fashion", "digits", "letters", "cifar")
# float32 cosine tiles against float64 numpy; values O(1), so ε is negligible
RTOL = 1e-5


def spec_cosine(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = a / (a + b + 1e-8), b / (a + b + 1e-8)
    return 1.0 - float(pa @ pb / np.sqrt((pa @ pa) * (pb @ pb)))


def expected_rows(
    target: np.ndarray, experts: dict[str, np.ndarray], alpha: float
) -> list[tuple[str, float, float, float]]:
    rows = []
    for name, h in experts.items():
        distance = spec_cosine(target, h)
        complexity = spec_cosine(h, np.ones_like(h))
        rows.append((name, distance - alpha * complexity, distance, complexity))
    return sorted(rows, key=lambda row: row[1])


def artifact(values: np.ndarray, name: str) -> TaskEmbedding:
    return TaskEmbedding(
        torch.tensor(values, dtype=torch.float32),
        torch.ones(len(values)),
        {"a": (0, 4), "b": (4, len(values))},
        {**META, "task_name": name},
    )


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """``experts/<name>.safetensors`` (five tasks) and ``target.safetensors`` in a fresh folder."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    values = {
        name: np.exp(rng.normal(size=10) * (0.3 + 0.4 * i)).astype(np.float32)
        for i, name in enumerate(EXPERTS)
    }
    values["target"] = np.exp(rng.normal(size=10)).astype(np.float32)
    (tmp_path / "experts").mkdir()
    for name in EXPERTS:
        artifact(values[name], name).save(tmp_path / "experts" / f"{name}.safetensors")
    artifact(values["target"], "target task").save(tmp_path / "target.safetensors")
    return {k: v.astype(np.float64) for k, v in values.items()}


def printed_rows(out: str) -> list[list[str]]:
    lines = out.strip().splitlines()
    assert lines[0].startswith("experts for target task, best first (cosine distance, alpha=")
    assert lines[1].split() == ["rank", "expert", "asymmetric", "distance", "to", "trivial"]
    return [line.split() for line in lines[2:] if not line.startswith("ranking:")]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 2 and lines[1].startswith("(set T2V_DEBUG"), err
    assert lines[0].startswith("t2v: error: "), err
    return lines[0]


@pytest.mark.parametrize("alpha", [0.15, 0.0, 2.0])
def test_select_prints_the_ranking_of_the_spec_formula(
    zoo: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str], alpha: float
) -> None:
    code, out, err = run_cli(
        ["select", "--target", "target.safetensors", "--experts", "experts", "--alpha", str(alpha)],
        capsys,
    )
    assert code == 0, err
    expected = expected_rows(zoo["target"], {n: zoo[n] for n in EXPERTS}, alpha)
    rows = printed_rows(out)
    assert [r[1] for r in rows] == [e[0] for e in expected]
    assert [r[0] for r in rows] == [str(i) for i in range(1, 6)]
    for row, (_, score, distance, complexity) in zip(rows, expected):
        assert [float(v) for v in row[2:]] == pytest.approx([score, distance, complexity], abs=6e-5)


def test_alpha_changes_the_pick_towards_complex_sources(
    zoo: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    # the meta-task above is built so that α matters: check it does, and as the formula says
    picks = {}
    for alpha in ("0", "2"):
        code, out, _ = run_cli(
            ["select", "--target", "target.safetensors", "--experts", "experts", "--alpha", alpha],
            capsys,
        )
        assert code == 0
        picks[alpha] = printed_rows(out)[0][1]
    experts = {n: zoo[n] for n in EXPERTS}
    assert picks["0"] == expected_rows(zoo["target"], experts, 0.0)[0][0]
    assert picks["2"] == expected_rows(zoo["target"], experts, 2.0)[0][0]
    assert picks["0"] != picks["2"]


def test_csv_holds_the_ranking_and_is_never_silently_replaced(
    zoo: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    files = [os.path.join("experts", f"{n}.safetensors") for n in ("digits", "mnist", "cifar")]
    args = [
        "select",
        "--target",
        "target.safetensors",
        "--experts",
        *files,
        "--csv",
        "out/ranking.csv",
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert out.strip().endswith("ranking: out/ranking.csv")
    with open("out/ranking.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == [
        "rank",
        "expert",
        "file",
        "asymmetric_distance",
        "distance",
        "distance_to_trivial",
    ]
    expected = expected_rows(zoo["target"], {n: zoo[n] for n in ("digits", "mnist", "cifar")}, 0.15)
    assert [row[1] for row in table[1:]] == [e[0] for e in expected]
    assert [row[2] for row in table[1:]] == [
        os.path.join("experts", f"{e[0]}.safetensors") for e in expected
    ]
    for row, e in zip(table[1:], expected):
        assert [float(v) for v in row[3:]] == pytest.approx(list(e[1:]), rel=RTOL, abs=1e-6)
    assert not [p for p in Path("out").iterdir() if p.name != "ranking.csv"]  # no temporaries

    before = Path("out/ranking.csv").read_bytes()
    code, _, err = run_cli([*args, "--alpha", "0"], capsys)
    assert (
        code == 2
        and "--csv 'out/ranking.csv' already exists; pass --overwrite" in one_error_line(err)
    )
    assert Path("out/ranking.csv").read_bytes() == before
    code, _, err = run_cli([*args, "--alpha", "0", "--overwrite"], capsys)
    assert code == 0, err
    assert Path("out/ranking.csv").read_bytes() != before
    for name in ("target.safetensors", "experts/mnist.safetensors"):
        code, _, err = run_cli([*args[:-1], name, "--overwrite"], capsys)
        assert code == 2 and f"--csv {name!r} is one of the input files" in one_error_line(err)
        assert TaskEmbedding.load(name).name  # untouched


def test_the_target_is_left_out_of_a_folder_of_experts(
    zoo: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    os.replace("target.safetensors", "experts/target.safetensors")
    code, out, err = run_cli(
        [
            "select",
            "--target",
            "experts/target.safetensors",
            "--experts",
            "experts",
            "experts/mnist.safetensors",
        ],
        capsys,
    )
    assert code == 0, err
    names = [row[1] for row in printed_rows(out)]
    assert sorted(names) == sorted(EXPERTS)  # no target, no duplicate


def test_bad_inputs_fail_in_one_line_naming_the_file(
    zoo: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    Path("broken.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all")
    Path("empty").mkdir()
    TaskEmbedding(
        torch.ones(10),
        torch.ones(10),
        {"a": (0, 4), "b": (4, 10)},
        {"probe": "other", "probe_fingerprint": "fp2", "task_name": "alien"},
    ).save("alien.safetensors")
    cases = [
        (
            ["--target", "missing.safetensors", "--experts", "experts"],
            "missing.safetensors does not exist",
        ),
        (
            ["--target", "broken.safetensors", "--experts", "experts"],
            "broken.safetensors is not a t2v-lightning embedding",
        ),
        (
            ["--target", "target.safetensors", "--experts", "experts", "broken.safetensors"],
            "broken.safetensors is not a t2v-lightning embedding",
        ),
        (
            ["--target", "target.safetensors", "--experts", "nowhere"],
            "expert artifact nowhere does not exist",
        ),
        (
            ["--target", "target.safetensors", "--experts", "empty"],
            "expert folder empty holds no .safetensors artifacts",
        ),
        (
            ["--target", "target.safetensors", "--experts", "target.safetensors"],
            "no expert artifacts besides the target",
        ),
        (
            ["--target", "target.safetensors", "--experts", "experts", "alien.safetensors"],
            "were made with different probe weights",
        ),
        (["--experts", "experts"], "the following arguments are required: --target"),
        (
            ["--target", "target.safetensors", "--experts", "experts", "--alpha", "abc"],
            "argument --alpha: invalid float value: 'abc'",
        ),
        (
            ["--target", "target.safetensors", "--experts", "experts", "--alpha", "nan"],
            "alpha must be a finite number",
        ),
        (
            ["--target", "target.safetensors", "--experts", "experts", "--distance", "l2"],
            "argument --distance: invalid choice: 'l2'",
        ),
    ]
    for args, expected in cases:
        code, out, err = run_cli(["select", *args], capsys)
        assert code == 2, (args, err)
        assert expected in one_error_line(err), (args, err)
        assert out == ""


def test_ranked_experts_rows_follow_the_ranking(zoo: dict[str, np.ndarray]) -> None:
    experts = {n: TaskEmbedding.load(f"experts/{n}.safetensors") for n in EXPERTS}
    ranking = select_expert(TaskEmbedding.load("target.safetensors"), experts, alpha=0.15)
    rows = ranked_experts(ranking)
    assert [r.rank for r in rows] == [1, 2, 3, 4, 5]
    assert [r.name for r in rows] == ranking.ranked_names
    assert [r.index for r in rows] == ranking.order
    for r in rows:
        assert r.score == pytest.approx(r.distance - 0.15 * r.complexity, abs=1e-12)
