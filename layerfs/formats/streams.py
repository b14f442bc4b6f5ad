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


class _Prefixed(io.RawIOBase):
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


def sniff(stream: BinaryIO) -> tuple[str, BinaryIO]:
    """Detect the compression of ``stream``: ('gzip'|'zstd'|'none', stream from byte 0)."""
    head = b""
    while len(head) < 4:
        more = stream.read(4 - len(head))
        if not more:
            break
        head += more
    if head.startswith(GZIP_MAGIC):
        kind = "gzip"
    elif head.startswith(ZSTD_MAGIC):
        kind = "zstd"
    else:
        kind = "none"
    return kind, io.BufferedReader(_Prefixed(head, stream), buffer_size=1 << 20)


def decompressed(kind: str, stream: BinaryIO) -> BinaryIO:
    """The plain bytes of ``stream`` compressed as ``kind`` (see ``sniff``)."""
    if kind == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        dctx = zstandard.ZstdDecompressor()
        return dctx.stream_reader(stream, read_across_frames=True)  # type: ignore[return-value]
    return stream
