"""Disk usage of a directory tree, bounded in time so that a Get always answers quickly."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    """Bytes allocated on disk; `complete` is False when the walk ran out of time."""

    bytes: int
    complete: bool

    def human(self) -> str:
        value = float(self.bytes)
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if value < 1024 or unit == "TiB":
                text = f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
                return text if self.complete else f">= {text} (count cut short)"
            value /= 1024
        raise AssertionError("unreachable")


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
