"""Leases that fence, gc's grace for unindexed packs, reused chunks, bounded zstd, repack checks.

The S3 cases run on the real Ceph RGW; the lease's age is set back by hand (as if
the process had been stopped) instead of waiting for it. The local cases use a
real local store and the backup service's own code.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
import zstandard

from layerfs.errors import CorruptObject, StoreError
from layerfs.maintenance.check import check_store
from layerfs.maintenance.roots import backup_roots
from layerfs.store import packs
from layerfs.store.chunks import ChunkRef, ChunkStore, digest_of
from layerfs.store.leases import LeaseLapsed
from layerfs.store.location import open_store
from layerfs.store.s3 import S3Backend
from tests.support import ceph
from tests.support.blobs import lose_blob
from volplugin.backup import service
from volplugin.backup.errors import BackupError


@pytest.fixture
def bucket(s3_env):
    name = ceph.new_bucket(s3_env, "fence")
    yield name
    ceph.remove_bucket(s3_env, name)


def backend(bucket: str, tmp_path: Path, name: str = "a", **kwargs) -> S3Backend:
    kwargs.setdefault("lock_poll", 0.2)
    return S3Backend(bucket, "store", cache_root=tmp_path / f"cache-{name}", **kwargs)


def keys(s3_env, bucket: str, prefix: str) -> list[str]:
    pages = s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def age_lease(be: S3Backend, seconds: float) -> None:
    """Make the held lease look ``seconds`` older, as after a stop of that long."""
    for held in be.leases._held.values():
        held.sent -= seconds


# -- leases ------------------------------------------------------------------------------


@pytest.mark.s3
def test_publish_needs_a_third_of_the_lease_left(s3_env, bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path, lease_ttl=30)
    store = ChunkStore(be)
    with be.lock(False):
        ref = store.write_bytes(b"fenced " * 1000)[0]
        be.check_lease()  # fresh: fine
        age_lease(be, 21)  # 9 s of 30 left: less than a third
        with pytest.raises(LeaseLapsed, match="lease on the store lapsed"):
            store.flush()
        with pytest.raises(LeaseLapsed):
            be.put_doc("backups/x.json", b"{}")
    assert keys(s3_env, bucket, "store/index/") == []  # nothing was published
    assert keys(s3_env, bucket, "store/docs/") == []
    with be.lock(False):  # a new lease: the blobs are published now
        store.flush()
    assert backend(bucket, tmp_path, "b").has_blob(ref.digest)


@pytest.mark.s3
def test_a_lapsed_lease_is_not_revived_by_a_refresh(s3_env, bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path, lease_ttl=4)
    with be.lock(False):
        age_lease(be, 5)  # past its period: a prune may have run
        held = next(iter(be.leases._held.values()))
        before = held.sent
        be.leases._wake.wait(2.5)  # the refresh thread runs every ttl/4 = 1 s
        assert held.sent == before  # not renewed
        with pytest.raises(LeaseLapsed, match="lapsed"):
            be.check_lease()


@pytest.mark.s3
def test_lease_calls_have_short_timeouts(bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path, lease_ttl=60)
    config = be.leases.client.meta.config
    assert config.read_timeout <= 60 / 6 and config.connect_timeout <= 60 / 6
    assert config.retries["total_max_attempts"] <= 2
    assert be.leases.client is not be.client
    data = be.client.meta.config
    assert data.read_timeout == 60  # the data's own client keeps its longer timeouts


@pytest.mark.s3
def test_lease_ttl_from_the_environment(bucket, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LAYERFS_S3_LEASE_TTL", "7.5")
    assert backend(bucket, tmp_path).leases.ttl == 7.5
    monkeypatch.setenv("LAYERFS_S3_LEASE_TTL", "nan")
    with pytest.raises(StoreError, match="LAYERFS_S3_LEASE_TTL"):
        backend(bucket, tmp_path)


# -- gc's grace for packs no index names ------------------------------------------------------


@pytest.mark.s3
def test_young_unindexed_packs_survive_gc(s3_env, bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path, pack_size=20000)
    store = ChunkStore(be)
    refs = [store.put_chunk(bytes([i]) * 7000) for i in range(6)]
    be.flush()
    orphan = "store/packs/ff/ff" + "0" * 30  # a writer's pack it has yet to index
    s3_env.client().put_object(Bucket=bucket, Key=orphan, Body=b"not indexed yet")
    with be.lock(True):
        assert be.clean_tmp() == 0
        be.delete_blobs([refs[0].digest])
    assert orphan in keys(s3_env, bucket, "store/packs/")
    old = backend(bucket, tmp_path, "b", unindexed_grace=0)  # as if an hour had passed
    with old.lock(True):
        assert old.clean_tmp() == 1
    assert orphan not in keys(s3_env, bucket, "store/packs/")


# -- repack re-hashes what it copies ---------------------------------------------------------


@pytest.mark.s3
def test_repack_leaves_a_pack_with_a_damaged_blob_alone(s3_env, bucket, tmp_path, caplog) -> None:
    be = backend(bucket, tmp_path)
    store = ChunkStore(be)
    dead, damaged, good = (store.put_chunk(bytes([i]) * 5000 + b"x" * i) for i in range(3))
    be.flush()
    [pack_key] = keys(s3_env, bucket, "store/packs/")
    client = s3_env.client()
    body = bytearray(client.get_object(Bucket=bucket, Key=pack_key)["Body"].read())
    place = be._places[damaged.digest]
    body[place.offset + place.length - 1] ^= 0xFF  # flip a byte of the damaged blob
    client.put_object(Bucket=bucket, Key=pack_key, Body=bytes(body))

    with caplog.at_level(logging.ERROR), be.lock(True):
        assert be.delete_blobs([dead.digest]) == 0
    assert "does not match its name" in caplog.text
    assert keys(s3_env, bucket, "store/packs/") == [pack_key]  # not rewritten, not deleted
    fresh = ChunkStore(backend(bucket, tmp_path, "b"))
    assert fresh.get_chunk(good.digest) == bytes([2]) * 5000 + b"xx"
    with pytest.raises(CorruptObject):  # still reported as damaged, not silently dropped
        fresh.get_chunk(damaged.digest)


# -- bounded zstd ------------------------------------------------------------------------------


def _bomb(declared: int) -> tuple[str, bytes]:
    """A zstd frame of 128 KiB of zeros whose header declares ``declared`` bytes."""
    plain = b"\0" * (1 << 17)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(plain)
    assert frame[4] == 0xA0  # single segment, 4-byte content size
    return digest_of(plain), frame[:4] + b"\xe0" + struct.pack("<Q", declared) + frame[9:]


def test_zstd_frames_declaring_too_much_are_refused(tmp_path) -> None:
    store = open_store(str(tmp_path / "store"))
    digest, frame = _bomb(1 << 40)
    store.backend.put_blob(digest, b"\x01" + frame)
    store.backend.flush()
    with pytest.raises(CorruptObject, match="declares"):  # unknown size: the general cap
        store.get_chunk(digest)
    with pytest.raises(CorruptObject, match="declares"):  # known size: the chunk's own
        store.read([ChunkRef(digest, 1 << 17)], [0], 0, 10)
    with pytest.raises(StoreError, match="declares"):
        packs.decode_index("index x", frame)


def test_a_chunk_may_not_decode_to_more_than_its_size(tmp_path) -> None:
    store = open_store(str(tmp_path / "store"))
    digest, frame = _bomb(1 << 17)  # honest header, but the entry says 1000 bytes
    store.backend.put_blob(digest, b"\x01" + frame)
    store.backend.flush()
    with pytest.raises(CorruptObject, match="more than 1000"):
        store.read([ChunkRef(digest, 1000)], [0], 0, 10)


# -- an unchanged file is reused only while the store has its chunks ---------------------------


def test_an_incremental_backup_reads_files_whose_chunks_are_gone(tmp_path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "kept").write_bytes(b"kept " * 3000)
    (vol / "lost").write_bytes(b"lost " * 3000)
    store = open_store(str(tmp_path / "store"))
    first = service.create_backup(store, "fence", vol)
    lost = store.write_bytes((vol / "lost").read_bytes())[0].digest
    lose_blob(store.backend, lost)  # as a prune under a lapsed lease would have done

    second = service.create_backup(store, "fence", vol)
    assert second.parent == first.id
    assert second.files_read == 1  # "lost" was read again, "kept" reused
    assert store.backend.has_blob(lost)  # written again: both backups are whole
    report = check_store(store, lambda: backup_roots(store.backend, None), read_data=True)
    assert report.ok, report.damage


def test_a_backup_is_not_published_without_its_lease(tmp_path, monkeypatch) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "f").write_bytes(b"f" * 100)
    store = open_store(str(tmp_path / "store"))

    def lapsed() -> None:
        raise LeaseLapsed("the lease on the store lapsed (test)")

    monkeypatch.setattr(store.backend, "check_lease", lapsed, raising=False)
    with pytest.raises(BackupError, match="not published: the lease on the store lapsed"):
        service.create_backup(store, "fence", vol)
    assert store.backend.list_docs("backups/") == []
