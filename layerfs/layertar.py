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
import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from layerfs.errors import CorruptObject
from layerfs.records import Entry, Kind
from layerfs.store.chunks import ChunkStore
from layerfs.union.vocab import OPAQUE_MARKER, whiteout_name

BLOCK = 512
_ZEROS = bytes(2 * BLOCK)
SMALL_WRITE = 64 << 10  # writes below this are gathered before they go to the hashing thread
BATCH_BYTES = 1 << 20  # bytes handed to the hashing thread at once
QUEUED_BATCHES = 8  # batches waiting for the hashing thread (bounds memory)
_REG = tarfile.REGTYPE
_MAX7 = 8**7  # numbers below these fit 8- and 12-byte octal fields
_MAX11 = 8**11
_NUL16 = bytes(16)
_NUL64 = bytes(64)
_NUL167 = bytes(167)
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
    """Hash, count and forward the tar's bytes, hashing on a thread of its own.

    sha256 and the sink's writes release the GIL, so the thread hashes one
    batch while the caller reads and decodes the next chunks. Small writes
    (headers, padding) are gathered into one buffer; a batch goes to the thread
    once it holds BATCH_BYTES. The first error of the thread (a sink that
    cannot be written) is raised by the next ``write`` or by ``finish``.
    """

    def __init__(self, sink: BinaryIO | None) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0
        self._small = bytearray()
        self._batch: list[bytes | memoryview] = []
        self._batch_size = 0
        self._queue: queue.Queue[list[bytes | memoryview] | None] = queue.Queue(QUEUED_BATCHES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="layerfs-tar-hash", daemon=True)
        self._thread.start()

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if len(data) < SMALL_WRITE:
            self._small += data
            if len(self._small) < SMALL_WRITE:
                return
            data, self._small = bytes(self._small), bytearray()
        elif self._small:
            self._add(bytes(self._small))
            self._small = bytearray()
        self._add(data)

    def _add(self, data: bytes | memoryview) -> None:
        self._batch.append(data)
        self._batch_size += len(data)
        if self._batch_size >= BATCH_BYTES:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._error is not None:
            raise self._error
        if self._batch:
            self._queue.put(self._batch)
            self._batch, self._batch_size = [], 0

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the writer never blocks on a full queue
            try:
                for data in batch:
                    self.sha.update(data)
                    if self.sink is not None:
                        self.sink.write(data)
            except BaseException as exc:  # raised again in the writer's thread
                self._error = exc

    def finish(self) -> str:
        """Wait for every byte to be hashed and written; return the sha256 in hex."""
        if self._small:
            self._add(bytes(self._small))
            self._small = bytearray()
        self._hand_over()
        self.close()
        if self._error is not None:
            raise self._error
        return self.sha.hexdigest()

    def close(self) -> None:
        """Stop the thread (after what it was given); safe to call twice."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def tar_info(entry: Entry) -> tarfile.TarInfo | None:
    """The tar header of one entry, or None for entries a tar cannot hold."""
    if entry.kind is Kind.WHITEOUT:
        info = tarfile.TarInfo(_join(entry.parent, whiteout_name(entry.name)))
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


def tar_header(entry: Entry) -> bytes | None:
    """The header bytes of one entry (as ``tar_info(entry).tobuf`` in PAX format), or None.

    Most entries need no PAX records: ASCII names and link targets that fit
    their ustar fields, no xattrs, numbers that fit theirs. Their ustar block
    is built here directly, byte for byte what tarfile builds (and much
    cheaper); every other entry goes through tarfile.
    """
    kind = entry.kind
    if kind is Kind.WHITEOUT:
        name, typeflag, mode = _join(entry.parent, whiteout_name(entry.name)), _REG, 0o600
        uid = gid = mtime = size = 0
    elif kind is Kind.OPAQUE:
        name, typeflag, mode = _join(entry.path, OPAQUE_MARKER), _REG, 0o600
        uid = gid = mtime = size = 0
    elif kind in _TYPES and entry.path and not entry.xattrs:
        name, typeflag, mode = entry.path, _TYPES[kind], entry.mode & 0o7777
        uid, gid, mtime = entry.uid, entry.gid, entry.mtime_ns // 1_000_000_000
        size = entry.size if kind is Kind.FILE else 0
        if kind is Kind.DIR and not name.endswith("/"):
            name += "/"
    else:
        return _tarfile_header(entry)
    link = entry.target if kind in (Kind.SYMLINK, Kind.HARDLINK) else ""
    major, minor = entry.rdev if kind in (Kind.CHAR, Kind.BLOCK) else (0, 0)
    if not (
        len(name) <= 100
        and len(link) <= 100
        and name.isascii()
        and link.isascii()
        and 0 <= uid < _MAX7
        and 0 <= gid < _MAX7
        and 0 <= size < _MAX11
        and 0 <= mtime < _MAX11
        and 0 <= major < _MAX7
        and 0 <= minor < _MAX7
    ):
        return _tarfile_header(entry)
    devices = b"%07o\0%07o\0" % (major, minor) if kind in (Kind.CHAR, Kind.BLOCK) else _NUL16
    block = b"".join(
        (
            name.encode("ascii").ljust(100, b"\0"),
            b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, uid, gid, size, mtime),
            b"        ",  # the checksum field counts as spaces
            typeflag,
            link.encode("ascii").ljust(100, b"\0"),
            tarfile.POSIX_MAGIC,
            _NUL64,  # uname, gname
            devices,
            _NUL167,  # prefix and the block's padding
        )
    )
    return block[:148] + b"%06o\0" % sum(block) + block[155:]


def _tarfile_header(entry: Entry) -> bytes | None:
    info = tar_info(entry)
    return None if info is None else info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_layer(
    entries: Iterable[Entry], store: ChunkStore, sink: BinaryIO | None = None
) -> TarDigest:
    """Write the layer tar of ``entries`` to ``sink`` (or only hash it); return its DiffID.

    The chunks are read once, in tar order, through ChunkStore.stream_content.
    """
    entries = list(entries)
    contents = store.stream_content(
        ref for e in entries if e.inline is None and _has_content(e) for ref in e.chunks
    )
    out = _HashingWriter(sink)
    try:
        _write_layer(entries, contents, out)
        return TarDigest("sha256:" + out.finish(), out.size)
    finally:
        out.close()
        contents.close()


def _has_content(entry: Entry) -> bool:
    """Whether the tar holds bytes of ``entry`` (as tar_info makes its header)."""
    return entry.kind is Kind.FILE and entry.path != "" and entry.size > 0


def _write_layer(
    entries: list[Entry], contents: Iterator[bytes | memoryview], out: _HashingWriter
) -> None:
    for entry in entries:
        header = tar_header(entry)
        if header is None:
            continue
        out.write(header)
        if not _has_content(entry):
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
        if written != entry.size:
            raise CorruptObject(
                f"{entry.path}: the store holds {written} bytes but the record says {entry.size}"
            )
        if written % BLOCK:
            out.write(_ZEROS[: BLOCK - written % BLOCK])
    out.write(_ZEROS[: 2 * BLOCK])
