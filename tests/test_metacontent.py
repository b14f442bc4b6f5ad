"""Committing a metacopy upper file keeps the lower chunks it did not rewrite."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from layerfs.fs.upper import MetaCopy
from layerfs.metacontent import metacopy_bytes, store_metacopy
from layerfs.records import Entry, Kind
from layerfs.store.chunks import WriteStats, chunk_offsets
from layerfs.store.location import open_store


def _lower(store, data: bytes) -> Entry:
    entry = Entry("big", Kind.FILE, size=len(data))
    entry.chunks = store.write_bytes(data)
    return entry


def _content(store, refs) -> bytes:
    return b"".join(store.iter_content(refs))


@pytest.fixture
def setup(tmp_path: Path):
    store = open_store(str(tmp_path / "store"))
    data = random.Random(7).randbytes(3 << 20)
    lower = _lower(store, data)
    assert len(lower.chunks) > 8
    return store, data, lower, tmp_path / "upper-file"


def _upper(path: Path, size: int, writes: list[tuple[int, bytes]]) -> int:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, size)
    for offset, data in writes:
        os.pwrite(fd, data, offset)
    return fd


def test_untouched_metacopy_reuses_every_lower_chunk(setup) -> None:
    store, data, lower, path = setup
    fd = _upper(path, len(data), [])
    stats = WriteStats()
    try:
        refs = store_metacopy(store, fd, len(data), MetaCopy("big"), lower, stats)
    finally:
        os.close(fd)
    assert refs == lower.chunks
    assert stats.chunks == 0, "nothing is read or chunked again"


def test_written_chunk_is_new_the_others_are_reused(setup) -> None:
    store, data, lower, path = setup
    starts = chunk_offsets(lower.chunks)
    a, b = starts[3], starts[4]  # image mode materializes whole chunks
    new = bytearray(data)
    new[a + 5 : a + 6] = b"x"
    fd = _upper(path, len(data), [(a, bytes(new[a:b]))])
    try:
        refs = store_metacopy(store, fd, len(data), MetaCopy("big", [[a, b]]), lower, None)
    finally:
        os.close(fd)
    assert _content(store, refs) == bytes(new)
    kept = set(lower.chunks) & set(refs)
    assert len(kept) == len(lower.chunks) - 1


def test_partial_ranges_truncation_and_growth(setup) -> None:
    store, data, lower, path = setup
    # a write inside a chunk (not whole-chunk), then the file cut and grown past the lower end
    cut = len(data) - 100_000
    grown = len(data) + 70_000
    new = bytearray(data[:cut]) + bytearray(grown - cut)
    new[1000:1010] = b"0123456789"
    new[grown - 5 :] = b"tail!"
    fd = _upper(path, grown, [(1000, b"0123456789"), (grown - 5, b"tail!")])
    meta = MetaCopy("big", [[1000, 1010]])
    meta.add(cut, 1 << 62)
    try:
        refs = store_metacopy(store, fd, grown, meta, lower, None)
    finally:
        os.close(fd)
    assert _content(store, refs) == bytes(new)


def test_inline_lower(setup) -> None:
    store, _data, _lower_entry, path = setup
    lower = Entry("small", Kind.FILE, size=5, inline=b"hello")
    fd = _upper(path, 8, [(5, b"!!!")])
    try:
        refs = store_metacopy(store, fd, 8, MetaCopy("small", [[5, 1 << 62]]), lower, None)
    finally:
        os.close(fd)
    assert _content(store, refs) == b"hello!!!"


@pytest.mark.parametrize(
    ("size", "writes", "ranges"),
    [
        (1000, [], []),  # untouched, cut short
        (1000, [(10, b"0123")], [[10, 14]]),
        (0, [], []),
        (3 << 20, [(5, b"!")], [[0, 70_000]]),  # the whole file, one range written
    ],
)
def test_metacopy_bytes_are_what_store_metacopy_stores(setup, size, writes, ranges) -> None:
    store, data, lower, path = setup
    new = bytearray(data[:size])
    for offset, piece in writes:
        new[offset : offset + len(piece)] = piece
    fd = _upper(path, size, [(0, bytes(new[:70_000]))] if ranges == [[0, 70_000]] else writes)
    try:
        meta = MetaCopy("big", ranges)
        whole = metacopy_bytes(store, fd, size, meta, lower)
        stored = _content(store, store_metacopy(store, fd, size, meta, lower, None))
    finally:
        os.close(fd)
    assert whole == stored == bytes(new)


def test_metacopy_bytes_of_inline_lower_grown(setup) -> None:
    store, _data, _lower_entry, path = setup
    lower = Entry("small", Kind.FILE, size=5, inline=b"hello")
    fd = _upper(path, 9, [(5, b"!!!")])
    try:
        got = metacopy_bytes(store, fd, 9, MetaCopy("small", [[5, 1 << 62]]), lower)
    finally:
        os.close(fd)
    assert got == b"hello!!!\0"
