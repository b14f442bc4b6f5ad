"""One layer tar (plain, gzip or zstd) to a list of Entry records, in one streaming pass.

Regular files go into the store as chunks (files up to INLINE_MAX bytes are kept
inline); whiteouts become WHITEOUT/OPAQUE entries. While parsing, a LayerReader
thread reads ahead and computes the sha256 of the uncompressed tar (the DiffID)
and of the bytes as given (the blob digest), so the caller can verify both
without reading the layer twice.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import zstandard

from layerfs.errors import ImportRejected, LayerfsError
from layerfs.formats.paths import BadPath, normalize
from layerfs.formats.readahead import LayerReader
from layerfs.formats.streams import ForwardReader
from layerfs.records import Entry, Kind
from layerfs.store.chunks import ChunkStore, WriteStats
from layerfs.union.vocab import NameKind, parse_member_name

INLINE_MAX = 1024
WHOLE_READ_MAX = 4 << 20  # members up to this size are read into memory whole
_XATTR_PREFIX = "SCHILY.xattr."
_STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, zstandard.ZstdError)


class ContentSink(Protocol):
    """Where a regular file's bytes go besides the store, as they are read."""

    def write(self, data: bytes | memoryview) -> None: ...

    def done(self, entry: Entry) -> None:
        """The bytes are complete; ``entry`` (its chunks or inline bytes) says what they are."""

    def abort(self) -> None:
        """The file could not be read whole: forget its bytes."""


class ContentKeeper(Protocol):
    """Keeps the bytes of the files a parse reads (e.g. a local cache of file contents)."""

    def begin(self) -> ContentSink: ...


@dataclass
class ParsedLayer:
    """The entries of one layer and the digests of its bytes."""

    entries: list[Entry]
    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    blob_digest: str  # "sha256:<hex>" of the bytes as read (== diff_id when plain)
    compression: str  # "none", "gzip" or "zstd"
    apparent_size: int = 0
    stats: WriteStats = field(default_factory=WriteStats)


def parse_layer(
    store: ChunkStore,
    raw: BinaryIO,
    label: str,
    on_read: Callable[[int], None] | None = None,
    keep: ContentKeeper | None = None,
) -> ParsedLayer:
    """Parse a layer tar from ``raw``; raise ImportRejected naming ``label`` and the entry.

    ``keep`` is given the bytes of every non-empty regular file as well.
    """
    entries: list[Entry] = []
    stats = WriteStats()
    current = "(start of the layer)"
    compression = "none"
    layer: LayerReader | None = None
    try:
        layer = LayerReader(raw, on_read)
        compression = layer.compression
        tar_stream = ForwardReader(layer, hashing=False)
        # the seeking mode reads member data straight from ForwardReader, without
        # the stream mode's small copied blocks; ForwardReader keeps it one pass
        with tarfile.open(
            fileobj=tar_stream, mode="r:", encoding="utf-8", errors="surrogateescape"
        ) as tar:
            for member in tar:
                current = member.name
                entry = _entry(store, tar, member, stats, label, keep)
                if entry is not None:
                    entries.append(entry)
            current = "(end of the layer)"
            tar_stream.drain()
    except LayerfsError:
        raise
    except _STREAM_ERRORS as exc:
        raise ImportRejected(
            f"{label}: the layer is truncated or not a valid {_what(compression)} "
            f"(at entry {current!r}: {exc}); re-export the image"
        ) from exc
    finally:
        if layer is not None:
            layer.close()
    diff_id, blob_digest = layer.diff_id, layer.blob_digest
    size = sum(e.size for e in entries if e.kind is Kind.FILE)
    return ParsedLayer(entries, diff_id, blob_digest, compression, size, stats)


def _what(compression: str) -> str:
    return "tar" if compression == "none" else f"{compression}-compressed tar"


def _reject(label: str, name: str, problem: str) -> ImportRejected:
    return ImportRejected(f"{label}: entry {name!r}: {problem}")


def _entry(
    store: ChunkStore,
    tar: tarfile.TarFile,
    m: tarfile.TarInfo,
    stats: WriteStats,
    label: str,
    keep: ContentKeeper | None,
) -> Entry | None:
    try:
        path = normalize(m.name)
    except BadPath as exc:
        raise _reject(label, m.name, f"{exc}; refusing an unsafe archive") from None
    parent, _, base = path.rpartition("/")
    marked = parse_member_name(base)
    if marked.kind is not NameKind.PLAIN:
        if marked.kind is NameKind.OPAQUE:
            return Entry(parent, Kind.OPAQUE)
        if marked.kind is NameKind.META:
            return None  # other whiteout metadata: never visible
        hidden = marked.hidden
        return Entry(f"{parent}/{hidden}" if parent else hidden, Kind.WHITEOUT)
    entry = Entry(
        path,
        Kind.FILE,
        mode=m.mode & 0o7777,
        uid=m.uid,
        gid=m.gid,
        mtime_ns=_mtime_ns(m),
        xattrs=_xattrs(m),
    )
    if m.isreg():
        with _kept(keep if m.size else None, entry) as sink:
            _read_content(store, tar, m, entry, stats, label, sink)
    elif m.isdir():
        entry.kind = Kind.DIR
    elif m.issym():
        entry.kind, entry.target = Kind.SYMLINK, m.linkname
    elif m.islnk():
        try:
            entry.kind, entry.target = Kind.HARDLINK, normalize(m.linkname)
        except BadPath as exc:
            raise _reject(label, m.name, f"hardlink target: {exc}") from None
        if not entry.target:
            raise _reject(label, m.name, "a hardlink to the root directory")
    elif m.ischr() or m.isblk():
        entry.kind = Kind.CHAR if m.ischr() else Kind.BLOCK
        entry.rdev = (m.devmajor, m.devminor)
    elif m.isfifo():
        entry.kind = Kind.FIFO
    else:
        raise _reject(label, m.name, f"unsupported tar entry type {m.type!r}")
    return entry


@contextmanager
def _kept(keep: ContentKeeper | None, entry: Entry) -> Iterator[ContentSink | None]:
    """The sink of ``keep`` for one file's bytes: told ``done`` when they were read whole,
    ``abort`` when not."""
    if keep is None:
        yield None
        return
    sink = keep.begin()
    try:
        yield sink
    except BaseException:
        sink.abort()
        raise
    sink.done(entry)


def _read_content(
    store: ChunkStore,
    tar: tarfile.TarFile,
    m: tarfile.TarInfo,
    entry: Entry,
    stats: WriteStats,
    label: str,
    sink: ContentSink | None,
) -> None:
    entry.size = m.size
    if m.sparse is None and m.size <= WHOLE_READ_MAX:
        # small members are read in one piece straight from the layer stream
        # (the seeking mode's reader), which is cheaper than a file object each
        tar.fileobj.seek(m.offset_data)
        data = tar.fileobj.read(m.size)
        got = len(data)
        if got != m.size:  # as extractfile would: the layer ends inside this member
            raise tarfile.ReadError("unexpected end of data")
        if sink is not None:
            sink.write(data)
        if m.size <= INLINE_MAX:
            entry.inline = data
        else:
            entry.chunks = store.write_bytes(data, stats)
    else:
        f = tar.extractfile(m)
        if f is None:  # pragma: no cover - regular members always have a file object
            raise _reject(label, m.name, "its content cannot be read")
        entry.chunks = store.write_stream(f, stats, sink.write if sink is not None else None)
        got = sum(c.size for c in entry.chunks)
    if got != m.size:
        raise _reject(label, m.name, f"the content ends after {got} of {m.size} bytes")


def _mtime_ns(m: tarfile.TarInfo) -> int:
    """Modification time in ns, exact even for a fractional PAX mtime."""
    text = m.pax_headers.get("mtime")
    if text:
        try:
            return _decimal_ns(text)
        except ValueError:
            pass
    return int(m.mtime) * 1_000_000_000


def _decimal_ns(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("+-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise ValueError(text)
    return sign * (int(whole) * 1_000_000_000 + int((frac + "000000000")[:9]))


def _xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    """Extended attributes from SCHILY.xattr.* PAX records, as their exact bytes.

    tarfile decodes PAX values as UTF-8 and, for bytes that are not UTF-8, with
    the archive's error handler (surrogateescape here), so encoding back the
    same way recovers the bytes that were in the archive.
    """
    return {
        key[len(_XATTR_PREFIX) :]: value.encode("utf-8", "surrogateescape")
        for key, value in m.pax_headers.items()
        if key.startswith(_XATTR_PREFIX)
    }
