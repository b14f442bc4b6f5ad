"""The S3 store against the real Ceph RADOS Gateway: packs, indexes, reads, repack, damage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.errors import CorruptObject, ObjectMissing, StoreError
from layerfs.store.chunks import ChunkStore, chunk_offsets, digest_of
from layerfs.store.location import open_raw_backend
from layerfs.store.s3 import S3Backend
from tests.support import ceph

pytestmark = pytest.mark.s3
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bucket(s3_env):
    name = ceph.new_bucket(s3_env, "store")
    yield name
    ceph.remove_bucket(s3_env, name)


def backend(bucket: str, tmp_path: Path, name: str = "a", **kwargs) -> S3Backend:
    return S3Backend(bucket, "store", cache_root=tmp_path / f"cache-{name}", **kwargs)


def blob(i: int, size: int = 1000) -> tuple[str, bytes]:
    unit = f"blob {i} ".encode()
    data = (unit * (size // len(unit) + 1))[:size]
    return digest_of(data), data


def keys(s3_env, bucket: str, prefix: str) -> list[str]:
    pages = s3_env.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_blobs_roundtrip_across_flushes(bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path)
    first = [blob(i) for i in range(50)]
    for d, data in first:
        assert be.put_blob(d, data)
    assert be.get_blob(first[3][0]) == first[3][1]  # pending, read from memory
    be.flush()
    second = [blob(i) for i in range(50, 80)]
    for d, data in second:
        assert be.put_blob(d, data)
    assert not be.put_blob(*first[0])  # already durable
    be.flush()

    fresh = backend(bucket, tmp_path, "b")
    for d, data in first + second:
        assert fresh.has_blob(d)
        assert fresh.get_blob(d) == data
    assert dict(fresh.iter_blobs()) == {d: len(data) for d, data in first + second}
    assert not fresh.has_blob(blob(999)[0])
    with pytest.raises(ObjectMissing):
        fresh.get_blob(blob(999)[0])

    freed = fresh.delete_blobs([d for d, _ in first])
    assert freed == sum(len(data) for _, data in first)
    again = backend(bucket, tmp_path, "c")
    assert not again.has_blob(first[0][0])
    assert again.get_blob(second[0][0]) == second[0][1]
    be.close()


def test_unflushed_blobs_are_invisible(bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path)
    d, data = blob(1)
    be.put_blob(d, data)
    assert not backend(bucket, tmp_path, "b").has_blob(d)
    be.flush()
    assert backend(bucket, tmp_path, "c").has_blob(d)


def test_chunk_store_ranges_and_cache(bucket, tmp_path) -> None:
    data = os.urandom(3 << 20) + bytes(2 << 20)
    writer = ChunkStore(backend(bucket, tmp_path, pack_size=1 << 20))
    refs = writer.write_bytes(data)
    writer.flush()

    reader_backend = backend(bucket, tmp_path, "r")
    reader = ChunkStore(reader_backend, cache_bytes=0)
    offsets = chunk_offsets(refs)
    for offset, size in ((0, 10), (12345, 300000), ((3 << 20) - 5, 10), (len(data) - 7, 100)):
        assert reader.read(refs, offsets, offset, size) == data[offset : offset + size]
    assert b"".join(reader.iter_content(refs)) == data
    gets = reader_backend.stats.requests["GetObject"]
    assert 0 < gets < len(refs) // 4  # one range GET brings the chunks that follow too
    # the local cache serves a second pass: no more GETs
    assert b"".join(reader.iter_content(refs)) == data
    assert reader_backend.stats.requests["GetObject"] == gets
    assert reader_backend.cache.hits >= len(refs)
    # one pass in order (a layer tar, the content cache's fill): cached chunks need no GET
    assert b"".join(reader.stream_content(refs)) == data
    assert reader_backend.stats.requests["GetObject"] == gets
    # and chunks not cached come with range GETs, not one per chunk
    fresh = backend(bucket, tmp_path, "f")
    assert b"".join(ChunkStore(fresh, cache_bytes=0).stream_content(refs)) == data
    assert 0 < fresh.stats.requests["GetObject"] < len(refs) // 3


def test_packs_are_large_and_few(s3_env, bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path)
    store = ChunkStore(be)
    refs = store.write_bytes(os.urandom(40 << 20))
    store.flush()
    packs = keys(s3_env, bucket, "store/packs/")
    indexes = keys(s3_env, bucket, "store/index/")
    assert len(refs) > 300
    assert len(packs) == 2
    assert len(indexes) == 1
    sizes = [
        s3_env.client().head_object(Bucket=bucket, Key=k)["ContentLength"] for k in sorted(packs)
    ]
    assert max(sizes) >= 32 << 20
    snap = be.stats.snapshot()
    assert snap["packs_written"] == 2 and snap["indexes_written"] == 1
    assert snap["requests"]["PutObject"] == 2 + 1  # two packs, one index
    assert snap["bytes_up"] >= 40 << 20


_WRITER = """
import os, sys
from pathlib import Path
from layerfs.store.chunks import ChunkStore
from layerfs.store.packed import ORDERED_RANGE
from layerfs.store.s3 import S3Backend
bucket, seed, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
be = S3Backend(bucket, "store", cache_root=out.parent / ("cache-" + seed), pack_size=1 << 20)
store = ChunkStore(be)
with be.lock(False):
    refs = []
    for i in range(6):
        data = (seed * 7 + str(i)).encode() * 40000 + os.urandom(300000)
        refs += store.write_bytes(data)
        store.flush()
out.write_text("\\n".join(r.digest for r in refs))
"""


def test_two_processes_write_one_bucket(bucket, tmp_path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, bucket, seed, str(tmp_path / f"{seed}.txt")],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("alpha", "beta")
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    reader = ChunkStore(backend(bucket, tmp_path, "reader"))
    for seed in ("alpha", "beta"):
        digests = (tmp_path / f"{seed}.txt").read_text().split()
        assert len(digests) > 10
        for d in digests:
            reader.get_chunk(d)  # verified against its digest
    assert len(reader.backend.pack_names()) >= 4


def test_missing_and_damaged_packs_name_the_pack(s3_env, bucket, tmp_path) -> None:
    writer = ChunkStore(backend(bucket, tmp_path, pack_size=300000))
    refs = writer.write_bytes(os.urandom(2 << 20))
    writer.flush()
    be = backend(bucket, tmp_path, "r", cache_bytes=0)
    store = ChunkStore(be)
    client = s3_env.client()
    be.refresh()
    by_pack: dict[str, str] = {}
    for ref in refs:
        by_pack.setdefault(be._pack_rel(be._places[ref.digest].pack), ref.digest)
    assert len(by_pack) >= 3
    (gone, d_gone), (short, d_short), (bad, d_bad) = list(by_pack.items())[:3]

    client.delete_object(Bucket=bucket, Key=f"store/{gone}")
    with pytest.raises(ObjectMissing, match=gone):
        store.get_chunk(d_gone)

    data = client.get_object(Bucket=bucket, Key=f"store/{short}")["Body"].read()
    client.put_object(Bucket=bucket, Key=f"store/{short}", Body=data[:100])
    with pytest.raises(StoreError, match=short):
        store.get_chunk(d_short)

    # wrong bytes of the right length: the ChunkStore's digest check catches them
    place = be._places[d_bad]
    data = bytearray(client.get_object(Bucket=bucket, Key=f"store/{bad}")["Body"].read())
    for i in range(place.offset + 10, place.offset + 200):
        data[i] ^= 0xFF
    client.put_object(Bucket=bucket, Key=f"store/{bad}", Body=bytes(data))
    with pytest.raises(CorruptObject, match=d_bad):
        store.get_chunk(d_bad)


def test_repack_keeps_live_blobs_and_drops_dead_packs(s3_env, bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path, pack_size=20000)
    blobs = [blob(i, 6000) for i in range(12)]  # 4 blobs per pack: 3 packs
    for d, data in blobs:
        be.put_blob(d, data)
    be.flush()
    old_packs = set(keys(s3_env, bucket, "store/packs/"))
    old_index = set(keys(s3_env, bucket, "store/index/"))
    assert len(old_packs) == 3
    dead = [blobs[i][0] for i in (0, 1, 2, 3, 5)]  # the whole first pack, one of the second
    with be.lock(True):
        assert be.delete_blobs(dead) == 5 * 6000
    packs_now = set(keys(s3_env, bucket, "store/packs/"))
    assert len(packs_now & old_packs) == 1  # the untouched third pack
    assert len(packs_now - old_packs) == 1  # the second pack's live blobs, repacked
    assert not set(keys(s3_env, bucket, "store/index/")) & old_index
    fresh = backend(bucket, tmp_path, "b")
    for i, (d, data) in enumerate(blobs):
        if d in dead:
            assert not fresh.has_blob(d)
        else:
            assert fresh.get_blob(d) == data, i


def test_exclusive_lock_removes_unindexed_packs(s3_env, bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path, pack_size=20000, unindexed_grace=0)
    for i in range(8):
        be.put_blob(*blob(i, 6000))
    be.flush()
    orphan = "store/packs/ff/ff" + "0" * 30
    s3_env.client().put_object(Bucket=bucket, Key=orphan, Body=b"left by a crashed writer")
    with be.lock(True):
        be.delete_blobs([blob(0, 6000)[0]])
    assert orphan not in keys(s3_env, bucket, "store/packs/")
    assert backend(bucket, tmp_path, "b").get_blob(blob(7, 6000)[0]) == blob(7, 6000)[1]


def test_docs_are_plain_objects(s3_env, bucket, tmp_path) -> None:
    be = open_raw_backend(f"s3://{bucket}/store")  # the backend as stored, no repository
    assert isinstance(be, S3Backend)
    be.put_doc("images/one.json", b'{"a": 1}')
    be.put_doc("images/two.json", b"{}")
    be.put_doc("backups/x/y.json", b"[]")
    assert "store/docs/images/one.json" in keys(s3_env, bucket, "store/docs/")
    assert be.list_docs("images/") == ["images/one.json", "images/two.json"]
    assert be.get_doc("backups/x/y.json") == b"[]"
    be.delete_doc("images/one.json")
    be.delete_doc("images/one.json")
    with pytest.raises(ObjectMissing, match="images/one.json"):
        be.get_doc("images/one.json")


def test_request_counter(bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path)
    before = be.stats.total_requests
    be.put_doc("a", b"1")
    be.get_doc("a")
    assert be.stats.requests["PutObject"] >= 1
    assert be.stats.requests["GetObject"] == 1
    assert be.stats.total_requests >= before + 2
    assert be.stats.attempts >= be.stats.total_requests


def test_unreachable_endpoint_is_one_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    be = S3Backend("s3-nowhere", "p", cache_root=tmp_path)
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
        be.get_doc("images/x.json")


@pytest.mark.docker
def test_cli_on_an_s3_store(s3_env, bucket, busybox_image, tmp_path) -> None:
    env = dict(os.environ, LAYERFS_CACHE_DIR=str(tmp_path / "cache"))
    url = f"s3://{bucket}/cli"
    layerfs = [str(Path(sys.executable).parent / "layerfs")]
    imp = subprocess.run(
        [*layerfs, "--store", url, "import", "--from-docker", busybox_image, "--tag", "s3-bb"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert imp.returncode == 0, imp.stderr
    listing = subprocess.run(
        [*layerfs, "images", "--json"],
        capture_output=True,
        text=True,
        env=dict(env, LAYERFS_STORE=url),
        cwd=ROOT,
    )
    assert listing.returncode == 0, listing.stderr
    assert [row["name"] for row in json.loads(listing.stdout)] == ["s3-bb:latest"]
    assert keys(s3_env, bucket, "cli/packs/")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*layerfs, "--store", url, *args], capture_output=True, text=True, env=env, cwd=ROOT
        )
        assert proc.returncode == 0, proc.stderr
        return proc

    run("rmi", "s3-bb:latest")  # its layers go with it: no other image uses them
    store = S3Backend.from_url(url, cache_root=tmp_path / "c")
    assert store.list_docs("layers/") == []
    proc = run("gc", "--grace", "0", "--json")
    assert json.loads(proc.stdout)["removed"] > 0
    assert keys(s3_env, bucket, "cli/packs/") == []  # every pack was dead: deleted whole
    assert keys(s3_env, bucket, "cli/locks/") == []


def test_index_rebuilt_from_pack_trailers(s3_env, bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path, pack_size=20000)
    blobs = [blob(i, 6000) for i in range(10)]
    for d, data in blobs:
        be.put_blob(d, data)
    be.flush()
    client = s3_env.client()
    for key in keys(s3_env, bucket, "store/index/"):
        client.delete_object(Bucket=bucket, Key=key)
    lost = backend(bucket, tmp_path, "b")
    assert not lost.has_blob(blobs[0][0])
    assert lost.rebuild_index() == 3
    fresh = backend(bucket, tmp_path, "c")
    for d, data in blobs:
        assert fresh.get_blob(d) == data


def test_indexes_are_merged(s3_env, bucket, tmp_path) -> None:
    be = backend(bucket, tmp_path)
    blobs = [blob(i) for i in range(6)]
    for d, data in blobs:
        be.put_blob(d, data)
        be.flush()  # one index per flush
    assert len(keys(s3_env, bucket, "store/index/")) == 6
    with be.lock(True):
        assert be.compact_indexes() == 6
    assert len(keys(s3_env, bucket, "store/index/")) == 1
    fresh = backend(bucket, tmp_path, "b")
    for d, data in blobs:
        assert fresh.get_blob(d) == data
