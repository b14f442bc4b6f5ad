"""Two plugin hosts share one bucket on the real Ceph RGW: retention keeps to its own host.

Two `volplugin serve` processes with different --host-id (two roots, one store) each
back up a volume named `app_db` (the same compose name on both hosts). A prune with
--keep-last 1 on one host, a scheduled backup with backup-keep=last=1 on it, and the CLI
prune of the other host each forget only their own host's older backups; the other
host's backups stay and restore. `--all-hosts` applies the policy to every host's
backups, each host's separately.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.plugin import PluginProcess, without_docker
from tests.support.s3backup import S3Store, cli, store_fixture
from tests.support.waiting import wait_for

pytestmark = pytest.mark.s3

VOLUME = "app_db"


store = store_fixture("bks3-hosts")


def _serve(tmp_path: Path, store: S3Store, host: str) -> PluginProcess:
    env = dict(
        without_docker(tmp_path),
        LAYERFS_STORE=store.url,
        LAYERFS_CACHE_DIR=str(tmp_path / f"cache-{host}"),
        VOLPLUGIN_SCHEDULE_TICK="0.2",
        VOLPLUGIN_CRON_SECONDS="1",  # lets the schedule below fire within seconds
    )
    env.pop("VOLPLUGIN_HOST_ID", None)
    return PluginProcess(tmp_path / host / "root", env=env, args=("--host-id", host)).start()


def _ok(plugin: PluginProcess, endpoint: str, body: dict) -> dict:
    status, doc = plugin.call(endpoint, body)
    assert status == 200 and doc["Err"] == "", doc
    return doc


def _job(plugin: PluginProcess, endpoint: str, body: dict) -> dict:
    status, doc = plugin.job(endpoint, body)
    assert status == 200 and doc["Err"] == "", doc
    return doc


def _backup(plugin: PluginProcess, content: str) -> str:
    (plugin.root / "volumes" / VOLUME / "data.txt").write_text(content)
    return _job(plugin, "Backup.Create", {"Volume": VOLUME})["Backup"]["id"]


def _listing(store: S3Store) -> dict[str, str]:
    """id -> host of every backup of the volume in the bucket (through the CLI)."""
    out = cli("backups", VOLUME, "--json", store=store.url).stdout
    return {b["id"]: b["host"] for b in json.loads(out)}


def test_retention_on_one_host_keeps_the_other_hosts_backups(
    store: S3Store, tmp_path: Path
) -> None:
    a = _serve(tmp_path, store, "host-a")
    b = _serve(tmp_path, store, "host-b")
    try:
        for plugin in (a, b):
            _ok(plugin, "VolumeDriver.Create", {"Name": VOLUME})
        a1 = _backup(a, "a one")
        b1 = _backup(b, "b one")
        a2 = _backup(a, "a two")
        b2 = _backup(b, "b two")  # the newest backup of app_db in the bucket
        assert _listing(store) == {a1: "host-a", a2: "host-a", b1: "host-b", b2: "host-b"}
        table = cli("backups", VOLUME, store=store.url).stdout
        assert "HOST" in table.splitlines()[0] and "host-a" in table and "host-b" in table

        # The endpoint of host A: only A's older backup goes.
        pruned = _job(a, "Backup.Prune", {"KeepLast": 1, "Grace": 0})["Prune"]
        assert [r["id"] for r in pruned["remove"]] == [a1]
        assert {k["id"] for k in pruned["keep"]} == {a2}
        assert set(_listing(store)) == {a2, b1, b2}

        # backup-keep=last=1 after a scheduled backup on host A.
        # (options are given at create: host A's volume is made again with them)
        _ok(a, "VolumeDriver.Remove", {"Name": VOLUME})
        opts = {"backup-schedule": "* * * * * */2", "backup-keep": "last=1"}
        _ok(a, "VolumeDriver.Create", {"Name": VOLUME, "Opts": opts})
        (a.root / "volumes" / VOLUME / "data.txt").write_text("a scheduled")

        def retention() -> str:
            doc = _ok(a, "VolumeDriver.Get", {"Name": VOLUME})
            return doc["Volume"]["Status"]["Backup"].get("Retention") or ""

        wait_for(lambda: retention().endswith("removed 1"), "a scheduled backup with keep")
        a.stop()  # cancels a running scheduled backup (nothing published) or lets it end
        after = _listing(store)
        assert a2 not in after and b1 in after and b2 in after, after
        assert sorted(after.values()) == ["host-a", "host-b", "host-b"]

        # The CLI on host B (its id from VOLPLUGIN_HOST_ID): only B's older backup goes.
        env = dict(os.environ, VOLPLUGIN_HOST_ID="host-b")
        out = cli("prune", "--keep-last", "1", "--grace", "0", "--json", store=store.url, env=env)
        assert [r["id"] for r in json.loads(out.stdout)["remove"]] == [b1]
        left = _listing(store)
        assert sorted(left.values()) == ["host-a", "host-b"] and b2 in left

        # --all-hosts: each host's backups separately, so here nothing more goes.
        out = cli(
            "prune", "--keep-last", "1", "--all-hosts", "--grace", "0", "--json", store=store.url
        )
        assert json.loads(out.stdout)["remove"] == []
        assert _listing(store) == left

        restored = tmp_path / "restored"
        cli("restore", b2, "--to-dir", str(restored), store=store.url)
        assert (restored / "data.txt").read_text() == "b two"
        cli("verify", "--read-data", store=store.url)
    finally:
        a.cleanup()
        b.cleanup()
