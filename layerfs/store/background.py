"""Items handled in batches on worker threads, with the first error kept.

The caller adds items (chunks to compress and write) and goes on; they are
grouped into batches (by count and by weight, e.g. bytes), and each batch is one
job for ``handler`` on a worker thread, so the per-item cost of handing work to
a thread stays small. At most ``depth`` batches wait or run at a time, so memory
stays bounded. The first batch that fails makes every later ``add`` and ``wait``
raise its exception, so an error is never lost and nothing is written after it.
One thread adds and waits; the workers only run the handler.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class BackgroundBatches(Generic[T]):
    """Run ``handler(batch)`` on ``workers`` threads; see the module docstring."""

    def __init__(
        self,
        handler: Callable[[list[T]], Any],
        workers: int = 2,
        depth: int = 8,
        batch_count: int = 32,
        batch_weight: int = 1 << 20,
        name: str = "layerfs-write",
    ) -> None:
        self._handler = handler
        self._batch: list[T] = []
        self._weight = 0
        self._batch_count = batch_count
        self._batch_weight = batch_weight
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(depth)
        self._idle = threading.Condition()
        self._running = 0
        self._error: BaseException | None = None
        self.seen: set[str] = set()  # for the caller: keys already added

    def add(self, item: T, weight: int = 0) -> None:
        """Queue ``item``; hands a full batch to a worker (blocking while ``depth`` are busy)."""
        self._raise_error()
        self._batch.append(item)
        self._weight += weight
        if len(self._batch) >= self._batch_count or self._weight >= self._batch_weight:
            self._submit()

    def _submit(self) -> None:
        batch, self._batch, self._weight = self._batch, [], 0
        if not batch:
            return
        self._slots.acquire()
        with self._idle:
            self._running += 1
        try:
            future = self._pool.submit(self._handler, batch)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)

    def _finished(self, future: Future | None) -> None:
        error = future.exception() if future is not None else None
        with self._idle:
            if error is not None and self._error is None:
                self._error = error
            self._running -= 1
            if self._running == 0:
                self._idle.notify_all()
        self._slots.release()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _wait_idle(self) -> None:
        with self._idle:
            while self._running:
                self._idle.wait()

    def wait(self) -> None:
        """Hand over the partial batch, wait for every batch; raise the first error of any."""
        self._raise_error()
        self._submit()
        self._wait_idle()
        self._raise_error()

    def close(self) -> None:
        """Drop the partial batch, wait for running ones (ignoring errors), stop the threads."""
        self._batch, self._weight = [], 0
        self._wait_idle()
        self._pool.shutdown(wait=True)
