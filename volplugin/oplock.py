"""The lock that serialises volume changes across the server's threads and processes.

`volplugin serve` answers requests in several worker processes (see volplugin.workers),
and each has several threads. Create, Remove, Mount, Unmount and the lazy switch must
each see and change a volume's state alone, so they hold this lock: a thread lock
inside a process and an flock on ROOT/ops.lock between processes. flock is taken on
this process's own descriptor, opened on first use, so a forked or spawned process
never shares it by accident.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

POLL = 0.005  # seconds between tries of a timed acquire


class OpLock:
    """A lock held by one thread of one process at a time (not re-entrant)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = -1

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock; with `timeout`, give up after that many seconds and return False."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._thread_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            fd = self._descriptor()
            if deadline is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                return True
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(POLL)
        except BaseException:
            self._thread_lock.release()
            raise
        self._thread_lock.release()
        return False

    def release(self) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OpLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
