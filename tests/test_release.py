"""What we ship: the version in one place, ``t2v --help`` / ``--version``, the extras guard."""

from __future__ import annotations

import configparser
import inspect
import os
import re
import subprocess
import sys
import textwrap
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
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "tests.conftest",
         "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(tmp_path),
         str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
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
    # demo and timm are covered by the test extra, which lists their packages
    test_extra = setup["options.extras_require"]["test"]
    for covered in ("demo", "timm"):
        assert set(setup["options.extras_require"][covered].split()) <= set(test_extra.split())
    assert declared - {"demo", "timm"} <= installed
    assert re.search(r"^TEST_ENV :=.*T2V_REQUIRE_EXTRAS=1", makefile, flags=re.MULTILINE)
    recipe = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    assert "$(TEST_ENV) $(PY) -m pytest" in recipe and "lint" in recipe
