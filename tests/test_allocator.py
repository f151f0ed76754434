"""glibc's malloc thresholds: what keep_freed_memory and settle_thresholds change, and who calls them.

Both change the allocator of the whole process, so their effect is checked in fresh
interpreters: a block freed and then allocated and filled again faults its pages in again when
glibc gave it back to the system, and (almost) none when glibc kept it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from t2v_lightning import allocator

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

ROOT = Path(__file__).resolve().parent.parent

# Eight rounds of a step-like pattern: five 8 MiB tensors allocated and filled, then all freed.
# Prints the page faults of each round's fills (and what the call under test returned).
ROUNDS = """
import json, resource, sys, torch
from t2v_lightning import allocator
call = sys.argv[1]
returned = getattr(allocator, call)() if call != "none" else None
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(5)]
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del blocks
print(json.dumps({"returned": returned, "faults": faults}))
"""
PAGES = 5 * (8 << 20) // 4096  # pages one round fills


def _rounds(call: str, **env: str) -> tuple[object, list[int]]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", allocator.DEFAULT_MALLOC_ENV)
    }
    clean.update(env)
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS, call],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["returned"], [int(n) for n in result["faults"]]


def test_each_round_faults_its_memory_in_again_by_default() -> None:
    # glibc trims the heap at the end of a round (40 MiB freed, over its trim threshold of twice
    # the largest block it unmapped, 16 MiB).
    _, faults = _rounds("none")
    assert sum(faults[1:]) > PAGES, faults


def test_keep_freed_memory_keeps_a_rounds_memory_for_the_next() -> None:
    returned, faults = _rounds("keep_freed_memory")
    assert returned is True
    assert faults[0] > PAGES // 2 and max(faults[5:]) < PAGES // 20, faults
    returned, faults = _rounds("keep_freed_memory", **{allocator.DEFAULT_MALLOC_ENV: "1"})
    assert returned is False and sum(faults[1:]) > PAGES, faults


def test_settle_thresholds_keeps_a_40_mib_rounds_memory_for_the_next() -> None:
    # 40 MiB freed at once stays under the raised trim threshold (62 MiB).
    _, faults = _rounds("settle_thresholds")
    assert faults[0] > PAGES // 2 and max(faults[5:]) < PAGES // 20, faults


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TRIM_THRESHOLD_": "1000000"},
        {"MALLOC_MMAP_THRESHOLD_": "1000000"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"},
        {allocator.DEFAULT_MALLOC_ENV: "1"},
        {allocator.DEFAULT_MALLOC_ENV: "yes"},
    ],
)
def test_keep_freed_memory_leaves_a_users_malloc_settings_alone(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda _: _Recorder(calls))
    assert allocator.keep_freed_memory() is False
    assert calls == []


class _Recorder:
    """Stands in for libc: records mallopt calls."""

    def __init__(self, calls: list[tuple[int, int]]) -> None:
        self._calls = calls

    @property
    def mallopt(self) -> _Recorder:
        return self

    def __call__(self, param: int, value: int) -> int:
        self._calls.append((param, value))
        return 1


def test_keep_freed_memory_sets_both_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TOP_PAD_",
        "MALLOC_MMAP_MAX_",
        "GLIBC_TUNABLES",
        allocator.DEFAULT_MALLOC_ENV,
    ):
        monkeypatch.delenv(key, raising=False)
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda _: _Recorder(calls))
    assert allocator.keep_freed_memory() is True
    assert calls == [(-3, allocator.MMAP_THRESHOLD), (-1, allocator.TRIM_THRESHOLD)]


def test_the_console_script_and_the_demo_keep_freed_memory_only_as_their_own_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import t2v_lightning.cli as cli
    import t2v_lightning.demo as demo

    calls: list[str] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("cli") or True)
    monkeypatch.setattr(demo, "keep_freed_memory", lambda: calls.append("demo") or True)
    monkeypatch.setattr(sys, "argv", ["t2v", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == ["cli"]
    monkeypatch.setattr(sys, "argv", ["pytest"])
    with pytest.raises(SystemExit):
        cli.main(["--help"])  # called from Python: the caller's process, left alone
    monkeypatch.setattr(sys, "argv", ["demo", "--help"])
    with pytest.raises(SystemExit):
        demo.main()
    monkeypatch.setattr(sys, "argv", ["pytest"])
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    assert calls == ["cli", "demo"]
