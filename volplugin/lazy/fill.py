"""The background fill of a lazy volume: materialize every entry of a backup tree locally.

Entries are written into a staging directory with the backup restorer, one entry at a
time, so each file appears under its name only once all its chunks were read and
verified (see volplugin.backup.restore). Hard links whose target is already there are
linked again, so link groups survive a restart. Directory attributes are applied last.
Everything the fill itself does in the staging directory (looking at what is there,
linking, removing leftovers) goes through directory descriptors without following a
symlink (layerfs.confined).

Durability and resuming. A file under its name is not yet on disk: after a crash of the
host it may have its size and mtime but not its bytes. So the fill keeps a journal
(``Journal``; the lazy state's table for volumes): every few seconds or tens of MB it
syncs the staging directory's filesystem (``syncfs``) and only then records the paths
placed since, and at the end it syncs before it returns. A restarted fill skips what
the journal names. It also adopts what an earlier run of the same boot placed but did
not record yet (the plugin was killed, the host was not): a regular file with the
recorded size and mtime, a link or node of the recorded type; it syncs them first, so
after a restart of the plugin nothing is fetched twice. After a restart of the host
only what was synced counts: everything else is removed before the journal takes the
new boot. Anything else in the staging directory (temp files
of an interrupted run) is removed at start.

Memory. The tree is read again for each pass, one directory node at a time
(``records.iter_tree``); what stays in memory are the directory entries (their
attributes are set last), the entries hard links name, and the paths placed since
the last commit. Whether a path is done is asked of the journal.

``rate`` (bytes per second, 0 for no limit) throttles the fill, for tests and for hosts
that must keep bandwidth for the reads of running containers: each fetched file takes
at least its size divided by the rate, however slow the fetches before it were.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from layerfs import confined
from layerfs.confined import DirFds, Escape, lstat_at, remove_at, split
from layerfs.records import S_IFMT_OF, Entry, Kind, dir_tree_root, iter_tree, node_entries
from layerfs.store.chunks import ChunkStore
from volplugin.backup.restore import Restorer

RATE_ENV = "VOLPLUGIN_LAZY_FILL_RATE"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
BOOT_ID = "/proc/sys/kernel/random/boot_id"
COMMIT_BYTES = 64 << 20  # sync and record at least this often ...
COMMIT_SECONDS = 2.0  # ... or this often, whichever comes first
_NOT_CONTENT = (Kind.DIR, Kind.WHITEOUT, Kind.OPAQUE)
_ADOPT_BATCH = 10000  # adopted paths recorded at once


@dataclass
class Progress:
    """How much of the tree is local: entries other than directories, and file bytes."""

    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


ProgressSink = Callable[[Progress], None]


class Journal(Protocol):
    """Where a fill records the paths that are on disk (synced before they are recorded)."""

    def done(self, path: str) -> bool: ...

    def last_boot(self) -> str | None: ...

    def record(self, paths: list[str], boot: str) -> None: ...


@dataclass
class MemoryJournal:
    """A journal in memory, for a fill that need not survive its process."""

    paths: set[str] = field(default_factory=set)
    boot: str | None = None

    def done(self, path: str) -> bool:
        return path in self.paths

    def completed(self) -> set[str]:
        return set(self.paths)

    def last_boot(self) -> str | None:
        return self.boot

    def record(self, paths: list[str], boot: str) -> None:
        self.paths.update(paths)
        self.boot = boot


def boot_id() -> str:
    """This boot of the kernel: page-cache content written before it may be lost."""
    with open(BOOT_ID) as f:
        return f.read().strip()


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


class Filler:
    """Fills ``target`` with the entries of one backup tree; see the module docstring."""

    def __init__(
        self,
        store: ChunkStore,
        tree: str,
        target: Path,
        *,
        journal: Journal | None = None,
        rate: int = 0,
        stop: threading.Event | None = None,
        on_progress: ProgressSink | None = None,
        report_every: float = 0.5,
    ) -> None:
        self.store = store
        self.tree = tree
        self.target = Path(target)
        self.journal: Journal = journal if journal is not None else MemoryJournal()
        self.rate = rate
        self.stop = stop or threading.Event()
        self.on_progress = on_progress
        self.report_every = report_every
        self.progress = Progress()
        targets: set[str] = set()
        for e in self._entries():
            if e.kind in _NOT_CONTENT:
                continue
            self.progress.files_total += 1
            self.progress.bytes_total += e.size if e.kind is Kind.FILE else 0
            if e.kind is Kind.HARDLINK:
                targets.add(e.target)
        # what hard links name: a link whose target is not there yet gets a copy
        sources = {e.path: e for e in self._entries() if e.path in targets} if targets else {}
        self._restorer = Restorer(store, self.target, sources)
        self._pending: list[str] = []  # placed by this run, not yet synced and recorded
        self._placed: set[str] = set()  # the same, for look-ups
        self._pending_bytes = 0
        self._committed = 0.0
        self._due = 0.0
        self._reported = 0.0
        self._fds: DirFds | None = None

    def _entries(self) -> Iterator[Entry]:
        return iter_tree(self.store, self.tree)

    def _content(self) -> Iterator[Entry]:
        return (e for e in self._entries() if e.kind not in _NOT_CONTENT)

    def _done(self, path: str) -> bool:
        """Whether ``path`` is on disk: recorded in the journal, or placed by this run."""
        return path in self._placed or self.journal.done(path)

    # -- run -----------------------------------------------------------------------------

    def run(self) -> bool:
        """Fill until complete and synced (True) or until ``stop`` is set (False)."""
        self.target.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fds = DirFds.open(self.target, label=f"the fill directory {self.target}")
        try:
            return self._run(self._fds.root)
        finally:
            self._fds.close()
            self._fds = None

    def _run(self, root: int) -> bool:
        boot = boot_id()
        self.progress.files_done = self.progress.bytes_done = 0
        dirs = [e for e in self._entries() if e.kind is Kind.DIR]
        self._restorer.run(dirs)
        self._sweep()
        if self.journal.last_boot() == boot:
            self._adopt(root, boot)
        else:  # what is not recorded may have lost its bytes: fetch it again
            self._discard_unrecorded()
            self.journal.record([], boot)  # from now on this boot's page cache counts
        for entry in self._content():  # count what earlier runs left, so progress never drops
            if self._done(entry.path):
                self._count(entry)
        self._report(force=True)
        self._committed = time.monotonic()
        for entry in self._content():
            if self.stop.is_set():
                break
            if self._done(entry.path):
                continue
            started = time.monotonic()
            fetched = self._fill(entry)
            self._placed.add(entry.path)
            self._pending.append(entry.path)
            self._pending_bytes += fetched
            self._count(entry)
            self._report()
            if (
                self._pending_bytes >= COMMIT_BYTES
                or time.monotonic() - self._committed >= COMMIT_SECONDS
            ):
                self._commit(root, boot)
            if fetched:
                self._throttle(fetched, started)
        if not self.stop.is_set():
            self._restorer.run(dirs)  # directory attributes (mtime) after their children
        self._commit(root, boot, always=True)
        self._report(force=True)
        return not self.stop.is_set()

    def _commit(self, root: int, boot: str, *, always: bool = False) -> None:
        """Make what this run placed durable, then record it in the journal."""
        if not self._pending and not always:
            return
        confined.syncfs(root)
        self.journal.record(self._pending, boot)
        self._pending = []
        self._placed = set()
        self._pending_bytes = 0
        self._committed = time.monotonic()

    def _count(self, entry: Entry) -> None:
        self.progress.files_done += 1
        self.progress.bytes_done += entry.size if entry.kind is Kind.FILE else 0

    # -- what is there already -----------------------------------------------------------

    def _sweep(self) -> None:
        """Remove names that are no path of the tree (temp files of an interrupted run),
        comparing each directory with its node of the tree."""
        assert self._fds is not None
        stack: list[tuple[str, str | None]] = [("", dir_tree_root(self.store, self.tree))]
        while stack:
            path, node = stack.pop()
            children = node_entries(self.store, node, path) if node is not None else []
            stack.extend((e.path, child) for e, child in children if e.kind is Kind.DIR)
            names = {e.name for e, _child in children}
            try:
                fd = self._fds.get(path)
            except (Escape, FileNotFoundError):
                continue  # the restorer reports it when it fills below
            for name in os.listdir(fd):
                if name not in names:
                    remove_at(fd, name)

    def _adopt(self, root: int, boot: str) -> None:
        """Take what an earlier run of this boot placed but did not record (after a sync)."""
        confined.syncfs(root)
        adopted: set[str] = set()  # not recorded yet
        for links in (False, True):  # links last: they need their target adopted
            for entry in self._content():
                if (entry.kind is Kind.HARDLINK) is not links or self._done(entry.path):
                    continue
                if self._complete(entry, adopted):
                    adopted.add(entry.path)
                    if len(adopted) >= _ADOPT_BATCH:
                        self.journal.record(sorted(adopted), boot)
                        adopted = set()
        if adopted:
            self.journal.record(sorted(adopted), boot)

    def _discard_unrecorded(self) -> None:
        """Remove every entry the journal does not name (they may have lost their bytes)."""
        assert self._fds is not None
        for entry in self._content():
            if self._done(entry.path):
                continue
            parent, name = split(entry.path)
            try:
                remove_at(self._fds.get(parent), name)
            except (Escape, FileNotFoundError):
                continue

    def _lstat(self, path: str) -> os.stat_result | None:
        assert self._fds is not None
        parent, name = split(path)
        try:
            return lstat_at(self._fds.get(parent), name)
        except (Escape, FileNotFoundError):
            return None

    def _complete(self, entry: Entry, adopted: set[str]) -> bool:
        """Whether an earlier run of this boot put ``entry`` in place (see the docstring);
        ``adopted`` lists what was adopted but not recorded yet."""
        st = self._lstat(entry.path)
        if st is None or stat.S_IFMT(st.st_mode) != S_IFMT_OF[entry.kind]:
            return False
        if entry.kind is Kind.FILE:
            return st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns
        if entry.kind is Kind.HARDLINK:
            if not (self._done(entry.target) or entry.target in adopted):
                return False
            other = self._lstat(entry.target)
            return other is not None and (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
        return True

    # -- one entry -----------------------------------------------------------------------

    def _fill(self, entry: Entry) -> int:
        """Materialize one entry; return the bytes fetched."""
        if entry.kind is Kind.HARDLINK and self._done(entry.target):
            self._link(entry.target, entry.path)
            return 0
        self._restorer.run([entry])
        return entry.size if entry.kind is Kind.FILE else 0

    def _link(self, source: str, dest: str) -> None:
        """Hard-link ``dest`` to ``source`` (both in the tree), replacing what is there."""
        assert self._fds is not None
        src_parent, src_name = split(source)
        dst_parent, dst_name = split(dest)
        src_fd = self._fds.get(src_parent)
        dst_fd = self._fds.get(dst_parent)
        tmp = f".lazy-link-{secrets.token_hex(6)}"
        os.link(src_name, tmp, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        try:
            st = lstat_at(dst_fd, dst_name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                remove_at(dst_fd, dst_name)
                self._fds.forget(dest)
            os.rename(tmp, dst_name, src_dir_fd=dst_fd, dst_dir_fd=dst_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dst_fd)
            raise

    def _throttle(self, fetched: int, started: float) -> None:
        """Wait until ``fetched`` bytes took at least fetched/rate since ``started``."""
        if self.rate <= 0:
            return
        self._due = max(self._due, started) + fetched / self.rate
        wait = self._due - time.monotonic()
        if wait > 0:
            self.stop.wait(wait)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_progress is not None and (force or now - self._reported >= self.report_every):
            self._reported = now
            self.on_progress(self.progress)
