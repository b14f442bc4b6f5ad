"""Restoring a snapshot's entries into a directory, with every attribute, confined to it.

The target may be a live volume whose container swaps directories for symlinks
while we write as root, so nothing here works on joined path strings: the target
is opened once (``layerfs.confined.open_root``) and every directory is reached
from it one component at a time without following symlinks (``DirFds``). A
component that is not a plain directory stops the restore with a RestoreError
naming the path; nothing is ever written outside the target.

A run works in three passes. First it creates the directories and a private staging
directory at the target's root (mode 0700, held open by descriptor), where every new
node starts under a temp name. Then it fetches every chunk the files need once with
the store's bulk read (few large range GETs for S3, fetched ahead on several
threads), and writes each verified chunk into every place it goes with ``pwrite`` on
the temp file, opened through the staging descriptor with ``O_NOFOLLOW`` (created
``O_EXCL`` at its first chunk); all-zero chunks are left as holes, so sparse files
stay sparse. Once a file's last chunk is written, it gets its size and attributes on
the same open descriptor, so a small file costs one open. Last, in entry order, each
file whose chunks all arrived is renamed into place (descriptor to descriptor; a
damaged or missing chunk never leaves wrong bytes under a file's name), and links,
symlinks and device nodes are made the same way. Directory attributes are applied
last, deepest first, on their descriptors. When the disk fills up, the files that
were complete are still put in place before the error.

A run does not sync; a restore runs inside ``synced``, which has the kernel write the
restored files back while later ones are still being written, and returns once
everything is on disk. A ``progress`` callback gets (files, bytes) restored after each
entry; it may raise to stop the restore between entries (a cancelled job).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerfs.confined import (
    Attributes,
    DirFds,
    Escape,
    apply_at,
    apply_fd,
    lstat_at,
    open_root,
    remove_at,
    split,
    syncfs,
)
from layerfs.records import Entry, Kind
from layerfs.store.chunks import ChunkStore
from volplugin.backup.errors import RestoreError

_NODE_TYPES = {Kind.CHAR: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK, Kind.SOCKET: stat.S_IFSOCK}
# pack ranges fetched ahead of the restore's writing: from Ceph RGW on this machine 2, 3, 4
# and 8 restored 2 GiB equally fast (8.7-9.6 s); each adds a range (up to 8 MiB) in memory
WORKERS = 4
BATCH = 32768  # entries a run handles at once (their content is fetched together)
# seconds between the syncfs calls of a restore (``synced``): on ext4 here a 2 GiB restore
# from RGW ending in one syncfs took 8.7-10.0 s, syncing every 0.5 s as well 8.4-9.1 s
WRITEBACK_EVERY = 0.5
STAGING_PREFIX = ".bk-restore-"
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class RestoreResult:
    """What a restore wrote."""

    entries: int = 0
    files: int = 0
    bytes: int = 0
    failed: list[str] = field(default_factory=list)


def in_subpath(entry: Entry, subpath: str | None) -> bool:
    """Whether a restore of ``subpath`` (all if None) takes ``entry``: the entries under it
    and the directories above it."""
    if not subpath:
        return True
    sub = subpath.strip("/")
    path = entry.path
    if path == sub or path.startswith(sub + "/"):
        return True
    return entry.kind is Kind.DIR and (path == "" or sub.startswith(path + "/"))


def select_entries(entries: Iterable[Entry], subpath: str | None) -> Iterator[Entry]:
    """The entries under ``subpath`` (and its parent directories), or all of them."""
    return (e for e in entries if in_subpath(e, subpath))


def check_target(target: Path, force: bool) -> bool:
    """Refuse a target that exists and is not an empty directory, unless forced.

    Returns whether the target is fresh (missing or empty): nothing to clear.
    """
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(st.st_mode):
        raise RestoreError(f"restore target {target} exists and is not a directory")
    with os.scandir(target) as it:
        empty = next(it, None) is None
    if not force and not empty:
        raise RestoreError(
            f"restore target {target} is not empty: restore into an empty volume or pass --force"
        )
    return empty


@contextmanager
def synced(target: Path) -> Iterator[None]:
    """Make what the ``with`` block restores under ``target`` durable, paying for it as
    the block runs: a thread calls syncfs(2) on the target's filesystem every
    WRITEBACK_EVERY seconds meanwhile, so the kernel writes files back while later ones
    are still being written rather than all at the end; after the block, one more
    syncfs waits for the rest. syncfs flushes the whole filesystem, what other writers
    left dirty there too, as one final sync always did, only sooner.

    The target (made if missing: the host's side) is opened before the block runs, and
    syncfs reports a writeback error that happened since then (Linux 5.8): it raises
    RestoreError, as does an error from the block's own syncs. Nothing is synced after
    a block that raised.
    """
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd = open_root(target)
    except OSError as exc:
        raise RestoreError(f"cannot open the restore target {target}: {exc}") from exc
    stop = threading.Event()
    failed: list[OSError] = []

    def write_back() -> None:
        while not stop.wait(WRITEBACK_EVERY):
            try:
                syncfs(fd)
            except OSError as exc:
                failed.append(exc)
                return

    thread = threading.Thread(target=write_back, name="restore-writeback", daemon=True)
    thread.start()
    try:
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if not failed:
            try:
                syncfs(fd)
            except OSError as exc:
                failed.append(exc)
    finally:
        os.close(fd)
    if failed:
        raise RestoreError(
            f"writing the restored files to the disk of {target} failed: {failed[0]}"
        ) from failed[0]


def _attrs(entry: Entry) -> Attributes:
    return Attributes(entry.uid, entry.gid, entry.mode, entry.mtime_ns, entry.xattrs)


@dataclass(eq=False)
class _Content:
    """A file being filled: its entry, temp name, chunk places still to come, how far
    its written bytes reach, failure."""

    entry: Entry
    tmp: str
    remaining: int
    written_end: int = 0  # end of the last non-zero chunk written
    failed: str = ""
    created: bool = False  # the temp file exists
    ready: bool = False  # its content, size and attributes are set: only the rename is left
    placed: bool = False  # renamed into place, or removed


class _WriteFailed(Exception):
    """Writing a file's content failed (raised from a reader thread)."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(path)
        self.path = path
        self.error = error


class _Fill:
    """The content pass of one run: which chunk goes where, and the callbacks that write it.

    ``seal`` gives a file whose content is complete its size and attributes (on its
    open descriptor), once its last chunk is written. The store calls ``consume``
    and ``fail`` on the restore's own thread (Backend.read_blobs).
    """

    def __init__(self, staging: int, seal: Callable[[_Content, int], None]) -> None:
        self.staging = staging
        self.seal = seal
        self.sizes: dict[str, int] = {}
        self.places: dict[str, list[tuple[_Content, int]]] = {}

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
            try:
                self._write(content, None if zero else data, offset)
            except OSError as exc:
                raise _WriteFailed(content.entry.path, exc) from exc

    def fail(self, digest: str, exc: Exception) -> None:
        for content, _ in self.places[digest]:
            if not content.failed:
                content.failed = f"{content.entry.path} ({exc})"

    def _write(self, content: _Content, data: bytes | None, offset: int) -> None:
        """One chunk at ``offset`` (None: zeros, left as a hole); the last one seals."""
        fd = -1
        try:
            if data is not None:
                fd = self.open(content)
                _pwrite_all(fd, data, offset)
            if data is not None:
                content.written_end = max(content.written_end, offset + len(data))
            content.remaining -= 1
            if not content.remaining and not content.failed:
                if fd < 0:
                    fd = self.open(content)
                self.seal(content, fd)
                content.ready = True
        finally:
            if fd >= 0:
                os.close(fd)

    def open(self, content: _Content) -> int:
        """The temp file, made (O_EXCL) when its first chunk comes."""
        if content.created:
            return os.open(content.tmp, _REOPEN, dir_fd=self.staging)
        fd = os.open(content.tmp, _NEW, 0o600, dir_fd=self.staging)
        content.created = True
        return fd


class _Run:
    """The descriptors of one run: the target, its directories, the staging directory;
    the temp names in it."""

    def __init__(self, target: Path) -> None:
        self.dirs = DirFds.open(target)
        self.root = self.dirs.root
        self.staging_name = f"{STAGING_PREFIX}{secrets.token_hex(6)}"
        self._names = itertools.count()
        try:
            os.mkdir(self.staging_name, 0o700, dir_fd=self.root)
            self.staging = os.open(self.staging_name, _DIR, dir_fd=self.root)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(self.staging_name, dir_fd=self.root)
            self.dirs.close()
            raise

    def tmp_name(self) -> str:
        """A name not used before in this run's staging directory."""
        return f"{next(self._names):x}"

    def drop_staging(self) -> None:
        """Remove the staging directory (with whatever an error left in it); idempotent."""
        if self.staging < 0:
            return
        os.close(self.staging)
        self.staging = -1
        st = lstat_at(self.root, self.staging_name)
        if st is not None and stat.S_ISDIR(st.st_mode):
            remove_at(self.root, self.staging_name)

    def close(self) -> None:
        try:
            self.drop_staging()
        finally:
            self.dirs.close()


class Restorer:
    """Writes selected entries under a target directory; see the module docstring.

    ``run`` may be called several times (lazy restores fill one entry at a time):
    what earlier runs restored stays known, so hard links find their targets.
    """

    def __init__(
        self,
        store: ChunkStore,
        target: Path,
        link_sources: dict[str, Entry],
        workers: int = WORKERS,
        *,
        fresh: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.store = store
        self.progress = progress
        self.target = Path(target)
        self.workers = workers
        self.fresh = fresh  # the target was empty: nothing to clear out of the way
        # the entries hard links name (at least): a link to a file this run does not
        # restore gets a copy of its content
        self.link_sources = link_sources
        self.result = RestoreResult()
        self._inline_bytes = 0  # of files placed (result.bytes counts the others)
        self._restored: set[str] = set()  # restored paths that are in link_sources
        self._is_root = os.geteuid() == 0
        self._run: _Run | None = None

    @property
    def _r(self) -> _Run:
        assert self._run is not None
        return self._run

    def run(self, entries: Iterable[Entry]) -> RestoreResult:
        try:
            self.target.mkdir(parents=True, exist_ok=True)  # the host's side: trusted
            self._run = _Run(self.target)
        except OSError as exc:
            raise RestoreError(f"cannot open the restore target {self.target}: {exc}") from exc
        try:
            self._passes(entries)
        except _Failed as exc:
            current, err = exc.path, exc.error
            if isinstance(err, Escape):
                raise RestoreError(
                    f"restore into {self.target} stopped at {current or '/'!r}: {err.strerror}; "
                    "nothing was written outside the target"
                ) from err
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise RestoreError(
                    f"no space left on the device of {self.target} while restoring "
                    f"{current or 'file content'}: free space or restore elsewhere "
                    f"({self.result.files} files were restored completely)"
                ) from err
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise RestoreError(
                    f"restore into {self.target} stopped at {current or '/'!r}: it was replaced "
                    f"by a symlink or a file meanwhile ({err}); nothing was written outside "
                    "the target"
                ) from err
            raise RestoreError(
                f"restore into {self.target} failed at {current or '/'!r}: {err}"
            ) from err
        finally:
            run, self._run = self._run, None
            if run is not None:
                with contextlib.suppress(OSError):
                    run.close()
        if self.result.failed:
            shown = ", ".join(self.result.failed[:5])
            more = len(self.result.failed) - 5
            raise RestoreError(
                f"{len(self.result.failed)} file(s) could not be restored because their data is "
                f"damaged or missing in the store: {shown}{f' and {more} more' if more > 0 else ''}"
                "; they were not written. Run `volplugin verify --read-data`"
            )
        return self.result

    def _passes(self, entries: Iterable[Entry]) -> None:
        """The three passes, BATCH entries at a time; an OSError comes out as _Failed
        naming the entry. Directory attributes wait for the end (deepest first)."""
        dirs: list[Entry] = []
        it = iter(entries)
        while batch := list(itertools.islice(it, BATCH)):
            self._batch(batch, dirs)
        current = ""
        try:
            self._r.drop_staging()  # before the root's mtime is set
            for entry in reversed(dirs):
                current = entry.path
                apply_fd(self._dir(entry.path), _attrs(entry), owner_required=self._is_root)
        except OSError as exc:
            raise _Failed(current, exc) from exc

    def _batch(self, entries: list[Entry], dirs: list[Entry]) -> None:
        contents: dict[str, _Content] = {}
        fill = _Fill(self._r.staging, self._seal)
        current = ""
        try:
            try:
                for entry in entries:
                    current = entry.path
                    self._report()
                    if entry.kind is Kind.DIR:
                        self._make_dir(entry)
                        self.result.entries += 1
                        dirs.append(entry)
                    elif entry.kind in (Kind.FILE, Kind.HARDLINK):
                        self._prepare(entry, contents, fill)
                current = ""
                self.store.read_chunks(fill.sizes, fill.consume, fill.fail, self.workers)
                for entry in entries:
                    current = entry.path
                    self._report()
                    if entry.kind not in (Kind.DIR, Kind.WHITEOUT, Kind.OPAQUE):
                        self._finish(entry, contents)
                        self.result.entries += 1
                self._report()
            except _WriteFailed as exc:
                current = exc.path
                for entry in entries:  # keep what is complete
                    content = contents.get(entry.path)
                    if content is not None and (content.ready or not content.entry.chunks):
                        self._finish(entry, contents)
                raise exc.error from None
        except OSError as exc:
            raise _Failed(current, exc) from exc

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.result.files, self.result.bytes + self._inline_bytes)

    def _done(self, path: str) -> None:
        if path in self.link_sources:
            self._restored.add(path)

    # -- nodes ---------------------------------------------------------------------------
    def _dir(self, path: str, create: int | None = None) -> int:
        """The descriptor of directory ``path`` of the target (Escape if it is not one)."""
        return self._r.dirs.get(path, create=create)

    def _clear(self, parent: int, name: str, path: str, keep_dir: bool) -> None:
        """Remove whatever a forced restore finds where an entry goes."""
        if self.fresh:
            return
        st = lstat_at(parent, name)
        if st is None or (keep_dir and stat.S_ISDIR(st.st_mode)):
            return
        if stat.S_ISDIR(st.st_mode):
            self._r.dirs.forget(path)
            remove_at(parent, name)
        elif keep_dir:
            os.unlink(name, dir_fd=parent)

    def _make_dir(self, entry: Entry) -> None:
        if entry.path:
            parent_path, name = split(entry.path)
            parent = self._dir(parent_path, create=0o700)
            self._clear(parent, name, entry.path, keep_dir=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
            self._dir(entry.path)  # refuses a symlink put there meanwhile
        self._done(entry.path)

    def _prepare(self, entry: Entry, contents: dict[str, _Content], fill: _Fill) -> None:
        """Pick the temp name of a file (or of a hard link that needs its own copy)."""
        if entry.kind is Kind.HARDLINK:
            if entry.target in self._restored or entry.target in contents:
                return  # linked in the last pass
            source = self.link_sources.get(entry.target)
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
        content = _Content(entry, self._r.tmp_name(), remaining=0)
        contents[entry.path] = content
        if entry.inline is None:
            content.remaining = len(entry.chunks)
            fill.want(content)

    def _put(self, tmp: str, path: str) -> None:
        """Rename the staged ``tmp`` to ``path``, replacing what is there (never following)."""
        parent_path, name = split(path)
        if not name:
            raise OSError(errno.EISDIR, "the root of the target can only be a directory")
        parent = self._dir(parent_path, create=0o700)
        self._clear(parent, name, path, keep_dir=False)
        os.rename(tmp, name, src_dir_fd=self._r.staging, dst_dir_fd=parent)

    def _finish(self, entry: Entry, contents: dict[str, _Content]) -> None:
        """Put a file in place if its content is whole; make links and other nodes."""
        content = contents.get(entry.path)
        if content is not None:
            self._place_file(content)
            return
        if entry.kind is Kind.HARDLINK:
            if entry.target in self._restored:
                self._link(entry)
            elif entry.target in contents:
                self.result.failed.append(f"{entry.path} (link target {entry.target} is damaged)")
            else:
                self.result.failed.append(f"{entry.path} (link target {entry.target} is missing)")
            return
        staging = self._r.staging
        tmp = self._r.tmp_name()
        try:
            if entry.kind is Kind.SYMLINK:
                os.symlink(entry.target, tmp, dir_fd=staging)
            elif entry.kind is Kind.FIFO:
                os.mkfifo(tmp, 0o600, dir_fd=staging)
            else:
                mode = _NODE_TYPES[entry.kind] | 0o600
                os.mknod(tmp, mode, os.makedev(*entry.rdev), dir_fd=staging)
            apply_at(staging, tmp, _attrs(entry), owner_required=self._is_root)
            self._put(tmp, entry.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=staging)
            raise
        self._done(entry.path)

    def _link(self, entry: Entry) -> None:
        """A hard link to an entry already restored: made in staging, renamed into place."""
        source_parent, source_name = split(entry.target)
        source = os.dup(self._dir(source_parent))  # kept open while the next walk runs
        tmp = self._r.tmp_name()
        try:
            os.link(
                source_name,
                tmp,
                src_dir_fd=source,
                dst_dir_fd=self._r.staging,
                follow_symlinks=False,
            )
            self._put(tmp, entry.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._r.staging)
            raise
        finally:
            os.close(source)
        self._done(entry.path)

    def _seal(self, content: _Content, fd: int) -> None:
        """Give a file whose content is written (``fd``, open for writing) its inline
        bytes, size and attributes; runs on the thread that wrote its last chunk."""
        entry = content.entry
        if entry.inline is not None:
            _write_all(fd, entry.inline)
        elif content.written_end != entry.size:
            os.ftruncate(fd, entry.size)  # trailing holes
        apply_fd(fd, _attrs(entry), owner_required=self._is_root)

    def _place_file(self, content: _Content) -> None:
        entry = content.entry
        if content.placed:
            return
        if content.failed or content.remaining:
            content.placed = True
            if content.created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(content.tmp, dir_fd=self._r.staging)
            self.result.failed.append(content.failed or f"{entry.path} (data not read)")
            return
        if not content.ready:  # inline or empty: no chunk to wait for
            fd = os.open(content.tmp, _NEW, 0o600, dir_fd=self._r.staging)
            content.created = True
            try:
                self._seal(content, fd)
            finally:
                os.close(fd)
            content.ready = True
        self._put(content.tmp, entry.path)
        content.placed = True
        self._done(entry.path)
        self.result.files += 1
        if entry.inline is None:
            self.result.bytes += entry.size
        else:
            self._inline_bytes += len(entry.inline)


class _Failed(Exception):
    """An OSError while restoring the entry at ``path``."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(path)
        self.path = path
        self.error = error


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
