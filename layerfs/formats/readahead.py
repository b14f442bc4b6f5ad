"""A layer blob read ahead on its own thread, handed over as plain tar bytes.

The thread reads the blob as given, hashes it (the blob digest), decompresses
it (gzip or zstd, detected by magic bytes), hashes the plain bytes (the DiffID)
and queues them in pieces, so disk reads, hashing and decompression run while
the caller parses. An error of the thread is queued after the good pieces, so
the reader meets it exactly where the damage is.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import BinaryIO

from layerfs.formats.streams import HashingReader, PrefixedReader, decompressed, kind_of

_END = b""


class LayerReader:
    """Plain bytes of a maybe-compressed layer ``raw``, read ahead; see the module docstring.

    Use ``read`` until it returns b"", then ``blob_digest`` and ``diff_id``;
    always ``close`` (it stops the thread if the caller gave up early).
    """

    def __init__(
        self,
        raw: BinaryIO,
        on_read: Callable[[int], None] | None = None,
        depth: int = 16,
    ) -> None:
        self._given = HashingReader(raw, on_read)
        head = b""
        while len(head) < 4:
            more = self._given.read(4 - len(head))
            if not more:
                break
            head += more
        self.compression = kind_of(head)
        self._head = head
        # compressed pieces stay small, so damage is reported near the entry it hits
        self._piece = (1 << 20) if self.compression == "none" else (64 << 10)
        self.blob_digest = ""
        self.diff_id = ""
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._block = b""  # the piece being read, from index _at
        self._at = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, name="layerfs-layer-read", daemon=True)
        self._thread.start()

    # -- the reading thread ---------------------------------------------------------
    def _run(self) -> None:
        try:
            # plain layers are read unbuffered, so an error mid-read loses no good bytes
            start = PrefixedReader(self._head, self._given)
            plain: BinaryIO = start  # type: ignore[assignment]
            if self.compression != "none":
                plain = decompressed(self.compression, io.BufferedReader(start, 1 << 20))
            sha = hashlib.sha256() if self.compression != "none" else None
            while not self._stop.is_set():
                data = plain.read(self._piece)
                if not data:
                    break
                if sha is not None:
                    sha.update(data)
                self._put(data)
            self._given.drain()  # bytes after the end of the compressed stream count too
            self.blob_digest = self._given.digest()
            self.diff_id = "sha256:" + sha.hexdigest() if sha is not None else self.blob_digest
            self._put(_END)
        except BaseException as exc:  # handed to the reader, raised where it reads
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # -- the caller's side ----------------------------------------------------------
    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` plain bytes (fewer at a piece boundary); b"" at the end."""
        if self._at >= len(self._block):
            if self._done:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            self._block, self._at = item, 0
        if self._at == 0 and (size < 0 or size >= len(self._block)):
            out, self._block = self._block, b""  # the whole piece, not copied
            return out
        end = len(self._block) if size < 0 else self._at + size
        out = self._block[self._at : end]
        self._at += len(out)
        return out

    def close(self) -> None:
        """Stop the thread (if still reading) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            with suppress(queue.Empty):
                self._queue.get(timeout=0.2)
        self._thread.join()
