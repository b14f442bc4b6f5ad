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
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from layerfs.errors import StoreError

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
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f"{os.getpid()}.{cid[:16]}.")
        try:
            written = 0
            for part in parts:
                view = memoryview(part)
                while view:
                    n = os.write(fd, view)
                    written += n
                    view = view[n:]
                if on_write is not None:
                    on_write(tmp, written)
            if written != size:
                raise StoreError(f"content {cid} came out {written} bytes long, not {size}")
            os.fchmod(fd, 0o444)
            os.fdatasync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, target)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
            raise
        return target

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
            os.unlink(path)
            files += 1
            freed += used
        return CacheUsage(files, freed)
