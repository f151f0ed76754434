"""The download scripts, run offline against local archives (file:// URLs)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUB_SCRIPT = REPO / "scripts" / "download_cub.sh"
INAT_SCRIPT = REPO / "scripts" / "download_inat2018.sh"

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl for file://")


def run(
    script: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": "/tmp", **(env or {})}
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        env=full_env,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("script", [CUB_SCRIPT, INAT_SCRIPT])
def test_scripts_parse_and_need_a_root(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    result = run(script)
    assert result.returncode == 2 and "usage" in result.stderr


def fake_cub_archive(folder: Path) -> tuple[Path, str]:
    tree = folder / "tree" / "CUB_200_2011"
    (tree / "images" / "001.Black_footed_Albatross").mkdir(parents=True)
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        (tree / name).write_text("1 x\n")
    archive = folder / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="CUB_200_2011")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


@needs_curl
def test_download_cub_verifies_extracts_and_is_idempotent(tmp_path: Path) -> None:
    archive, md5 = fake_cub_archive(tmp_path / "server")
    root = tmp_path / "data"
    env = {"T2V_CUB_URL": f"file://{archive}", "T2V_CUB_MD5": md5}
    result = run(CUB_SCRIPT, str(root), env=env)
    assert result.returncode == 0, result.stderr
    for name in (
        "images.txt",
        "image_class_labels.txt",
        "train_test_split.txt",
        "classes.txt",
        "images",
    ):
        assert (root / "CUB_200_2011" / name).exists()
    again = run(CUB_SCRIPT, str(root), env=env)
    assert again.returncode == 0 and "already" in again.stdout


@needs_curl
def test_download_cub_rejects_a_bad_checksum(tmp_path: Path) -> None:
    archive, _ = fake_cub_archive(tmp_path / "server")
    env = {"T2V_CUB_URL": f"file://{archive}", "T2V_CUB_MD5": "0" * 32}
    result = run(CUB_SCRIPT, "--delete-archive", str(tmp_path / "data"), env=env)
    assert result.returncode == 1
    assert "expected 00000000000000000000000000000000" in result.stderr
    assert not (tmp_path / "data" / "CUB_200_2011").exists()


def test_download_inat_warns_about_size_and_needs_consent(tmp_path: Path) -> None:
    result = run(INAT_SCRIPT, str(tmp_path / "data"))
    assert result.returncode == 1
    assert "319 GB" in result.stdout and "--yes" in result.stderr
    assert not list((tmp_path / "data" / "inat2018").iterdir())


@needs_curl
def test_download_inat_checks_the_published_md5(tmp_path: Path) -> None:
    server = tmp_path / "server"
    server.mkdir()
    payload = tmp_path / "train2018.json"
    payload.write_text("{}")
    with tarfile.open(server / "train2018.json.tar.gz", "w:gz") as tar:
        tar.add(payload, arcname="train2018.json")
    env = {"T2V_INAT_BASE_URL": f"file://{server}"}
    result = run(INAT_SCRIPT, "--yes", str(tmp_path / "data"), env=env)
    assert result.returncode == 1
    assert "expected bfa29d89d629cbf04d826a720c0a68b0" in result.stderr
    assert not (tmp_path / "data" / "inat2018" / "train2018.json").exists()


@needs_curl
def test_download_cub_resumes_a_partial_archive(tmp_path: Path) -> None:
    archive, md5 = fake_cub_archive(tmp_path / "server")
    root = tmp_path / "data"
    root.mkdir()
    data = archive.read_bytes()
    (root / archive.name).write_bytes(data[: len(data) // 2])  # an interrupted download
    env = {"T2V_CUB_URL": f"file://{archive}", "T2V_CUB_MD5": md5}
    result = run(CUB_SCRIPT, str(root), env=env)
    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stderr
    assert (root / archive.name).read_bytes() == data
