"""CacheFiller.open_written: reads of a content being written wait for its bytes and
read them from the file being written (the store and view are fakes here; the real
path is covered by the kernel mount tests)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from layerfs.content.cache import ContentCache, content_id
from layerfs.content.fill import CacheFiller
from tests.support.waiting import wait_for


class _GatedStore:
    """Gives a content's parts one at a time, each when the test lets it through."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.gates = [threading.Event() for _ in parts]

    def stream_content(self, refs):  # noqa: ANN001, ANN201 - a ChunkStore's signature
        for part, gate in zip(self.parts, self.gates, strict=True):
            assert gate.wait(30)
            yield part


class _View:
    def content_refs(self, packed: bytes) -> list:
        return []


def test_a_read_of_the_content_being_written_gets_its_bytes_before_the_end(tmp_path: Path):
    parts = [os.urandom(100_000), os.urandom(50_000), os.urandom(70_000)]
    whole = b"".join(parts)
    store = _GatedStore(parts)
    cache = ContentCache(tmp_path / "cache")
    filler = CacheFiller(_View(), store, cache, walk=False)  # type: ignore[arg-type]
    packed = b"\x01" * 40
    cid = content_id(packed, None)
    assert filler.open_written(cid, 10) is None  # nothing being written yet
    assert not filler.writes(cid)

    writer = threading.Thread(target=filler.fill, args=(1, len(whole), None, packed))
    writer.start()
    store.gates[0].set()
    fd = wait_for(lambda: filler.open_written(cid, 100_000), "the write to start", timeout=30)
    assert filler.writes(cid) and not filler.writes("another-content-id!")
    try:
        assert os.pread(fd, 100_000, 0) == parts[0]
    finally:
        os.close(fd)
    assert filler.open_written("another-content-id!", 1) is None

    got: list[int | None] = []
    waiting = threading.Thread(target=lambda: got.append(filler.open_written(cid, 150_001)))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # byte 150,000 is not written yet
    store.gates[1].set()
    store.gates[2].set()
    waiting.join(30)
    writer.join(30)
    # the third part came: either read from the temp file, or the content is in place
    if got[0] is not None:
        try:
            assert os.pread(got[0], len(whole), 0)[:150_001] == whole[:150_001]
        finally:
            os.close(got[0])
    assert cache.path(cid).read_bytes() == whole
    assert filler.open_written(cid, 1) is None  # written: read it from the cache
    assert not filler.writes(cid)


def test_a_write_that_fails_lets_its_readers_go(tmp_path: Path):
    store = _GatedStore([b"x" * 1000, b"y" * 10])  # 1,010 bytes where 5,000 are promised
    cache = ContentCache(tmp_path / "cache")
    filler = CacheFiller(_View(), store, cache, walk=False)  # type: ignore[arg-type]
    packed = b"\x02" * 40
    cid = content_id(packed, None)
    writer = threading.Thread(target=filler.fill, args=(1, 5000, None, packed))
    writer.start()
    got: list[int | None] = []
    waiting = threading.Thread(target=lambda: got.append(filler.open_written(cid, 4000)))
    waiting.start()
    for gate in store.gates:
        gate.set()
    waiting.join(30)
    writer.join(30)
    assert got == [None] and filler.failed == 1 and not cache.has(cid)


class _Index:
    name = "image-index.sqlite"


class _WalkedView:
    """An image of three small files, counting the walks over it."""

    index = _Index()

    def __init__(self) -> None:
        self.files = [(i, 5, f"file{i}".encode(), None) for i in (1, 2, 3)]
        self.walks = 0

    def file_contents(self):  # noqa: ANN201 - an ImageView's signature
        self.walks += 1
        yield from self.files

    def content_refs(self, packed: bytes) -> list:
        return []


def _walk_once(view: _WalkedView, cache: ContentCache, filled: list | None = None) -> CacheFiller:
    on_filled = filled.append if filled is not None else None
    filler = CacheFiller(view, None, cache, on_filled)  # type: ignore[arg-type] - inline only
    filler.start()
    wait_for(lambda: view.walks and filler.cache.complete(view.index.name), "the walk")
    filler.close()
    return filler


def test_a_walk_that_found_every_content_is_not_made_again_until_an_eviction(tmp_path: Path):
    cache = ContentCache(tmp_path / "cache")
    view = _WalkedView()
    filled: list = []
    first = _walk_once(view, cache, filled)
    assert first.written == 3 and view.walks == 1
    assert cache.complete(view.index.name)
    wait_for(lambda: filled, "the trim after the fill")
    assert filled == [view.index]  # the trim keeps the image just filled

    second = CacheFiller(view, None, cache)  # type: ignore[arg-type]
    second.start()
    second.close()
    assert view.walks == 1 and second.written == 0  # the stamp stands: no walk

    removed = cache.evict(0, keep=set())  # contents go: the stamp no longer holds
    assert removed.files == 3 and not cache.complete(view.index.name)
    third = _walk_once(view, cache)
    assert view.walks == 2 and third.written == 3
    assert sorted(p.name for p in cache.data_dir.rglob("*") if p.is_file()) == sorted(
        content_id(None, inline) for _i, _s, inline, _p in view.files
    )


def test_an_eviction_during_a_walk_leaves_no_stamp(tmp_path: Path):
    cache = ContentCache(tmp_path / "cache")
    generation = cache.generation()
    cache.put(content_id(None, b"x"), 1, [b"x"])
    cache.evict(0, keep=set())  # between the walk's start and its end
    cache.stamp_complete("image-index.sqlite", generation)
    assert not cache.complete("image-index.sqlite")
