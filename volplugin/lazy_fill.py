"""The background fill of a lazy volume: materialize every entry of a backup tree locally.

Entries are written into a staging directory with the backup restorer, one entry at a
time, so each file appears under its name only once all its chunks were read and
verified (see volplugin.backup.restore). That makes the fill resumable: an entry whose
name already exists (for a regular file: with the recorded size and mtime) is complete
and skipped, so a fill restarted after a crash fetches nothing twice. Hard links whose
target is already there are linked again, so link groups survive a restart. Directory
attributes are applied last. ``rate`` (bytes per second, 0 for no limit) throttles the
fill, for tests and for hosts that must keep bandwidth for the reads of running
containers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerfs.records import Entry, Kind
from layerfs.store.chunks import ChunkStore
from volplugin.backup.restore import Restorer

RATE_ENV = "VOLPLUGIN_LAZY_FILL_RATE"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass
class Progress:
    """How much of the tree is local: entries other than directories, and file bytes."""

    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


ProgressSink = Callable[[Progress], None]


def parse_rate(text: str | None) -> int:
    """Bytes per second from e.g. ``20M`` or ``500K`` (empty or 0: unlimited)."""
    text = (text or "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return 0
    unit = text[-1] if text[-1] in _UNITS else ""
    number = text[: len(text) - len(unit)]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(
            f"{RATE_ENV}={text!r} is not a rate: give bytes per second, e.g. 20M"
        ) from None
    return max(int(value), 0)


def _done(dest: str, entry: Entry) -> bool:
    """Whether ``entry`` is already complete at ``dest`` (from an earlier run)."""
    try:
        st = os.lstat(dest)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if entry.kind in (Kind.FILE, Kind.HARDLINK):
        return (
            stat.S_ISREG(st.st_mode)
            and (entry.kind is Kind.HARDLINK or st.st_size == entry.size)
            and (entry.kind is Kind.HARDLINK or st.st_mtime_ns == entry.mtime_ns)
        )
    return not stat.S_ISDIR(st.st_mode)


class Filler:
    """Fills ``target`` with the entries of one backup tree; see the module docstring."""

    def __init__(
        self,
        store: ChunkStore,
        entries: list[Entry],
        target: Path,
        *,
        rate: int = 0,
        stop: threading.Event | None = None,
        on_progress: ProgressSink | None = None,
        report_every: float = 0.5,
    ) -> None:
        self.store = store
        self.entries = entries
        self.target = Path(target)
        self.rate = rate
        self.stop = stop or threading.Event()
        self.on_progress = on_progress
        self.report_every = report_every
        self.by_path = {e.path: e for e in entries}
        self.progress = Progress()
        for e in entries:
            if e.kind in (Kind.DIR, Kind.WHITEOUT, Kind.OPAQUE):
                continue
            self.progress.files_total += 1
            self.progress.bytes_total += e.size if e.kind is Kind.FILE else 0
        self._restorer = Restorer(store, self.target, entries)
        self._fetched = 0
        self._started = 0.0
        self._reported = 0.0

    def _dest(self, path: str) -> str:
        return str(self.target / path) if path else str(self.target)

    def run(self) -> bool:
        """Fill until complete (True) or until ``stop`` is set (False)."""
        self._started = time.monotonic()
        dirs = [e for e in self.entries if e.kind is Kind.DIR]
        todo = []
        for entry in self.entries:  # count what an earlier run left, so progress never drops
            if entry.kind in (Kind.DIR, Kind.WHITEOUT, Kind.OPAQUE):
                continue
            if _done(self._dest(entry.path), entry):
                self._count(entry)
            else:
                todo.append(entry)
        self._report(force=True)
        self._restorer.run(dirs)
        for entry in todo:
            if self.stop.is_set():
                self._report(force=True)
                return False
            fetched = self._fill(entry)
            self._count(entry)
            self._report()
            if fetched:
                self._throttle(fetched)
        if self.stop.is_set():
            self._report(force=True)
            return False
        self._restorer.run(dirs)  # directory attributes (mtime) after their children
        self._report(force=True)
        return True

    def _count(self, entry: Entry) -> None:
        self.progress.files_done += 1
        self.progress.bytes_done += entry.size if entry.kind is Kind.FILE else 0

    def _fill(self, entry: Entry) -> int:
        """Materialize one entry unless it is there already; return the bytes fetched."""
        dest = self._dest(entry.path)
        if _done(dest, entry):
            return 0
        if entry.kind is Kind.HARDLINK:
            target = self.by_path.get(entry.target)
            if target is not None and _done(self._dest(entry.target), target):
                self._link(self._dest(entry.target), dest)
                return 0
        self._restorer.run([entry])
        return entry.size if entry.kind is Kind.FILE else 0

    @staticmethod
    def _link(source: str, dest: str) -> None:
        tmp = os.path.join(os.path.dirname(dest), f".lazy-link-{secrets.token_hex(6)}")
        os.link(source, tmp)
        try:
            os.rename(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _throttle(self, fetched: int) -> None:
        self._fetched += fetched
        if self.rate <= 0:
            return
        due = self._started + self._fetched / self.rate
        wait = due - time.monotonic()
        if wait > 0:
            self.stop.wait(wait)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_progress is not None and (force or now - self._reported >= self.report_every):
            self._reported = now
            self.on_progress(self.progress)
