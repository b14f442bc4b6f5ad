"""Retention as restic's forget defines it, and prune removing only unreferenced data."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from layerfs.store.location import open_store
from tests.support.backuptree import layerfs, make_image, volplugin
from volplugin.backup import service
from volplugin.backup.docs import BackupRecord, get_backup, put_backup
from volplugin.backup.errors import BackupError
from volplugin.backup.retention import Policy, apply_per_volume, apply_policy

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday


def _records(times: list[datetime], volume: str = "v") -> list[BackupRecord]:
    return [
        BackupRecord(id=f"{volume}{i:04}", volume=volume, host="h", time=t.timestamp(), tree="0")
        for i, t in enumerate(times)
    ]


def _kept(decisions) -> set[str]:
    return {d.backup.id for d in decisions if d.keep}


def test_last_and_daily_buckets() -> None:
    hourly = _records([START + timedelta(hours=h) for h in range(72)])
    kept = _kept(apply_policy(hourly, Policy(last=2, daily=3)))
    # the two newest, and the newest of each of the three days
    assert kept == {"v0071", "v0070", "v0047", "v0023"}


def test_hourly_weekly_and_oldest_kept_when_counts_remain() -> None:
    hourly = _records([START + timedelta(hours=h) for h in range(72)])
    assert _kept(apply_policy(hourly, Policy(hourly=5))) == {f"v{i:04}" for i in range(67, 72)}
    daily = _records([START + timedelta(days=d, hours=12) for d in range(21)])
    # weeks of Mar 2, 9 and 16: the newest backup of each of the two newest weeks
    assert _kept(apply_policy(daily, Policy(weekly=2))) == {"v0020", "v0013"}
    # only one month has backups: monthly=3 keeps its newest and, with counts left, the oldest
    decisions = apply_policy(daily, Policy(monthly=3))
    assert _kept(decisions) == {"v0020", "v0000"}
    assert next(d for d in decisions if d.backup.id == "v0000").reasons == ["oldest monthly"]


def test_buckets_per_volume_and_empty_policy() -> None:
    a = _records([START + timedelta(days=d) for d in range(3)], "a")
    b = _records([START + timedelta(days=d) for d in range(2)], "b")
    assert _kept(apply_per_volume(a + b, Policy(last=1))) == {"a0002", "b0001"}
    with pytest.raises(BackupError, match="no retention policy"):
        apply_policy(a, Policy())


def _retime(store_dir: Path, backup_id: str, when: datetime) -> None:
    backend = open_store(str(store_dir)).backend
    record = get_backup(backend, backup_id)
    record.time = when.timestamp()
    put_backup(backend, record)


def test_prune_removes_forgotten_data_only(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    img = tmp_path / "img"
    img.mkdir()
    (img / "app").write_bytes(os.urandom(300_000))
    make_image(store, "bk-prune-image:1", img)
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "stable").write_bytes(os.urandom(300_000))
    contents, ids = [], []
    for _ in range(5):
        contents.append(os.urandom(300_000))
        (vol / "gen").write_bytes(contents[-1])
        ids.append(service.create_backup(store, "bk-p", vol).id)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_bytes(os.urandom(100_000))
    other_id = service.create_backup(store, "bk-other", other).id
    times = [
        datetime(2026, 1, 1, 8, tzinfo=UTC),
        datetime(2026, 1, 2, 10, tzinfo=UTC),
        datetime(2026, 1, 2, 12, tzinfo=UTC),
        datetime(2026, 1, 3, 9, tzinfo=UTC),
        datetime(2026, 1, 3, 10, tzinfo=UTC),
    ]
    for backup_id, when in zip(ids, times, strict=True):
        _retime(store_dir, backup_id, when)
    blobs_before = dict(store.backend.iter_blobs())

    args = ["prune", "--keep-daily", "2", "--volume", "bk-p", "--grace", "0", "--json"]
    dry = json.loads(volplugin(*args, "--dry-run", store=store_dir).stdout)
    assert {r["id"] for r in dry["remove"]} == {ids[0], ids[1], ids[3]}
    assert dict(store.backend.iter_blobs()) == blobs_before
    assert len(service.list_backups(store.backend)) == 6

    done = json.loads(volplugin(*args, store=store_dir).stdout)
    assert {r["id"] for r in done["remove"]} == {ids[0], ids[1], ids[3]}
    assert done["objects_removed"] == dry["objects_removed"] > 0
    left = [r.id for r in service.list_backups(store.backend)]
    assert sorted(left) == sorted([ids[2], ids[4], other_id])
    blobs_after = dict(store.backend.iter_blobs())
    assert len(blobs_after) == len(blobs_before) - done["objects_removed"]
    assert done["bytes_freed"] == sum(blobs_before[d] for d in blobs_before.keys() - blobs_after)

    volplugin("verify", "--read-data", store=store_dir)
    layerfs("fsck", store=store_dir)
    for backup_id, content in ((ids[2], contents[2]), (ids[4], contents[4])):
        target = tmp_path / f"out-{backup_id}"
        service.restore_backup(store, backup_id, target)
        assert (target / "gen").read_bytes() == content
        assert (target / "stable").read_bytes() == (vol / "stable").read_bytes()
