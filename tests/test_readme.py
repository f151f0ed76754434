"""The README's Python quick start runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_quick_start_runs_as_written(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks()
    assert blocks, "the README has no Python quick start"
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    written = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert written == ["digits_0_4.safetensors", "digits_5_9.safetensors", "digits_even.safetensors"]
