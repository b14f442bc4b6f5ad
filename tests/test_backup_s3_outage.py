"""S3 goes away in the middle of a large backup (a private radosgw is killed), then returns.

The backup fails with one clear line naming S3 and the endpoint, after bounded
retries; earlier backups and the volume are untouched; once the gateway is
back the next backup succeeds and restores the volume exactly.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from layerfs.errors import StoreError
from layerfs.store.chunks import digest_of
from layerfs.store.s3 import S3Backend
from tests.support import ceph
from tests.support.backuptree import describe
from tests.support.s3backup import (
    S3Store,
    cli,
    collect_garbage,
    fill_random,
    start_cli,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.s3


@pytest.fixture
def outage(s3_env, tmp_path, monkeypatch):
    """A private gateway over the shared cluster and a bucket; the shared one lists objects."""
    monkeypatch.setenv("LAYERFS_CACHE_DIR", str(tmp_path / "cache"))
    with ceph.PrivateGateway(s3_env) as gw:
        bucket = ceph.new_bucket(s3_env, "bks3-outage")
        try:
            yield gw, S3Store(s3_env, bucket)
        finally:
            gw.start()
            ceph.remove_bucket(s3_env, bucket)
            collect_garbage()


def test_gateway_dies_during_a_backup(outage, tmp_path: Path) -> None:
    gw, store = outage
    private = {"AWS_ENDPOINT_URL": gw.env.endpoint}
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "notes.txt").write_text("before the outage\n")
    first = json.loads(
        cli("backup", "bks3-out", "--path", str(vol), "--json", store=store.url, env=private).stdout
    )
    fill_random(vol, 10, 32 << 20, seed=3)
    volume_before = describe(vol)
    packs = set(store.keys("packs/"))
    proc = start_cli("backup", "bks3-out", "--path", str(vol), store=store.url, env=private)
    wait_for(
        lambda: bool(set(store.keys("packs/")) - packs),
        "the first pack of the large backup",
        timeout=300,
        guard=lambda: proc.poll() is None,
    )
    gw.stop()
    stopped = time.monotonic()
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the backup kept retrying for 5 minutes with S3 gone") from None
    print(f"the backup failed {time.monotonic() - stopped:.1f} s after the gateway died")
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("volplugin: error:")]
    assert len(lines) == 1, err  # one line; log lines (a lease left to expire) may precede it
    assert "S3" in lines[0] and f"127.0.0.1:{gw.port}" in lines[0], lines[0]
    assert "Traceback" not in err

    assert describe(vol) == volume_before
    gw.start()
    listed = json.loads(cli("backups", "--json", store=store.url, env=private).stdout)
    assert [b["id"] for b in listed] == [first["id"]]
    cli("verify", "--read-data", store=store.url, env=private)

    second = json.loads(
        cli("backup", "bks3-out", "--path", str(vol), "--json", store=store.url, env=private).stdout
    )
    assert second["parent"] == first["id"]
    out = tmp_path / "out"
    cli("restore", second["id"], "--to-dir", str(out), store=store.url, env=private)
    assert describe(out) == describe(vol)
    cli("verify", "--read-data", store=store.url, env=private)


def test_writer_stops_at_the_first_failed_upload(outage, tmp_path: Path, monkeypatch) -> None:
    """With S3 gone, put_blob raises once an upload has failed, not after the whole volume."""
    gw, store = outage
    monkeypatch.setenv("AWS_ENDPOINT_URL", gw.env.endpoint)
    backend = S3Backend(store.bucket, "store", cache_root=tmp_path / "c", pack_size=50_000)
    blobs = [bytes([i % 256]) * 20_000 + i.to_bytes(4, "big") for i in range(400)]
    backend.put_blob(digest_of(blobs[0]), blobs[0])
    backend.flush()
    gw.stop()
    put = 1
    with pytest.raises(StoreError, match=f"cannot reach the S3 endpoint .*127.0.0.1:{gw.port}"):
        for data in blobs[1:]:
            backend.put_blob(digest_of(data), data)
            put += 1
    assert put < len(blobs) // 2, "the writer went on long after the uploads failed"
    assert backend.get_blob(digest_of(blobs[put - 1])) == blobs[put - 1]  # held in memory
    gw.start()
    for data in blobs[put:]:
        backend.put_blob(digest_of(data), data)
    backend.flush()  # the packs that failed are uploaded now
    fresh = S3Backend(store.bucket, "store", cache_root=tmp_path / "d")
    assert all(fresh.get_blob(digest_of(d)) == d for d in blobs)
