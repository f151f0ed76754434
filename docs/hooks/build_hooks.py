"""MkDocs hooks: the command-line reference from the parsers, the benchmark figures.

* A line ``<!-- t2v-help: SUBCOMMAND -->`` in a page is replaced by what ``t2v SUBCOMMAND
  --help`` prints (``<!-- t2v-help: -->``: ``t2v --help``), captured from the parsers at build
  time, so the reference cannot drift from the command.
* The figures under ``bench/results/`` are published at the same paths in the site, so pages
  show the benchmark's own files instead of copies.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
HELP_MARKER = re.compile(r"^<!-- t2v-help: ?([\w-]*) -->$", flags=re.MULTILINE)
HELP_COLUMNS = "100"


def t2v_help(subcommand: str) -> str:
    """What ``t2v [SUBCOMMAND] --help`` prints, captured in this process."""
    from t2v_lightning.cli import main

    args = [subcommand, "--help"] if subcommand else ["--help"]
    out = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS  # argparse wraps to the terminal's width
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(args)
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    text = out.getvalue().rstrip()
    if not text.startswith("usage: t2v"):
        raise RuntimeError(f"t2v {' '.join(args)} printed no help: {text[:200]!r}")
    return text


def render_help_markers(markdown: str) -> str:
    """Replace every help marker of a page by the help text in a ``text`` block."""

    def block(match: re.Match[str]) -> str:
        return "```text\n" + t2v_help(match.group(1)) + "\n```"

    return HELP_MARKER.sub(block, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """MkDocs hook: the command-line reference."""
    return render_help_markers(markdown)


def on_files(files: Files, config: Any) -> Files:
    """MkDocs hook: the benchmark figures at ``bench/results/...`` in the site."""
    for figure in sorted((ROOT / "bench" / "results").rglob("*.png")):
        uri = figure.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(figure)))
    return files
