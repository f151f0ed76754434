"""Running ``t2v`` in the test's own process, as a user would from a shell."""

from __future__ import annotations

import sys

import pytest

from t2v_lightning.cli import main


def run_t2v(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``t2v ARGS`` in this process: (exit status, stdout, stderr)."""
    code = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["t2v", *args])
        try:
            main()
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
