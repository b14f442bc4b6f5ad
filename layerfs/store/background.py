"""A bounded pool of worker threads for blob writes, with the first error kept.

The caller submits small jobs (compress a chunk, write it to the backend) and
goes on; at most ``depth`` jobs wait or run at a time, so memory stays bounded.
The first job that fails makes every later ``submit`` and ``wait`` raise its
exception, so an error is never lost and nothing is written after it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class BackgroundJobs:
    """Run jobs on ``workers`` threads, at most ``depth`` in flight; see the module docstring."""

    def __init__(self, workers: int, depth: int, name: str = "layerfs-write") -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(depth)
        self._idle = threading.Condition()
        self._running = 0
        self._error: BaseException | None = None
        self.seen: set[str] = set()  # for callers: keys already submitted

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        """Queue ``job(*args)``; blocks while ``depth`` jobs are in flight."""
        self._raise_error()
        self._slots.acquire()
        with self._idle:
            self._running += 1
        try:
            future = self._pool.submit(job, *args)
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

    def wait(self) -> None:
        """Wait until every submitted job has finished; raise the first error of any."""
        with self._idle:
            while self._running:
                self._idle.wait()
        self._raise_error()

    def close(self) -> None:
        """Wait for the jobs (ignoring their errors) and stop the threads."""
        with self._idle:
            while self._running:
                self._idle.wait()
        self._pool.shutdown(wait=True)
