"""The import's pipeline parts: forward-only reader, read-ahead thread, background writes."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import threading
from pathlib import Path

import pytest

from layerfs.errors import StoreError
from layerfs.formats.readahead import LayerReader
from layerfs.formats.streams import ForwardReader
from layerfs.store import open_store
from layerfs.store.background import BackgroundBatches
from layerfs.store.chunks import ChunkStore, WriteStats
from layerfs.store.local import LocalBackend
from tests.support.repos import same_key_store


class _Breaks(io.RawIOBase):
    """Serves ``good`` bytes, then raises on the next read."""

    def __init__(self, good: bytes) -> None:
        self.inner = io.BytesIO(good)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        data = self.inner.read(n)
        if not data:
            raise OSError("the disk went away")
        return data


def _read_all(reader: LayerReader) -> bytes:
    parts = []
    while chunk := reader.read(100_000):
        parts.append(chunk)
    return b"".join(parts)


def test_forward_reader_reads_seeks_and_hashes_everything() -> None:
    data = os.urandom(3 << 20)
    r = ForwardReader(io.BytesIO(data), hashing=True, block=1 << 16, piece=4096)
    assert r.read(10) == data[:10]
    assert r.seek(100) == 100 and r.tell() == 100
    assert r.read(200_000) == data[100:200_100]  # larger than the block: bypasses the buffer
    r.seek(5, io.SEEK_CUR)
    assert r.read(7) == data[200_105:200_112]
    with pytest.raises(io.UnsupportedOperation):
        r.seek(0)
    r.seek(len(data) + 10)  # past the end: later reads are empty
    assert r.read(5) == b""
    r.drain()
    assert r.digest() == "sha256:" + hashlib.sha256(data).hexdigest()


def test_forward_reader_reports_an_error_where_the_bytes_are_missing() -> None:
    good = os.urandom(50_000)
    r = ForwardReader(_Breaks(good), hashing=False, block=1 << 20, piece=1000)
    assert r.read(10) == good[:10]  # the buffer fill met the error, but these bytes exist
    assert r.read(40_000) == good[10:40_010]
    with pytest.raises(OSError, match="went away"):
        r.read(20_000)


@pytest.mark.parametrize("compress", [False, True])
def test_layer_reader_gives_plain_bytes_and_both_digests(compress: bool) -> None:
    plain = os.urandom(1 << 20) + b"a" * (3 << 20)
    given = gzip.compress(plain) if compress else plain
    seen: list[int] = []
    reader = LayerReader(io.BytesIO(given), seen.append)
    try:
        assert _read_all(reader) == plain
    finally:
        reader.close()
    assert reader.compression == ("gzip" if compress else "none")
    assert reader.blob_digest == "sha256:" + hashlib.sha256(given).hexdigest()
    assert reader.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert sum(seen) == len(given)


def test_layer_reader_raises_the_threads_error_after_the_good_bytes() -> None:
    good = os.urandom(300_000)
    reader = LayerReader(_Breaks(good))  # type: ignore[arg-type]
    got = b""
    try:
        with pytest.raises(OSError, match="went away"):
            while chunk := reader.read(70_000):
                got += chunk
    finally:
        reader.close()
    assert got == good


def test_layer_reader_closed_early_stops_its_thread() -> None:
    reader = LayerReader(io.BytesIO(os.urandom(64 << 20)), depth=2)
    assert reader.read(10)
    reader.close()
    assert not any(t.name == "layerfs-layer-read" and t.is_alive() for t in threading.enumerate())


def test_background_batches_run_every_item_and_keep_the_first_error() -> None:
    done: list[int] = []
    lock = threading.Lock()

    def handler(batch: list[int]) -> None:
        if 13 in batch:
            raise ValueError("thirteen")
        with lock:
            done.extend(batch)

    jobs: BackgroundBatches[int] = BackgroundBatches(handler, workers=2, depth=2, batch_count=5)
    try:
        for i in range(10):
            jobs.add(i)
        jobs.wait()
        assert sorted(done) == list(range(10))
        for i in range(10, 20):
            jobs.add(i)
        with pytest.raises(ValueError, match="thirteen"):
            jobs.wait()
        with pytest.raises(ValueError, match="thirteen"):
            jobs.add(99)  # nothing more is accepted after a failure
    finally:
        jobs.close()


def test_background_writes_store_what_plain_writes_store(tmp_path: Path) -> None:
    data = [os.urandom(n) for n in (10, 20_000, 700_000, 3 << 20)]
    data.append(data[2])  # a duplicate inside one session
    plain = open_store(str(tmp_path / "a"))
    background = same_key_store(tmp_path / "a", tmp_path / "b")  # equal content, equal IDs
    plain_stats, bg_stats = WriteStats(), WriteStats()
    want = [plain.write_bytes(d, plain_stats) for d in data]
    plain.flush()
    with background.background_writes():
        got = [background.write_stream(io.BytesIO(d), bg_stats) for d in data]
        background.flush()
    assert got == want
    assert bg_stats == plain_stats
    assert sorted(background.backend.iter_blobs()) == sorted(plain.backend.iter_blobs())
    for refs, d in zip(got, data, strict=True):
        assert b"".join(background.iter_content(refs)) == d
    assert os.listdir(tmp_path / "b" / "tmp") == []  # the writer's temp directory is gone


class _FailingBackend(LocalBackend):
    def put_blob(self, digest: str, data: bytes, kind: str = "data") -> bool:
        raise StoreError("no space left on the store's disk while writing a test object")


def test_a_failed_background_write_surfaces_and_lists_nothing(tmp_path: Path) -> None:
    store = ChunkStore(_FailingBackend(tmp_path / "s"))
    with pytest.raises(StoreError, match="no space left"), store.background_writes():
        store.write_bytes(os.urandom(1 << 20))
        store.flush()
    assert list(store.backend.iter_blobs()) == []


def test_clean_tmp_removes_killed_writers_directories(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "s")
    left = tmp_path / "s" / "tmp" / "b-1-dead"
    left.mkdir()
    (left / "0").write_bytes(b"half a chunk")
    (tmp_path / "s" / "tmp" / "w-doc").write_bytes(b"half a doc")
    with backend.lock(exclusive=True):
        assert backend.clean_tmp() == 3
    assert os.listdir(tmp_path / "s" / "tmp") == []
