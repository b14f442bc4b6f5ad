"""ContentCache: files' plain bytes on local disk, named by content ID, bounded and evictable.

Layout under the cache's root directory:

* ``data/X/ID``: the plain bytes of one content, read-only (mode 0444). ID is
  20 characters of base64url (120 bits), X its first. ``data/`` is the
  data-only lower layer of every overlay mount of an image; a file of the
  image view points here with ``trusted.overlay.redirect`` = ``/X/ID``: 23
  bytes, short enough for ext4 to keep both overlay xattrs inside the inode
  (a longer value costs every metacopy file an xattr block of its own, 4 KiB
  read on its first lookup: cold ``find`` and ``rm -rf`` took 5 and 3 times
  as long). 64 directories, not 4096: the kernel looks a content up through
  its directory, and with caches cold fewer, fuller directories are read
  once and then found cached (with two characters a cold ``tar`` took 3.9
  times as long as kernel overlayfs, against 1.05 with 256 directories).
* ``tmp/``: contents being written. A content appears under ``data/`` only
  whole: it is written in ``tmp/``, synced and renamed into place, so a crash
  leaves at most a temp file (named after the writer's pid), which the next
  ``clean_temp`` removes once that process is gone.

A content ID is a BLAKE3 hash (its first 120 bits) of what the index records
for a file: its list of chunk IDs (themselves keyed hashes of the plain bytes)
or, for a small file kept inline, its bytes. Equal content in different images
shares one file.
"""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from layerfs.confined import syncfs_dir
from layerfs.errors import StoreError
from layerfs.store.local import write_atomic

ID_BYTES = 15  # 20 characters of base64url
_CHUNKS_DOMAIN = b"layerfs content chunks v1\0"
_INLINE_DOMAIN = b"layerfs content inline v1\0"


def content_id(packed_chunks: bytes | None, inline: bytes | None) -> str:
    """The content ID of a file from its index row (packed chunk list, or inline bytes)."""
    import blake3

    data = (
        _INLINE_DOMAIN + inline if inline is not None else _CHUNKS_DOMAIN + (packed_chunks or b"")
    )
    return base64.urlsafe_b64encode(blake3.blake3(data).digest(ID_BYTES)).decode("ascii")


@dataclass(frozen=True)
class CacheUsage:
    """What the cache holds: number of contents and bytes on disk."""

    files: int
    bytes: int


@dataclass(frozen=True)
class ContentCache:
    """The content cache rooted at ``root`` (created on first use)."""

    root: Path

    @property
    def data_dir(self) -> Path:
        """The directory overlay mounts use as their data-only lower layer."""
        return self.root / "data"

    def redirect(self, cid: str) -> bytes:
        """The ``trusted.overlay.redirect`` value that points at a content."""
        return f"/{cid[:1]}/{cid}".encode()

    def path(self, cid: str) -> Path:
        return self.data_dir / cid[:1] / cid

    def has(self, cid: str) -> bool:
        return os.path.exists(self.path(cid))

    def put(
        self,
        cid: str,
        size: int,
        parts: Iterable[bytes | memoryview],
        on_write: Callable[[str, int], None] | None = None,
    ) -> Path:
        """Write a content from its bytes in order and return its path.

        The bytes must add up to ``size``; otherwise nothing is kept and
        StoreError says so. Writing a content that is already there is harmless.
        ``on_write(temp path, bytes written so far)`` is called as the bytes go
        out, so that readers may read what is written before the end.
        """
        target = self.path(cid)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = self.temp(cid[:16])
        try:
            for part in parts:
                temp.write(part)
                if on_write is not None:
                    on_write(temp.path, temp.written)
            if temp.written != size:
                raise StoreError(f"content {cid} came out {temp.written} bytes long, not {size}")
            temp.seal(sync=True)
            os.rename(temp.path, target)
        except BaseException:
            temp.discard()
            raise
        return target

    def _tmp_dir(self) -> Path:
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        return tmp_dir

    def temp(self, label: str = "") -> TempContent:
        """A new temp file for a content, under ``tmp/`` (named after this process)."""
        fd, path = tempfile.mkstemp(dir=self._tmp_dir(), prefix=f"{os.getpid()}.{label}.")
        return TempContent(fd, path)

    def batch(self) -> ContentBatch:
        """Contents written as a stream yields them, named together at the end."""
        return ContentBatch(self)

    def clean_temp(self) -> int:
        """Remove temp files left by writers that died (their name starts with the
        writer's pid); return how many."""
        from layerfs.store.local import pid_alive

        tmp_dir = self.root / "tmp"
        removed = 0
        if tmp_dir.is_dir():
            for entry in os.scandir(tmp_dir):
                pid = entry.name.partition(".")[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def _contents(self) -> Iterator[os.DirEntry[str]]:
        if not self.data_dir.is_dir():
            return
        for sub in os.scandir(self.data_dir):
            if sub.is_dir(follow_symlinks=False):
                yield from os.scandir(sub.path)

    def usage(self) -> CacheUsage:
        files = total = 0
        for entry in self._contents():
            files += 1
            total += entry.stat(follow_symlinks=False).st_blocks * 512
        return CacheUsage(files, total)

    def evict(self, max_bytes: int, keep: set[str]) -> CacheUsage:
        """Remove the least recently used contents not in ``keep`` until at most
        ``max_bytes`` are used; return what was removed."""
        found = []
        total = 0
        for entry in self._contents():
            st = entry.stat(follow_symlinks=False)
            used = st.st_blocks * 512
            total += used
            if entry.name not in keep:
                found.append((st.st_atime_ns, used, entry.path))
        found.sort()
        files = freed = 0
        for _atime, used, path in found:
            if total - freed <= max_bytes:
                break
            if not files:
                self._new_generation()  # before the first removal: no stamp outlives it
            os.unlink(path)
            files += 1
            freed += used
        return CacheUsage(files, freed)

    # -- stamps: "every content of this image was here" ------------------------------
    def generation(self) -> str:
        """A token that changes whenever contents are removed (evicted); made at first
        use, never over one an eviction wrote ("" while another process makes it)."""
        path = self.root / "generation"
        with suppress(FileExistsError):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, secrets.token_hex(8).encode())
            finally:
                os.close(fd)
        return path.read_text()

    def _new_generation(self) -> None:
        write_atomic(self.root / "generation", secrets.token_hex(8).encode(), self._tmp_dir())

    def stamp_complete(self, key: str, generation: str) -> None:
        """Record that every content of ``key`` (an image's index) was in the cache at
        ``generation`` (read before looking); nothing is recorded if contents were
        removed since."""
        if generation and generation == self.generation():
            write_atomic(self.root / "complete" / key, generation.encode(), self._tmp_dir())

    def complete(self, key: str) -> bool:
        """Whether every content of ``key`` was found in the cache and nothing was evicted
        since (contents are only removed by ``evict``, or with the whole cache)."""
        try:
            stamp = (self.root / "complete" / key).read_text()
        except FileNotFoundError:
            return False
        return bool(stamp) and stamp == self.generation()


class TempContent:
    """A content being written to a temp file of the cache (not yet under ``data/``)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            self.written += n
            view = view[n:]

    def seal(self, *, sync: bool) -> None:
        """Make it read-only and close it (``sync``: its bytes on disk first)."""
        os.fchmod(self.fd, 0o444)
        if sync:
            os.fdatasync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with suppress(FileNotFoundError):
            os.unlink(self.path)


class ContentBatch:
    """Contents written as an import reads them, named together when it ends.

    Each content goes to a temp file while its bytes stream past (``begin``,
    then ``add`` once its ID is known). ``finish`` syncs the cache's filesystem
    once and only then renames every content into ``data/``: one sync for the
    batch instead of one per file, and still no named content whose bytes a
    crash could have lost (a crash leaves temp files, which ``clean_temp``
    removes). A content the cache holds already, or that came twice, is dropped.
    """

    def __init__(self, cache: ContentCache) -> None:
        self.cache = cache
        self._pending: dict[str, str] = {}  # content ID -> temp path

    def begin(self) -> TempContent:
        return self.cache.temp("import")

    def add(self, temp: TempContent, cid: str) -> None:
        temp.seal(sync=False)
        if cid in self._pending or self.cache.has(cid):
            temp.discard()
        else:
            self._pending[cid] = temp.path

    def finish(self) -> int:
        """Name every content added; return how many."""
        if not self._pending:
            return 0
        syncfs_dir(self.cache.root / "tmp")
        for cid, path in self._pending.items():
            target = self.cache.path(cid)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
        named = len(self._pending)
        self._pending.clear()
        return named

    def discard(self) -> None:
        """Drop every content added and not named yet."""
        for path in self._pending.values():
            with suppress(FileNotFoundError):
                os.unlink(path)
        self._pending.clear()
