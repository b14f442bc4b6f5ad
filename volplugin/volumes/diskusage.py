"""Disk usage of a directory tree, bounded in time so that a Get always answers quickly."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from layerfs.clitools import human_bytes


@dataclass(frozen=True)
class Usage:
    """Bytes allocated on disk; `complete` is False when the walk ran out of time."""

    bytes: int
    complete: bool

    def human(self) -> str:
        text = human_bytes(self.bytes)
        return text if self.complete else f">= {text} (count cut short)"


def disk_usage(path: str, budget: float | None = 0.5) -> Usage:
    """Sum st_blocks of every entry under `path` without following symlinks."""
    deadline = None if budget is None else time.monotonic() + budget
    total = 0
    stack = [path]
    seen: set[tuple[int, int]] = set()
    while stack:
        if deadline is not None and time.monotonic() > deadline:
            return Usage(total, False)
        current = stack.pop()
        try:
            st = os.lstat(current)
            total += st.st_blocks * 512
            with os.scandir(current) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_blocks * 512
    return Usage(total, True)


class SizeCache:
    """Sizes of volumes for Get: a short walk now, the rest of a big walk in the background.

    A Get must answer at once (the daemon calls it for every volume when it starts), so
    a walk that exceeds `budget` returns its partial count, marked incomplete, and a
    background thread finishes it; later Gets use that result while it is `max_age`
    seconds old or younger.
    """

    def __init__(self, budget: float = 0.05, max_age: float = 10.0) -> None:
        self.budget = budget
        self.max_age = max_age
        self._done: dict[str, tuple[float, Usage]] = {}
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def usage(self, path: str) -> Usage:
        with self._lock:
            cached = self._done.get(path)
            if cached and time.monotonic() - cached[0] <= self.max_age:
                return cached[1]
        quick = disk_usage(path, self.budget)
        if quick.complete:
            return quick
        with self._lock:
            if path not in self._running:
                self._running.add(path)
                threading.Thread(target=self._finish, args=(path,), daemon=True).start()
            cached = self._done.get(path)
        return cached[1] if cached and cached[1].bytes > quick.bytes else quick

    def forget(self, path: str) -> None:
        with self._lock:
            self._done.pop(path, None)

    def _finish(self, path: str) -> None:
        try:
            full = disk_usage(path, None)
            with self._lock:
                self._done[path] = (time.monotonic(), full)
        finally:
            with self._lock:
                self._running.discard(path)
