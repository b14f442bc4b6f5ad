"""A bounded on-disk cache of immutable blobs, shared by the processes of one host.

Each entry is a file named by its key holding the bytes and their xxh3-128
checksum, so a damaged cache file is dropped and fetched again instead of being
served. Files appear by rename (readers never see half an entry). When the total
size passes the limit, the least recently used files (by mtime, refreshed on
hits) are removed until the cache is back under three quarters of the limit.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

import xxhash

_SUM = 16


class BlobCache:
    """get/put of immutable byte strings by key, bounded to ``limit`` bytes."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.hits = 0
        self.misses = 0
        self._mutex = threading.Lock()
        self._size: int | None = None

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def contains(self, key: str) -> bool:
        return self._path(key).exists()

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        data, total = raw[:-_SUM], raw[-_SUM:]
        if len(raw) < _SUM or xxhash.xxh3_128_digest(data) != total:
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        if self.limit <= 0 or len(data) > self.limit // 4:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.write(xxhash.xxh3_128_digest(data))
            os.rename(tmp, path)
        except OSError:
            return  # a cache that cannot write only costs speed
        with self._mutex:
            if self._size is None:
                self._size = self._scan_size()
            else:
                self._size += len(data) + _SUM
            over = self._size > self.limit
        if over:
            self.trim()

    def _entries(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of every cached file; files other writers remove meanwhile
        (their temp files, or entries another process trims) are skipped."""
        out: list[tuple[float, int, str]] = []
        if not self.root.is_dir():
            return out
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(sub.path):
                    with contextlib.suppress(FileNotFoundError):
                        if e.is_file():
                            st = e.stat()
                            out.append((st.st_mtime, st.st_size, e.path))
        return out

    def _scan_size(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def trim(self) -> None:
        """Remove the least recently used entries until under 3/4 of the limit."""
        with self._mutex:
            entries = sorted(self._entries())
            size = sum(s for _, s, _ in entries)
            goal = self.limit * 3 // 4
            for _, s, p in entries:
                if size <= goal:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                size -= s
            self._size = size
