"""Write a layer tar from a tree record's entries, byte for byte the same every time.

The tar is a pure function of the entry list: entries in record order, PAX
format headers (Python's tarfile encoding), empty uname/gname, whole-second
mtimes, xattrs as ``SCHILY.xattr.*`` PAX records, whiteouts as empty
``.wh.NAME`` files and opaque directories as a ``DIR/.wh..wh..opq`` file, and
the archive ends with two zero blocks (no padding to a 10 KiB record).
So a layer written by ``layerfs commit`` regenerates with the same DiffID.
Sockets cannot be archived and are skipped; the root entry ('') is skipped.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from layerfs.errors import CorruptObject
from layerfs.records import Entry, Kind
from layerfs.store.chunks import ChunkRef, ChunkStore

BLOCK = 512
READ_WORKERS = 4  # threads reading chunks ahead of the tar writer
READ_AHEAD = 32  # chunks read ahead (at most 8 MiB at the largest chunk size)
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_TYPES = {
    Kind.FILE: tarfile.REGTYPE,
    Kind.DIR: tarfile.DIRTYPE,
    Kind.SYMLINK: tarfile.SYMTYPE,
    Kind.HARDLINK: tarfile.LNKTYPE,
    Kind.CHAR: tarfile.CHRTYPE,
    Kind.BLOCK: tarfile.BLKTYPE,
    Kind.FIFO: tarfile.FIFOTYPE,
}


@dataclass
class TarDigest:
    """What a written tar hashes to: its DiffID and its length."""

    diff_id: str  # "sha256:<hex>"
    size: int


class _HashingWriter:
    """Forward writes to a sink while hashing and counting them."""

    def __init__(self, sink: BinaryIO | None) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def tar_info(entry: Entry) -> tarfile.TarInfo | None:
    """The tar header of one entry, or None for entries a tar cannot hold."""
    if entry.kind is Kind.WHITEOUT:
        info = tarfile.TarInfo(_join(entry.parent, WHITEOUT_PREFIX + entry.name))
        info.mode = 0o600
        return info
    if entry.kind is Kind.OPAQUE:
        info = tarfile.TarInfo(_join(entry.path, OPAQUE_MARKER))
        info.mode = 0o600
        return info
    if entry.kind not in _TYPES or entry.path == "":
        return None
    info = tarfile.TarInfo(entry.path)
    info.type = _TYPES[entry.kind]
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.mtime = entry.mtime_ns // 1_000_000_000
    if entry.kind is Kind.FILE:
        info.size = entry.size
    if entry.kind in (Kind.SYMLINK, Kind.HARDLINK):
        info.linkname = entry.target
    if entry.kind in (Kind.CHAR, Kind.BLOCK):
        info.devmajor, info.devminor = entry.rdev
    if entry.xattrs:
        info.pax_headers = {
            "SCHILY.xattr." + name: value.decode("utf-8", "surrogateescape")
            for name, value in sorted(entry.xattrs.items())
        }
    return info


def _chunks_ahead(
    store: ChunkStore, refs: Iterable[ChunkRef], workers: int = READ_WORKERS
) -> Iterator[bytes]:
    """The verified bytes of ``refs`` in order, read by a few threads ahead of the caller.

    Store reads wait on the disk or the network and decompression releases the
    GIL, so reading ahead overlaps them with hashing the tar.
    """
    with ThreadPoolExecutor(workers, thread_name_prefix="layerfs-tar-read") as pool:
        ahead: deque[tuple[ChunkRef, Future[bytes]]] = deque()
        try:
            for ref in refs:
                ahead.append((ref, pool.submit(store.get_chunk, ref.digest)))
                if len(ahead) >= READ_AHEAD:
                    yield _checked(*ahead.popleft())
            while ahead:
                yield _checked(*ahead.popleft())
        finally:
            for _ref, future in ahead:
                future.cancel()


def _checked(ref: ChunkRef, future: Future[bytes]) -> bytes:
    data = future.result()
    if len(data) != ref.size:
        raise CorruptObject(f"object {ref.digest} has the wrong length")
    return data


def write_layer(
    entries: Iterable[Entry], store: ChunkStore, sink: BinaryIO | None = None
) -> TarDigest:
    """Write the layer tar of ``entries`` to ``sink`` (or only hash it); return its DiffID."""
    entries = list(entries)
    contents = _chunks_ahead(
        store, (ref for e in entries if e.inline is None and _has_content(e) for ref in e.chunks)
    )
    try:
        return _write_layer(entries, contents, sink)
    finally:
        contents.close()


def _has_content(entry: Entry) -> bool:
    """Whether the tar holds bytes of ``entry`` (as tar_info makes its header)."""
    return entry.kind is Kind.FILE and entry.path != "" and entry.size > 0


def _write_layer(
    entries: list[Entry], contents: Iterator[bytes], sink: BinaryIO | None
) -> TarDigest:
    out = _HashingWriter(sink)
    for entry in entries:
        info = tar_info(entry)
        if info is None:
            continue
        out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if info.type != tarfile.REGTYPE or not info.size:
            continue
        written = 0
        if entry.inline is not None:
            out.write(entry.inline)
            written = len(entry.inline)
        else:
            for _ref in entry.chunks:
                data = next(contents)
                out.write(data)
                written += len(data)
        if written != info.size:
            raise CorruptObject(
                f"{entry.path}: the store holds {written} bytes but the record says {info.size}"
            )
        if written % BLOCK:
            out.write(b"\0" * (BLOCK - written % BLOCK))
    out.write(b"\0" * (2 * BLOCK))
    return TarDigest("sha256:" + out.sha.hexdigest(), out.size)
