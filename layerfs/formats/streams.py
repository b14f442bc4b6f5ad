"""Readers that hash what passes through them, and opening a maybe-compressed stream.

Compression is detected by magic bytes (gzip, zstd, else plain), never by media
type or file name, so a mislabelled layer still imports when its digests match.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import Callable
from typing import BinaryIO

import zstandard

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DRAIN = 1 << 20


class HashingReader(io.RawIOBase):
    """Read from ``inner`` while feeding every byte to a sha256 and counting bytes."""

    def __init__(self, inner: BinaryIO, on_read: Callable[[int], None] | None = None) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.count = 0
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.inner.read(len(view))
        n = len(data)
        view[:n] = data
        if n:
            self.sha.update(data)
            self.count += n
            if self.on_read is not None:
                self.on_read(n)
        return n

    def drain(self) -> None:
        """Read (and hash) everything left in the stream."""
        buf = bytearray(_DRAIN)
        while self.readinto(buf):
            pass

    def digest(self) -> str:
        """'sha256:<hex>' of everything read so far."""
        return "sha256:" + self.sha.hexdigest()


class PrefixedReader(io.RawIOBase):
    """A stream whose first bytes were already read: serves them, then the rest."""

    def __init__(self, prefix: bytes, rest: BinaryIO) -> None:
        self.prefix = prefix
        self.rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        if self.prefix:
            n = min(len(view), len(self.prefix))
            view[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        data = self.rest.read(len(view))
        view[: len(data)] = data
        return len(data)


def kind_of(head: bytes) -> str:
    """The compression the first bytes of a stream show: 'gzip', 'zstd' or 'none'."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def sniff(stream: BinaryIO) -> tuple[str, BinaryIO]:
    """Detect the compression of ``stream``: ('gzip'|'zstd'|'none', stream from byte 0)."""
    head = b""
    while len(head) < 4:
        more = stream.read(4 - len(head))
        if not more:
            break
        head += more
    return kind_of(head), io.BufferedReader(PrefixedReader(head, stream), buffer_size=1 << 20)


def decompressed(kind: str, stream: BinaryIO) -> BinaryIO:
    """The plain bytes of ``stream`` compressed as ``kind`` (see ``sniff``)."""
    if kind == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        dctx = zstandard.ZstdDecompressor()
        return dctx.stream_reader(stream, read_across_frames=True)  # type: ignore[return-value]
    return stream


class ForwardReader:
    """A buffered reader of ``inner`` that seeks forward only, optionally hashing it.

    tarfile in its seeking mode reads headers and member data straight through
    ``read``/``seek``/``tell``; since it only ever seeks forward over what it
    has not read (padding, unread data), the layer is still read once, in
    order, and every byte is hashed. Reads of ``block`` bytes or more bypass
    the buffer. ``inner`` is read ``piece`` bytes at a time; an error it raises
    while filling the buffer is raised only when a read needs the bytes it
    could not deliver, so the caller learns of damage where it is.
    """

    def __init__(
        self, inner: BinaryIO, hashing: bool, block: int = 1 << 20, piece: int = 1 << 20
    ) -> None:
        self.inner = inner
        self.sha = hashlib.sha256() if hashing else None
        self.block = block
        self.piece = piece
        self._buf = b""
        self._at = 0  # next unread index in _buf
        self._pos = 0  # stream offset of the next byte read()
        self._eof = False
        self._error: Exception | None = None  # raised by inner, not yet reported

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _pull(self, n: int) -> bytes:
        """Up to ``n`` new bytes from ``inner`` (fewer only at its end), hashed."""
        parts = []
        while n > 0 and not self._eof:
            try:
                data = self.inner.read(min(n, self.piece))
            except Exception as exc:  # reported by _check when the bytes are needed
                self._error, self._eof = exc, True
                break
            if not data:
                self._eof = True
                break
            if self.sha is not None:
                self.sha.update(data)
            parts.append(data)
            n -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _check(self, short: bool) -> None:
        if short and self._error is not None:
            raise self._error

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            out = self._buf[self._at :] + self._pull(1 << 62)
            self._buf, self._at = b"", 0
            self._pos += len(out)
            self._check(True)
            return out
        end = self._at + size
        if end <= len(self._buf):
            out = self._buf[self._at : end]
            self._at = end
        else:
            rest = self._buf[self._at :]
            need = size - len(rest)
            if need >= self.block:
                self._buf, self._at = b"", 0
                out = rest + self._pull(need)
            else:
                self._buf = self._pull(self.block)
                self._at = min(need, len(self._buf))
                out = rest + self._buf[: self._at]
        self._pos += len(out)
        self._check(len(out) < size)
        return out

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._pos + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self._pos:
            raise io.UnsupportedOperation("this stream only seeks forward")
        skip = target - self._pos
        left = len(self._buf) - self._at
        if skip <= left:
            self._at += skip
        else:
            self._buf, self._at = b"", 0
            skip -= left
            while skip > 0 and not self._eof:
                skip -= len(self._pull(min(skip, self.block)))
            self._check(skip > 0)
        self._pos = target  # past the end, later reads return b""
        return target

    def drain(self) -> None:
        """Read (and hash) everything left in the stream."""
        self._buf, self._at = b"", 0
        while not self._eof:
            self._pull(self.block)
        self._check(True)

    def digest(self) -> str:
        """'sha256:<hex>' of everything taken from ``inner`` (see ``drain``)."""
        if self.sha is None:
            raise ValueError("this reader does not hash")
        return "sha256:" + self.sha.hexdigest()
