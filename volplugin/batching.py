"""Run short operations in batches under one hold of a lock (flat combining).

Mount and Unmount change one volume's mount IDs under the service lock, which is
shared by every thread of every server process. Under load, handing that lock from
one request to the next costs more than the change itself: each hand-off waits for
the next holder to be scheduled and to get the interpreter lock. Here the first
thread to find no batch running becomes the combiner: it takes the service lock once
and runs every operation that is waiting in this process, its own included, in the
order they came. The other threads wait for their results, which they get exactly as
if they had run the operation themselves (value or exception).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Job(Generic[T]):
    fn: Callable[[], T]
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class Batcher:
    """Runs `run(fn)` calls of many threads, many per acquisition of `lock`.

    An error of the lock itself (it cannot be taken, say) becomes the error of every
    operation in that batch.
    """

    def __init__(self, lock: contextlib.AbstractContextManager) -> None:
        self._lock = lock
        self._turn = threading.Lock()  # one combiner at a time in this process
        self._waiting: collections.deque[_Job] = collections.deque()
        self.batches = 0  # how many times the lock was taken

    def run(self, fn: Callable[[], T]) -> T:
        job: _Job[T] = _Job(fn)
        self._waiting.append(job)
        with self._turn:
            if not job.done:
                self._run_waiting()
        if job.error is not None:
            raise job.error
        return job.result

    def _run_waiting(self) -> None:
        batch: list[_Job] = []
        with contextlib.suppress(IndexError):
            while True:
                batch.append(self._waiting.popleft())
        try:
            with self._lock:
                self.batches += 1
                for job in batch:
                    try:
                        job.result = job.fn()
                    except BaseException as exc:  # noqa: BLE001 - handed to its own thread
                        job.error = exc
        except BaseException as exc:
            for job in batch:
                job.error = exc
        for job in batch:
            job.done = True
