"""Lease fencing on the real Ceph RGW: a backup stopped past its lease publishes nothing.

A backup (with a 6 s lease, LAYERFS_S3_LEASE_TTL) is held with SIGSTOP once it has
looked up the chunks it shares with a backup the prune is about to forget, and
uploaded a pack of its own. A prune in another process waits until that lease
has expired, forgets the old backup and deletes its chunks. Resumed with
SIGCONT, the backup must fail with the lease error instead of publishing a
record that names deleted chunks; `volplugin verify` then finds nothing missing.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.support.s3backup import (
    S3Store,
    backup,
    cli,
    fill_random,
    start_cli,
    store_fixture,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.s3

LEASE_TTL = "6"


store = store_fixture("bks3-fence")


def test_a_writer_stopped_past_its_lease_publishes_nothing(store: S3Store, tmp_path: Path) -> None:
    old_vol, vol = tmp_path / "old", tmp_path / "vol"
    fill_random(old_vol, 2, 8 << 20, seed=40, name="shared")
    old = backup(store, "bks3-f1", old_vol)
    for p in old_vol.iterdir():  # the next backup of bks3-f1 no longer has them
        p.unlink()
    fill_random(old_vol, 1, 1 << 20, seed=41, name="new")
    newer = backup(store, "bks3-f1", old_vol)

    fill_random(vol, 2, 8 << 20, seed=40, name="shared")  # the same chunks as the old backup
    fill_random(vol, 6, 16 << 20, seed=42, name="zown")  # then three packs of its own
    packs = set(store.keys("packs/"))
    writer = start_cli(
        "backup", "bks3-f2", "--path", str(vol), "--json",
        store=store.url, env={"LAYERFS_S3_LEASE_TTL": LEASE_TTL},
    )  # fmt: skip
    wait_for(  # past the shared files (found in the bucket), uploading its own
        lambda: bool(set(store.keys("packs/")) - packs),
        "the writer's first pack",
        timeout=300,
        guard=lambda: writer.poll() is None,
        interval=0.01,
    )
    writer.send_signal(signal.SIGSTOP)
    try:
        assert writer.poll() is None, "the backup ended before it could be stopped"
        prune = cli("prune", "--keep-last", "1", "--grace", "0", "--json", store=store.url)
        report = json.loads(prune.stdout)
        assert "waiting for 1 writer lease(s) to end" in prune.stderr  # it met the writer
        assert [r["id"] for r in report["remove"]] == [old["id"]]
        assert report["objects_removed"] > 0  # the shared chunks the writer counts on
    finally:
        writer.send_signal(signal.SIGCONT)
    out, err = writer.communicate(timeout=600)
    assert writer.returncode != 0, f"the stopped backup published: {out}"
    assert "not published" in err and "lease on the store lapsed" in err, err

    listed = json.loads(cli("backups", "--json", store=store.url).stdout)
    assert [b["id"] for b in listed] == [newer["id"]]
    cli("verify", store=store.url)  # nothing missing
    assert store.keys("locks/") == []
