"""Bulk one-pass reads (restore's path): range planning and the S3 store.

The S3 part runs against the real Ceph RADOS Gateway: every chunk arrives once
and verified, in far fewer GETs than chunks, without touching the local disk
cache, on the caller's thread while later ranges are fetched ahead; an error from
the caller stops the reading; a missing pack fails only its own chunks, naming the
pack; chunks not yet uploaded come from memory.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from layerfs.errors import CorruptObject, ObjectMissing
from layerfs.store import s3read
from layerfs.store.chunks import ChunkStore, digest_of
from layerfs.store.packs import BlobPlace
from layerfs.store.s3 import S3Backend
from tests.support import ceph


def _place(pack: str, offset: int, length: int) -> BlobPlace:
    return BlobPlace(pack, offset, length)


def test_ranges_split_at_gaps_and_size_and_follow_the_callers_order() -> None:
    places = {
        "a1": _place("A", 8, 100),
        "a2": _place("A", 108, 100),  # adjacent: same range
        "a3": _place("A", 108 + 100 + 50, 100),  # small gap: same range
        "a4": _place("A", 5000, 100),  # large gap: new range
        "b1": _place("B", 8, 100),
        "b2": _place("B", 108, 901),  # would pass range_max: new range
    }
    order = ["b1", "b2", "a4", "a1", "a2", "a3"]
    ranges = s3read.plan_ranges(order, places, range_max=1000, gap=64)
    assert [(r.pack, r.start, r.end) for r in ranges] == [
        ("B", 8, 108),
        ("B", 108, 1009),
        ("A", 5000, 5100),
        ("A", 8, 358),
    ]
    assert [d for d, _, _ in ranges[3].blobs] == ["a1", "a2", "a3"]
    covered = sorted(d for r in ranges for d, _, _ in r.blobs)
    assert covered == sorted(places)


# -- against the RGW ----------------------------------------------------------------


@pytest.fixture
def bucket(s3_env):
    name = ceph.new_bucket(s3_env, "bulk")
    yield name
    ceph.remove_bucket(s3_env, name)


def _collect(store: ChunkStore, wanted: dict[str, int], workers: int = 4):
    got: dict[str, bytes] = {}
    failed: dict[str, Exception] = {}
    mutex = threading.Lock()

    def consume(digest: str, data: bytes) -> None:
        with mutex:
            assert digest not in got, "a chunk was handed out twice"
            got[digest] = bytes(data)

    def fail(digest: str, exc: Exception) -> None:
        with mutex:
            failed[digest] = exc

    store.read_chunks(wanted, consume, fail, workers)
    return got, failed


def _blob_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.s3
def test_read_chunks_from_s3_few_gets_no_disk_cache(s3_env, bucket, tmp_path) -> None:
    text = b"".join(b"line %d of some text\n" % i for i in range(200_000))
    data = os.urandom(3 << 20) + text + bytes(1 << 20)
    writer = ChunkStore(S3Backend(bucket, "p", cache_root=tmp_path / "w", pack_size=1 << 20))
    refs = writer.write_bytes(data)
    writer.flush()
    wanted = {ref.digest: ref.size for ref in refs}
    assert len(wanted) > 40

    backend = S3Backend(bucket, "p", cache_root=tmp_path / "r")
    got, failed = _collect(ChunkStore(backend), wanted)
    assert failed == {}
    assert b"".join(got[ref.digest] for ref in refs) == data
    gets = backend.stats.requests["GetObject"]
    assert 0 < gets < len(wanted) // 4
    assert _blob_files(backend.cache_dir() / "blobs") == []


@pytest.mark.s3
def test_missing_pack_fails_only_its_chunks(s3_env, bucket, tmp_path) -> None:
    writer = ChunkStore(S3Backend(bucket, "p", cache_root=tmp_path / "w", pack_size=300_000))
    refs = writer.write_bytes(os.urandom(2 << 20))
    writer.flush()
    backend = S3Backend(bucket, "p", cache_root=tmp_path / "r")
    backend.refresh()
    gone_pack = backend._places[refs[0].digest].pack
    s3_env.client().delete_object(Bucket=bucket, Key=f"p/{backend._pack_rel(gone_pack)}")
    in_gone = {r.digest for r in refs if backend._places[r.digest].pack == gone_pack}
    assert 0 < len(in_gone) < len(refs)

    unknown = digest_of(b"never stored")
    wanted = {r.digest: r.size for r in refs} | {unknown: 12}
    got, failed = _collect(ChunkStore(backend), wanted)
    assert set(failed) == in_gone | {unknown}
    assert all(isinstance(failed[d], ObjectMissing) for d in failed)
    assert gone_pack in str(failed[refs[0].digest])
    assert set(got) == set(wanted) - set(failed)


@pytest.mark.s3
def test_pending_chunks_come_from_memory_and_wrong_sizes_fail(bucket, tmp_path) -> None:
    backend = S3Backend(bucket, "p", cache_root=tmp_path / "w")
    store = ChunkStore(backend)
    refs = store.write_bytes(os.urandom(600_000))  # not flushed: only in this process
    wanted = {r.digest: r.size for r in refs}
    wrong = refs[0]
    wanted[wrong.digest] = wrong.size + 1
    got, failed = _collect(store, wanted)
    assert backend.stats.requests["GetObject"] == 0
    assert set(failed) == {wrong.digest} and isinstance(failed[wrong.digest], CorruptObject)
    assert set(got) == set(wanted) - {wrong.digest}
    backend.close()


@pytest.mark.s3
def test_chunks_come_on_the_callers_thread_and_its_error_stops_the_reads(bucket, tmp_path) -> None:
    writer = ChunkStore(S3Backend(bucket, "p", cache_root=tmp_path / "w", pack_size=1 << 20))
    refs = writer.write_bytes(os.urandom(24 << 20))
    writer.flush()
    wanted = {ref.digest: ref.size for ref in refs}

    backend = S3Backend(bucket, "p", cache_root=tmp_path / "r")
    threads: set[int] = set()
    failed: list[str] = []
    ChunkStore(backend).read_chunks(
        wanted, lambda d, data: threads.add(threading.get_ident()), failed.append, workers=4
    )
    assert failed == [] and threads == {threading.get_ident()}
    backend.close()

    backend = S3Backend(bucket, "p", cache_root=tmp_path / "r2")
    backend.refresh()  # the index reads
    ranges = backend.stats.requests["GetObject"]
    seen: list[str] = []

    def full(digest: str, data: bytes) -> None:
        seen.append(digest)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        ChunkStore(backend).read_chunks(wanted, full, failed.append, workers=2)
    ranges = backend.stats.requests["GetObject"] - ranges
    assert len(seen) == 1 and failed == []
    assert 1 <= ranges <= 4, f"{ranges} range reads after the first chunk failed"
    backend.close()
