"""What we ship: the version in one place, ``t2v --help`` / ``--version``, the extras guard."""

from __future__ import annotations

import configparser
import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import t2v_lightning
from t2v_lightning import cli
from t2v_lightning.version import __version__

from .cli_runner import run_t2v

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_defined_in_one_place_only() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: t2v_lightning.version.__version__"
    assert t2v_lightning.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    literal = re.compile(rf"""__version__\s*=\s*["']{re.escape(__version__)}["']""")
    defined = [
        str(path.relative_to(ROOT))
        for path in [*ROOT.glob("t2v_lightning/**/*.py"), ROOT / "setup.cfg", ROOT / "cli.py"]
        if literal.search(path.read_text())
    ]
    assert defined == ["t2v_lightning/version.py"]


def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"t2v {__version__}\n"


def _dispatched_by_main() -> set[str]:
    """The subcommands main() hands to their own parsers, read from its source."""
    return set(re.findall(r"""argv\[0\] == ["'](\w+)["']""", inspect.getsource(cli.main)))


def test_help_names_every_subcommand_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    dispatched = _dispatched_by_main()
    assert {"distance", "select"} <= dispatched
    expected = set(cli.T2VCLI.subcommands()) | dispatched
    assert set(cli.SUBCOMMANDS) == expected
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([flag])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        listed = dict(re.findall(r"^    (\w+) +(\S.*)$", out, flags=re.MULTILINE))
        assert listed == cli.SUBCOMMANDS  # each name with its summary on the same line
        assert "--version" in out


def test_every_listed_subcommand_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    for name in cli.SUBCOMMANDS:
        code, out, err = run_t2v([name, "--help"], capsys)
        assert code == 0, (name, err)
        assert re.match(rf"usage: t2v (\[.*\] )?{name}\b", out), (name, out[:200])


GUARDED = """
import pytest


def test_needs_a_missing_module():
    pytest.importorskip("t2v_no_such_module")


def test_needs_cuda():
    pytest.skip("needs a CUDA device")
"""


@pytest.mark.parametrize("required", ["1", ""])
def test_extras_guard_fails_missing_modules_only_when_required(
    tmp_path: Path, required: str
) -> None:
    (tmp_path / "test_guarded.py").write_text(textwrap.dedent(GUARDED))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2V_REQUIRE_EXTRAS": required}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rA",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-c",
            os.devnull,
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    if required:
        assert done.returncode == 1, done.stdout
        assert "1 failed, 1 skipped" in done.stdout
        assert "could not import 't2v_no_such_module'" in done.stdout
        assert "T2V_REQUIRE_EXTRAS=1" in done.stdout
    else:
        assert done.returncode == 0, done.stdout
        assert "2 skipped" in done.stdout


def test_make_test_requires_every_extra_that_has_tests() -> None:
    makefile = (ROOT / "Makefile").read_text()
    extras = re.search(r"^TEST_EXTRAS := (.*)$", makefile, flags=re.MULTILINE)
    assert extras is not None
    installed = set(extras.group(1).split(","))
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    declared = set(setup["options.extras_require"])
    # extras the test extra pulls in by name ("t2v-lightning[text,data]") are installed too
    test_extra = setup["options.extras_require"]["test"]
    for named in re.findall(r"t2v-lightning\[([\w,-]+)\]", test_extra):
        installed |= set(named.split(","))
    # demo and timm are covered by the test extra, which lists their packages
    for covered in ("demo", "timm"):
        assert set(setup["options.extras_require"][covered].split()) <= set(test_extra.split())
    assert declared - {"demo", "timm"} <= installed
    assert re.search(r"^TEST_ENV :=.*T2V_REQUIRE_EXTRAS=1", makefile, flags=re.MULTILINE)
    recipe = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    assert "$(TEST_ENV) $(PY) -m pytest" in recipe and "lint" in recipe


# ------------------------------------------------------------------------------ the wheel
PACKAGE_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "t2v_lightning")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built with ``pip wheel --no-deps`` from a copy of the package's sources.

    A copy, so that the build's ``build/`` and ``*.egg-info`` do not land in the repository;
    without build isolation, so that nothing is downloaded (setuptools comes with the test
    extra).
    """
    source = tmp_path_factory.mktemp("source")
    for name in PACKAGE_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copyfile(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheelhouse")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("t2v_lightning-*.whl")
    return built


def test_the_wheel_carries_every_file_of_the_package(wheel: Path) -> None:
    assert wheel.name.startswith(f"t2v_lightning-{__version__}-py3-none-any")
    package = ROOT / "t2v_lightning"
    expected = {
        path.relative_to(ROOT).as_posix()
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert {"t2v_lightning/py.typed", "t2v_lightning/data/cub_taxonomy.csv"} <= expected
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"t2v_lightning-{__version__}.dist-info"
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    assert {name for name in names if name.startswith("t2v_lightning/")} == expected
    assert re.search(r"^t2v = t2v_lightning\.cli:main$", entry_points, flags=re.MULTILINE)
    assert f"\nVersion: {__version__}\n" in metadata
    for extra in ("text", "test", "docs", "lint", "demo", "timm"):
        assert f"Provides-Extra: {extra}\n" in metadata, extra


def test_t2v_runs_from_the_wheel_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel alone (dependencies from this environment), away from the tree."""
    target = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import t2v_lightning; print(t2v_lightning.__file__)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=120,
    )
    assert Path(where.stdout.strip()).is_relative_to(target), where.stdout + where.stderr
    script = target / "bin" / "t2v"
    done = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(re.findall(r"^    (\w+) ", done.stdout, flags=re.MULTILINE)) == set(cli.SUBCOMMANDS)
    # the package data comes from the wheel too
    data = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlib.resources import files; "
            "print(files('t2v_lightning.data').joinpath('cub_taxonomy.csv').read_text()[:40])",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=120,
    )
    assert data.returncode == 0 and data.stdout.strip(), data.stderr
