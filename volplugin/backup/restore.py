"""Restoring a snapshot's entries into a directory, with every attribute.

A run works in three passes. First it creates the directories and picks, for
every file, a temp name in the file's target directory. Then it fetches every
chunk the files need once, on several threads, with the store's bulk read (few
large range GETs for S3), and writes each verified chunk into every place it
goes with ``pwrite``, creating the temp file at its first chunk; all-zero chunks
are left as holes, so sparse files stay sparse. Last, in entry order, each file
whose chunks all arrived gets its size and attributes and is renamed into place
(a damaged or missing chunk never leaves wrong bytes under a file's name), and
links, symlinks and device nodes are made.
Directory attributes are applied last, deepest first. When the disk fills up,
the files that were complete are still put in place before the error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerfs.records import Entry, Kind
from layerfs.store.chunks import ChunkStore
from volplugin.backup.errors import RestoreError

_NODE_TYPES = {Kind.CHAR: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK, Kind.SOCKET: stat.S_IFSOCK}
WORKERS = 8


@dataclass
class RestoreResult:
    """What a restore wrote."""

    entries: int = 0
    files: int = 0
    bytes: int = 0
    failed: list[str] = field(default_factory=list)


def select_entries(entries: list[Entry], subpath: str | None) -> list[Entry]:
    """The entries under ``subpath`` (and its parent directories), or all of them."""
    if not subpath:
        return entries
    sub = subpath.strip("/")
    parents = set()
    parts = sub.split("/")
    for i in range(len(parts)):
        parents.add("/".join(parts[:i]))
    chosen = [
        e
        for e in entries
        if e.path == sub
        or e.path.startswith(sub + "/")
        or (e.path in parents and e.kind is Kind.DIR)
    ]
    if not any(e.path == sub for e in chosen):
        raise RestoreError(
            f"the backup has no path {subpath!r}: see `volplugin diff` or restore all"
        )
    return chosen


def check_target(target: Path, force: bool) -> None:
    """Refuse a target that exists and is not an empty directory, unless forced."""
    if not target.exists():
        return
    if not target.is_dir():
        raise RestoreError(f"restore target {target} exists and is not a directory")
    if not force and any(target.iterdir()):
        raise RestoreError(
            f"restore target {target} is not empty: restore into an empty volume or pass --force"
        )


@dataclass(eq=False)
class _Content:
    """A file being filled: its entry, temp name, chunk places still to come, failure."""

    entry: Entry
    tmp: str
    remaining: int
    failed: str = ""
    created: bool = False  # the temp file exists
    placed: bool = False  # renamed into place, or removed


class _WriteFailed(Exception):
    """Writing a file's content failed (raised from a reader thread)."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(path)
        self.path = path
        self.error = error


class _Fill:
    """The content pass of one run: which chunk goes where, and the callbacks that write it."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.places: dict[str, list[tuple[_Content, int]]] = {}
        self.mutex = threading.Lock()

    def want(self, content: _Content) -> None:
        pos = 0
        for ref in content.entry.chunks:
            self.sizes[ref.digest] = ref.size
            self.places.setdefault(ref.digest, []).append((content, pos))
            pos += ref.size

    def consume(self, digest: str, data: bytes) -> None:
        zero = data == bytes(len(data))
        for content, offset in self.places[digest]:
            if content.failed:
                continue
            if not zero:
                try:
                    _pwrite_all(content, data, offset)
                except OSError as exc:
                    raise _WriteFailed(content.entry.path, exc) from exc
            with self.mutex:
                content.remaining -= 1

    def fail(self, digest: str, exc: Exception) -> None:
        with self.mutex:
            for content, _ in self.places[digest]:
                if not content.failed:
                    content.failed = f"{content.entry.path} ({exc})"


class Restorer:
    """Writes selected entries under a target directory; see the module docstring.

    ``run`` may be called several times (lazy restores fill one entry at a time):
    what earlier runs restored stays known, so hard links find their targets.
    """

    def __init__(
        self,
        store: ChunkStore,
        target: Path,
        all_entries: list[Entry],
        workers: int = WORKERS,
        *,
        fresh: bool = False,
    ) -> None:
        self.store = store
        self.target = Path(target)
        self.workers = workers
        self.fresh = fresh  # the target was empty: nothing to clear out of the way
        self.by_path = {e.path: e for e in all_entries}
        self.result = RestoreResult()
        self._restored: set[str] = set()
        self._is_root = os.geteuid() == 0

    def _dest(self, path: str) -> str:
        return str(self.target / path) if path else str(self.target)

    def run(self, entries: list[Entry]) -> RestoreResult:
        self.target.mkdir(parents=True, exist_ok=True)
        dirs: list[Entry] = []
        contents: dict[str, _Content] = {}
        fill = _Fill()
        current = ""
        try:
            try:
                for entry in entries:
                    current = entry.path or "/"
                    if entry.kind is Kind.DIR:
                        self._make_dir(entry)
                        self.result.entries += 1
                        dirs.append(entry)
                    elif entry.kind in (Kind.FILE, Kind.HARDLINK):
                        self._prepare(entry, contents, fill)
                current = ""
                self.store.read_chunks(fill.sizes, fill.consume, fill.fail, self.workers)
                for entry in entries:
                    current = entry.path or "/"
                    if entry.kind not in (Kind.DIR, Kind.WHITEOUT, Kind.OPAQUE):
                        self._finish(entry, contents)
                        self.result.entries += 1
                for entry in reversed(dirs):
                    current = entry.path or "/"
                    self._attributes(self._dest(entry.path), entry)
            except _WriteFailed as exc:
                current = exc.path
                for entry in entries:  # keep what is complete
                    content = contents.get(entry.path)
                    if content is not None and not content.failed and not content.remaining:
                        self._finish(entry, contents)
                raise exc.error from None
            finally:
                for content in contents.values():
                    if content.created and not content.placed:
                        _unlink_quiet(content.tmp)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise RestoreError(
                    f"no space left on the device of {self.target} while restoring "
                    f"{current or 'file content'}: free space or restore elsewhere "
                    f"({self.result.files} files were restored completely)"
                ) from exc
            raise RestoreError(f"restore into {self.target} failed: {exc}") from exc
        if self.result.failed:
            shown = ", ".join(self.result.failed[:5])
            more = len(self.result.failed) - 5
            raise RestoreError(
                f"{len(self.result.failed)} file(s) could not be restored because their data is "
                f"damaged or missing in the store: {shown}{f' and {more} more' if more > 0 else ''}"
                "; they were not written. Run `volplugin verify --read-data`"
            )
        return self.result

    # -- nodes ---------------------------------------------------------------------------
    def _clear(self, dest: str, keep_dir: bool) -> None:
        """Remove whatever a forced restore finds where an entry goes."""
        if self.fresh:
            return
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            shutil.rmtree(dest)
        else:
            os.unlink(dest)

    def _make_dir(self, entry: Entry) -> None:
        dest = self._dest(entry.path)
        if entry.path:
            self._clear(dest, keep_dir=True)
            os.makedirs(dest, mode=0o700, exist_ok=True)
        self._restored.add(entry.path)

    def _temp_name(self, entry: Entry) -> str:
        parent = self._dest(entry.parent)
        return os.path.join(parent, f".bk-restore-{secrets.token_hex(6)}")

    def _prepare(self, entry: Entry, contents: dict[str, _Content], fill: _Fill) -> None:
        """Create the temp file of a file (or of a hard link that needs its own copy)."""
        if entry.kind is Kind.HARDLINK:
            if entry.target in self._restored or entry.target in contents:
                return  # linked in the last pass
            source = self.by_path.get(entry.target)
            if source is None or source.kind is not Kind.FILE:
                return  # reported in the last pass
            entry = replace(
                entry,
                kind=Kind.FILE,
                target="",
                chunks=source.chunks,
                inline=source.inline,
                size=source.size,
            )
        content = _Content(entry, self._temp_name(entry), remaining=0)
        contents[entry.path] = content
        if entry.inline is None:
            content.remaining = len(entry.chunks)
            fill.want(content)

    def _finish(self, entry: Entry, contents: dict[str, _Content]) -> None:
        """Put a file in place if its content is whole; make links and other nodes."""
        content = contents.get(entry.path)
        if content is not None:
            self._place_file(content)
            return
        dest = self._dest(entry.path)
        if entry.kind is Kind.HARDLINK:
            if entry.target in self._restored:
                self._clear(dest, keep_dir=False)
                os.link(self._dest(entry.target), dest)
                self._restored.add(entry.path)
            elif entry.target in contents:
                self.result.failed.append(f"{entry.path} (link target {entry.target} is damaged)")
            else:
                self.result.failed.append(f"{entry.path} (link target {entry.target} is missing)")
            return
        tmp = self._temp_name(entry)
        try:
            if entry.kind is Kind.SYMLINK:
                os.symlink(entry.target, tmp)
            elif entry.kind is Kind.FIFO:
                os.mkfifo(tmp, 0o600)
            else:
                os.mknod(tmp, _NODE_TYPES[entry.kind] | 0o600, os.makedev(*entry.rdev))
            self._attributes(tmp, entry)
            self._clear(dest, keep_dir=False)
            os.rename(tmp, dest)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        self._restored.add(entry.path)

    def _place_file(self, content: _Content) -> None:
        entry = content.entry
        if content.placed:
            return
        if content.failed or content.remaining:
            content.placed = True
            _unlink_quiet(content.tmp)
            self.result.failed.append(content.failed or f"{entry.path} (data not read)")
            return
        if content.created:
            os.truncate(content.tmp, entry.size)  # trailing holes
        else:  # inline, empty or all zeros: nothing was written yet
            fd = os.open(content.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            content.created = True
            try:
                if entry.inline is not None:
                    _write_all(fd, entry.inline)
                else:
                    os.ftruncate(fd, entry.size)
            finally:
                os.close(fd)
        self._attributes(content.tmp, entry)
        dest = self._dest(entry.path)
        self._clear(dest, keep_dir=False)
        os.rename(content.tmp, dest)
        content.placed = True
        self._restored.add(entry.path)
        self.result.files += 1
        if entry.inline is None:
            self.result.bytes += entry.size

    def _attributes(self, dest: str, entry: Entry) -> None:
        """Owner, mode, xattrs and mtime, in the order that keeps setuid bits and caps."""
        try:
            os.lchown(dest, entry.uid, entry.gid)
        except PermissionError:
            if self._is_root:
                raise
        if entry.kind is not Kind.SYMLINK:
            os.chmod(dest, entry.mode & 0o7777)
        for name, value in entry.xattrs.items():
            try:
                os.setxattr(dest, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
        os.utime(dest, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def _pwrite_all(content: _Content, data: bytes, offset: int) -> None:
    fd = os.open(content.tmp, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    content.created = True
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
