"""Fetch the chunks after a sequential read on worker threads, before they are asked for.

Each chunk is a separate object, so a cold sequential read would otherwise
wait for one object after another. When a file is read from its start, or
where its previous read ended, the chunks of the next ``window`` bytes are
handed to a few worker threads, which fetch them into the store's cache
(reading and checking objects releases the GIL). A read first waits for the
fetches of its own chunks, so no object is fetched twice; a fetch that failed
is simply done again by the reader, which then reports the error itself.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from layerfs.store.chunks import ChunkRef

_TRACKED_FILES = 64  # files whose next expected offset is remembered


class ReadAhead:
    """Sequential-read detection and background fetches for one view."""

    def __init__(
        self, fetch: Callable[[str], object], window: int = 4 << 20, workers: int = 4
    ) -> None:
        self.fetch = fetch
        self.window = window
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[str, Future] = {}
        self._files: OrderedDict[object, tuple[int, int]] = OrderedDict()  # next offset, ahead
        self._mutex = threading.Lock()

    def wait_for(self, chunks: list[ChunkRef], offsets: list[int], offset: int, end: int) -> None:
        """Wait for fetches already running for the chunks of [offset, end)."""
        if not self._inflight:
            return
        i = max(bisect.bisect_right(offsets, offset) - 1, 0)
        pending = []
        while i < len(chunks) and offsets[i] < end:
            future = self._inflight.get(chunks[i].digest)
            if future is not None:
                pending.append(future)
            i += 1
        if pending:
            wait(pending)

    def after_read(
        self, key: object, chunks: list[ChunkRef], offsets: list[int], offset: int, end: int
    ) -> None:
        """Note a read of [offset, end) of file ``key``; fetch ahead if it continues one."""
        with self._mutex:
            expected, ahead = self._files.pop(key, (0, 0))
            if offset != expected and offset != 0:  # not sequential: fetch nothing ahead
                self._files[key] = (end, 0)
                self._trim()
                return
            start = max(bisect.bisect_left(offsets, end), ahead)  # first chunk not read yet
            last = bisect.bisect_left(offsets, end + self.window, lo=start)
            self._files[key] = (end, max(last, ahead))
            self._trim()
            for ref in chunks[start:last]:
                self._submit(ref.digest)

    def _trim(self) -> None:
        while len(self._files) > _TRACKED_FILES:
            self._files.popitem(last=False)

    def _submit(self, digest: str) -> None:
        if digest in self._inflight:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="layerfs-ahead")
        future = self._pool.submit(self._fetch_quietly, digest)
        self._inflight[digest] = future
        future.add_done_callback(lambda _f, d=digest: self._inflight.pop(d, None))

    def _fetch_quietly(self, digest: str) -> None:
        with contextlib.suppress(Exception):  # the reader fetches it again and reports
            self.fetch(digest)

    def close(self) -> None:
        """Stop the workers (fetches already running finish first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
