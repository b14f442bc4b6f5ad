"""Images on encrypted repositories, through the real CLI and FUSE: import, mount,
write through a writable mount, commit, and mount the committed image, on an
encrypted local store and on an encrypted S3 store (Ceph RGW).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.lfsmount import public_dir
from tests.support.repos import LAYERFS, clean_env, password_file, tiny_archive

pytestmark = pytest.mark.fuse


def _run(env: dict[str, str], store: str, *args: str) -> str:
    proc = subprocess.run(
        [LAYERFS, "--store", store, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, f"layerfs {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def _round_trip(store: str, env: dict[str, str], tmp_path: Path) -> None:
    _run(env, store, "import", str(tiny_archive(tmp_path / "a.tar", "enc/base:1", b"hello\n")))
    with public_dir("lfsrepo-") as base:
        mnt, upper = base / "m", base / "upper"
        mnt.mkdir()
        _run(env, store, "mount", "enc/base:1", str(mnt), "--upper", str(upper))
        try:
            assert (mnt / "hello.txt").read_bytes() == b"hello\n"
            (mnt / "new.bin").write_bytes(os.urandom(200_000) + b"tail")
            (mnt / "hello.txt").write_text("changed\n")
            _run(env, store, "commit", str(mnt), "-t", "enc/next:1")
        finally:
            _run(env, store, "umount", str(mnt))
        names = [r["name"] for r in json.loads(_run(env, store, "images", "--json"))]
        assert sorted(names) == ["enc/base:1", "enc/next:1"]
        _run(env, store, "mount", "enc/next:1", str(mnt))
        try:
            assert (mnt / "hello.txt").read_text() == "changed\n"
            assert (mnt / "new.bin").read_bytes().endswith(b"tail")
        finally:
            _run(env, store, "umount", str(mnt))
    _run(env, store, "fsck")


def test_images_on_an_encrypted_local_store(tmp_path: Path) -> None:
    env = clean_env(LAYERFS_PASSWORD_FILE=str(password_file(tmp_path, "pw", "local secret")))
    store = str(tmp_path / "store")
    _run(env, store, "init")
    _round_trip(store, env, tmp_path)
    config = json.loads((tmp_path / "store" / "docs" / "config").read_bytes())
    assert config["encryption"] == "aes-256-gcm"
    names = [p.name for p in (tmp_path / "store" / "docs").rglob("*")]
    assert not any("enc" in n and ("base" in n or "next" in n) for n in names), names


def test_images_on_an_encrypted_s3_store(s3_store_url: str, tmp_path: Path) -> None:
    env = clean_env(
        LAYERFS_PASSWORD_FILE=str(password_file(tmp_path, "pw", "s3 secret")),
        LAYERFS_CACHE_DIR=str(tmp_path / "cache"),
    )
    _run(env, s3_store_url, "init")
    _round_trip(s3_store_url, env, tmp_path)
