"""Concurrent backups and a prune on one S3 bucket (the real Ceph RGW), through the CLI.

Two processes back up different volumes at once; then a prune with a retention
policy starts while a third backup runs. That backup reuses chunks only a
backup the prune forgets still references, so without the store lease the prune
would delete data the new backup points to; the third backup is held
(SIGSTOP) mid-way until the prune has taken its exclusive lease, so the prune
always meets the running backup. Every kept backup must verify with
--read-data and restore its volume exactly.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.support.backuptree import describe
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


store = store_fixture("bks3-conc")


def _finish(proc, log: list[str] | None = None) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    if log is not None:
        log.append(err)
    return json.loads(out)


def test_two_backups_then_prune_during_a_third(store: S3Store, tmp_path: Path) -> None:
    v1, v2, v3 = (tmp_path / f"v{i}" for i in (1, 2, 3))
    fill_random(v1, 2, 8 << 20, seed=20, name="shared")  # later copied into v3
    fill_random(v1, 1, 4 << 20, seed=21, name="gone")  # only in the backup prune forgets
    fill_random(v2, 2, 8 << 20, seed=22, name="two")
    old1, old2 = backup(store, "bks3-c1", v1), backup(store, "bks3-c2", v2)

    shutil.copytree(v1, v3)
    # After shared*, and 4 packs (32 MiB each) of its own: the prune must start while
    # the third backup still has most of them to upload.
    fill_random(v3, 8, 16 << 20, seed=23, name="zown")
    for p in v1.iterdir():
        p.unlink()
    fill_random(v1, 2, 8 << 20, seed=24, name="new")
    fill_random(v2, 1, 8 << 20, seed=25, name="more")
    jobs = [
        start_cli("backup", v, "--path", str(p), "--json", store=store.url)
        for v, p in (("bks3-c1", v1), ("bks3-c2", v2))
    ]
    new1, new2 = (_finish(j) for j in jobs)
    assert new1["parent"] == old1["id"] and new2["parent"] == old2["id"]

    packs = set(store.keys("packs/"))
    third = start_cli("backup", "bks3-c3", "--path", str(v3), "--json", store=store.url)
    wait_for(  # past the shared files (found in the bucket), uploading its own
        lambda: bool(set(store.keys("packs/")) - packs),
        "the third backup's first pack",
        timeout=300,
        guard=lambda: third.poll() is None,
        interval=0.01,
    )
    third.send_signal(signal.SIGSTOP)  # hold it mid-backup while the prune starts
    assert third.poll() is None, "the third backup ended before it could be held"
    try:
        prune = start_cli("prune", "--keep-last", "1", "--grace", "0", "--json", store=store.url)
        wait_for(
            lambda: "locks/exclusive" in store.keys("locks/"),
            "the prune's exclusive lease",
            timeout=300,
            guard=lambda: prune.poll() is None,
        )
    finally:
        third.send_signal(signal.SIGCONT)
    new3 = _finish(third)
    prune_log: list[str] = []
    report = _finish(prune, prune_log)
    assert "waiting for 1 writer lease(s) to end" in prune_log[0]  # the race did happen
    assert sorted(r["id"] for r in report["remove"]) == sorted([old1["id"], old2["id"]])
    assert report["objects_removed"] > 0  # the chunks of gone000 at least

    listed = json.loads(cli("backups", "--json", store=store.url).stdout)
    assert sorted(b["id"] for b in listed) == sorted([new1["id"], new2["id"], new3["id"]])
    cli("verify", "--read-data", store=store.url)
    for record, vol in ((new1, v1), (new2, v2), (new3, v3)):
        out = tmp_path / f"out-{record['volume']}"
        cli("restore", record["id"], "--to-dir", str(out), store=store.url)
        assert describe(out) == describe(vol), record["volume"]
    assert store.keys("locks/") == []  # every lease was released
