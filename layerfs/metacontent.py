"""Store the content of a file of a layerfs upper tree without reading it through the mount.

An ordinary upper file holds all its bytes and is chunked as it is. A
metacopy file (layerfs.fs.upper) holds only the byte ranges written since its
copy-up; the rest is the lower file's. Every lower chunk that lies wholly in
the unwritten part (and below the current size) keeps its chunk reference, so
a chmod of a 1 GB file reads nothing and a 1-byte write re-stores one chunk.
The bytes in between (materialized ranges, partly written chunks, anything
past the lower end) are gathered in order and chunked like new data.
A small file's whole content can be had as bytes instead (``metacopy_bytes``),
for records that keep it inline.
"""

from __future__ import annotations

import os

from layerfs.fs.upper import MetaCopy
from layerfs.records import Entry
from layerfs.store.chunks import ChunkRef, ChunkStore, WriteStats

PENDING_LIMIT = 8 << 20  # new bytes gathered before they are chunked and stored
READ_PIECE = 1 << 20


class _Gather:
    """New bytes in file order, chunked and stored in pieces of PENDING_LIMIT."""

    def __init__(self, store: ChunkStore, stats: WriteStats | None, out: list[ChunkRef]) -> None:
        self.store, self.stats, self.out = store, stats, out
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        if data:
            self.parts.append(data)
            self.size += len(data)
            if self.size >= PENDING_LIMIT:
                self.flush()

    def flush(self) -> None:
        if self.parts:
            self.out.extend(self.store.write_bytes(b"".join(self.parts), self.stats))
            self.parts, self.size = [], 0

    def add_upper(self, fd: int, start: int, end: int) -> None:
        """Add the upper file's bytes [start, end), read in pieces."""
        pos = start
        while pos < end:
            data = os.pread(fd, min(READ_PIECE, end - pos), pos)
            if not data:  # the file shrank meanwhile: the rest reads as zeros
                data = bytes(min(READ_PIECE, end - pos))
            self.add(data)
            pos += len(data)


def store_metacopy(
    store: ChunkStore,
    fd: int,
    size: int,
    meta: MetaCopy,
    lower: Entry,
    stats: WriteStats | None = None,
) -> list[ChunkRef]:
    """The chunk list of a metacopy upper file (open as ``fd``, ``size`` bytes long).

    ``lower`` is the entry of its origin in the lower layers, with its chunks
    (or inline bytes).
    """
    out: list[ChunkRef] = []
    gather = _Gather(store, stats, out)
    if lower.inline is not None:
        pieces = [(ChunkRef("", len(lower.inline)), lower.inline)]
    else:
        pieces = [(ref, None) for ref in lower.chunks]
    pos = 0
    for ref, inline in pieces:
        start, end = pos, pos + ref.size
        pos = end
        if start >= size:
            break
        if inline is None and end <= size and meta.missing(start, end) == [(start, end)]:
            gather.flush()
            out.append(ref)
            continue
        stop = min(end, size)
        plain: bytes | None = inline
        cur = start
        for a, b in meta.missing(start, stop):
            if a > cur:
                gather.add_upper(fd, cur, a)
            if plain is None:
                plain = store.get_chunk(ref.digest)
            gather.add(plain[a - start : b - start])
            cur = b
        if cur < stop:
            gather.add_upper(fd, cur, stop)
    if pos < size:  # past the lower end: written bytes or zeros, as the upper file holds
        gather.add_upper(fd, pos, size)
    gather.flush()
    return out


def metacopy_bytes(store: ChunkStore, fd: int, size: int, meta: MetaCopy, lower: Entry) -> bytes:
    """The whole content of a metacopy upper file (``size`` bytes, open as ``fd``).

    The same bytes ``store_metacopy`` stores, read into memory: for small files.
    """
    out = bytearray(os.pread(fd, size, 0).ljust(size, b"\0"))  # a shrunk file reads as zeros
    if lower.inline is not None:
        base = lower.inline[:size]
    else:
        refs: list[ChunkRef] = []
        covered = 0
        for ref in lower.chunks:
            if covered >= size:
                break
            refs.append(ref)
            covered += ref.size
        base = b"".join(store.iter_content(refs))[:size]
    for a, b in meta.missing(0, len(base)):
        out[a:b] = base[a:b]
    return bytes(out)
