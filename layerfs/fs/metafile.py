"""Reading and writing a metacopy upper file: bytes from the lower file until materialized.

A MetaFile is shared by every open handle of one upper inode whose xattr
``trusted.layerfs.metacopy`` says which byte ranges the upper file holds (see
layerfs.fs.upper). Reads stitch materialized ranges (from the upper file) with
the rest (from the lower file). A write first copies the lower bytes of every
chunk it touches but does not cover, then writes, then records the new ranges,
so a failed write (ENOSPC) leaves the xattr describing bytes that are really
there. Once the ranges cover the file the xattr is dropped and the file is an
ordinary upper file.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable

from layerfs.fs.upper import X_METACOPY, MetaCopy, clear_metacopy
from layerfs.view import Node

END = 1 << 62  # "to the end of the file" in ranges
COPY_PIECE = 1 << 20
MAX_RANGES = 512  # beyond this the xattr gets large: materialize the whole file

LowerRead = Callable[[Node, int, int], bytes]
ChunkStarts = Callable[[Node], list[int]]


class MetaFile:
    """One metacopy upper inode, open through one or more handles."""

    def __init__(
        self,
        fd: int,
        meta: MetaCopy,
        node: Node | None,
        lower_read: LowerRead,
        chunk_starts: ChunkStarts,
    ) -> None:
        self.fd = fd  # O_RDWR on the upper file; owned by this object
        self.meta = meta
        self.node = node  # the lower origin (None: gone, reads as zeros)
        self.lower_read = lower_read
        self.chunk_starts = chunk_starts
        self.lock = threading.Lock()
        self.refs = 0
        self.done = False
        self._starts: list[int] | None = None

    @property
    def lower_size(self) -> int:
        return self.node.size if self.node is not None else 0

    # -- reading ---------------------------------------------------------------------
    def _lower(self, start: int, end: int) -> bytes:
        stop = min(end, self.lower_size)
        data = self.lower_read(self.node, start, stop - start) if stop > start else b""
        return data + bytes(end - start - len(data)) if len(data) < end - start else data

    def read(self, size: int, offset: int) -> bytes:
        if self.done:
            return os.pread(self.fd, size, offset)
        with self.lock:
            if self.done:
                return os.pread(self.fd, size, offset)
            end = min(offset + size, os.fstat(self.fd).st_size)
            if end <= offset:
                return b""
            parts = []
            pos = offset
            for a, b in self.meta.missing(offset, end):
                if a > pos:
                    parts.append(os.pread(self.fd, a - pos, pos))
                parts.append(self._lower(a, b))
                pos = b
            if pos < end:
                parts.append(os.pread(self.fd, end - pos, pos))
            return b"".join(parts)

    # -- writing ---------------------------------------------------------------------
    def _span(self, pos: int) -> tuple[int, int]:
        """The lower chunk holding byte ``pos`` (clipped to the lower size)."""
        if self._starts is None:
            self._starts = self.chunk_starts(self.node) if self.node is not None else [0]
        starts = self._starts
        i = max(bisect.bisect_right(starts, pos) - 1, 0)
        end = starts[i + 1] if i + 1 < len(starts) else self.lower_size
        return starts[i], min(end, self.lower_size)

    def _copy(self, start: int, end: int) -> None:
        """Copy lower bytes [start, end) into the upper file."""
        pos = start
        while pos < end:
            n = min(COPY_PIECE, end - pos)
            data = self._lower(pos, pos + n)
            _pwrite_all(self.fd, data, pos)
            pos += n

    def write(self, data: bytes, offset: int) -> int:
        if self.done:
            return os.pwrite(self.fd, data, offset)
        with self.lock:
            if self.done:
                return os.pwrite(self.fd, data, offset)
            end = offset + len(data)
            touched: list[tuple[int, int]] = []
            for a, b in self.meta.missing(offset, min(end, self.lower_size)):
                pos = a
                while pos < b:
                    s, e = self._span(pos)
                    e = max(e, pos + 1)
                    touched.append((s, e))
                    for lo, hi in ((s, offset), (end, e)):
                        for ma, mb in self.meta.missing(lo, hi) if lo < hi else ():
                            self._copy(ma, mb)
                    pos = e
            _pwrite_all(self.fd, data, offset)
            for s, e in touched:
                self.meta.add(s, e)
            self.meta.add(offset, end)
            self._settle()
            return len(data)

    def truncate(self, length: int) -> None:
        with self.lock:
            if not self.done:
                self.meta.add(length, END)
            os.ftruncate(self.fd, length)
            if not self.done:
                self._settle()

    def materialize_all(self) -> None:
        """Copy every missing byte and make this an ordinary upper file.

        The file's times stay as they were: only the caller's own writes change them.
        """
        with self.lock:
            if self.done:
                return
            st = os.fstat(self.fd)
            missing = self.meta.missing(0, min(st.st_size, self.lower_size))
            for a, b in missing:
                self._copy(a, b)
            self._finish()
            if missing:
                os.utime(self.fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _settle(self) -> None:
        """Record the ranges; finish when they cover the file or grow too many."""
        size = os.fstat(self.fd).st_size
        if not self.meta.missing(0, min(size, self.lower_size)):
            self._finish()
            return
        if len(self.meta.ranges) > MAX_RANGES:
            for a, b in self.meta.missing(0, min(size, self.lower_size)):
                self._copy(a, b)
            self._finish()
            return
        os.setxattr(self.fd, X_METACOPY, self.meta.to_bytes())

    def _finish(self) -> None:
        clear_metacopy(self.fd)
        self.done = True

    def close(self) -> None:
        os.close(self.fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
