"""Helpers for the backup fault tests on the real Ceph RGW: buckets, volumes, the CLI.

``S3Store`` is a fresh bucket with its s3:// URL and a boto3 client for poking at
objects directly; ``collect_garbage()`` asks radosgw to free deleted objects now
(RGW keeps their tails for two hours, and the memstore OSD holds them in RAM).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support import ceph

VOLPLUGIN = str(Path(sys.executable).parent / "volplugin")


@dataclass
class S3Store:
    """A bucket on the RGW used as a backup store under the prefix ``store``."""

    env: ceph.S3Env
    bucket: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/store"

    def keys(self, rel_prefix: str = "") -> list[str]:
        """Keys (relative to the store prefix) of the objects under ``rel_prefix``."""
        pages = (
            self.env.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=f"store/{rel_prefix}")
        )
        return [o["Key"][len("store/") :] for page in pages for o in page.get("Contents", [])]


@contextmanager
def fresh_store(env: ceph.S3Env, tag: str) -> Iterator[S3Store]:
    """A new bucket for one test; removed (and its space collected) afterwards."""
    bucket = ceph.new_bucket(env, tag)
    try:
        yield S3Store(env, bucket)
    finally:
        ceph.remove_bucket(env, bucket)
        collect_garbage()


def store_fixture(tag: str):  # noqa: ANN201 - a pytest fixture
    """A ``store`` fixture: a fresh bucket tagged ``tag`` and a private local cache."""
    import pytest

    @pytest.fixture
    def store(s3_env, tmp_path, monkeypatch):  # noqa: ANN001, ANN202
        monkeypatch.setenv("LAYERFS_CACHE_DIR", str(tmp_path / "cache"))
        with fresh_store(s3_env, tag) as s:
            yield s

    return store


def collect_garbage() -> None:
    """Run radosgw's garbage collection now, so deleted objects leave the OSD's memory."""
    subprocess.run(
        ["radosgw-admin", "-c", str(ceph.ceph_dir() / "ceph.conf"), "-n", "client.rgw.s3"]
        + ["gc", "process", "--include-all"],
        capture_output=True,
        timeout=120,
    )


def fill_random(root: Path, count: int, size: int, seed: int, name: str = "blob") -> int:
    """Write ``count`` files of ``size`` incompressible bytes; return the bytes written."""
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"{name}{i:03}").write_bytes(rnd.randbytes(size))
    return count * size


def cli(
    *args: str, store: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `volplugin ARGS --store URL` and return the finished process."""
    proc = subprocess.run(
        [VOLPLUGIN, *args, "--store", store],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"volplugin {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def start_cli(*args: str, store: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `volplugin ARGS --store URL` in the background (stderr captured as text)."""
    return subprocess.Popen(
        [VOLPLUGIN, *args, "--store", store],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
    )


def backup(store: S3Store, volume: str, path: Path) -> dict:
    """`volplugin backup VOLUME --path PATH --json` into ``store``; the backup record."""
    return json.loads(cli("backup", volume, "--path", str(path), "--json", store=store.url).stdout)
