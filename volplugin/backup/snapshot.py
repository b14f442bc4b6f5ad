"""Scanning a volume's directory into tree entries, reading only files that changed.

A regular file whose size, mtime, inode, ctime, mode and owner equal those
recorded for the same path in the parent snapshot keeps the parent's entry as
it is (chunks and xattrs: any change of content or xattrs moves the ctime),
without being read or asked for its xattrs. Inode and ctime are kept beside
each entry of the parent's directory tree (``z``), so Entry's JSON stays as
everyone else reads it. Entries are kept in their JSON form (Entry.to_json), so
an unchanged file costs neither decoding nor encoding.

Memory stays bounded by the directories on the walk's current path: the
parent's tree is read one directory node at a time as the walk enters that
directory (``ParentTree``), and each entry goes to ``emit`` as soon as it is
made (a backup hands it to a records.DirTreeWriter, which writes a directory's
node when the walk leaves it). An unchanged file's entry is taken only if the
store's index still lists every chunk it names (a damaged or pruned parent);
otherwise the file is read again, so the backup is whole and the store mended.

The walk is confined to the volume, which a container writes while we read it
as root: every directory is held open by descriptor and its children are
listed, stat'ed, opened and read relative to it (``*at`` calls, ``O_NOFOLLOW``),
never through a joined path. A subdirectory or file is opened only if it is
still the inode (st_dev, st_ino) that its lstat saw; one that turned into a
symlink or was swapped for something else between the two is skipped, logged
and counted in ``ScanResult.skipped``, never followed.

A ``progress`` callback gets (files, bytes) after each regular file; it may raise to
stop the scan (a cancelled job).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from layerfs import confined
from layerfs.errors import LayerfsError
from layerfs.records import BadTree, Entry, Kind, dir_tree_root, kind_from_mode, read_node
from layerfs.store.chunks import ChunkStore, WriteStats
from volplugin.backup.errors import BackupError

# Files up to this size are kept inline in their directory's tree node. Small, so
# that a node (rewritten whenever one entry of its directory changes) stays small:
# with 2048, a backup after changing 100 files of 1-4 KiB in 100 directories of a
# 200,000-file volume uploaded 4.6 MiB of nodes (benchmarks/RESULTS.md).
INLINE_MAX = 256
_FILE = Kind.FILE.value
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

log = logging.getLogger("volplugin.backup")


@dataclass(frozen=True)
class ParentDir:
    """One directory of the parent snapshot: its regular files (item, ino, ctime_ns) and
    the nodes of its subdirectories, by name."""

    files: dict[str, tuple[dict, int, int]] = field(default_factory=dict)
    subdirs: dict[str, str] = field(default_factory=dict)


_NO_DIR = ParentDir()


@dataclass
class ParentTree:
    """The parent snapshot's directory tree, read one node at a time as the walk enters it.

    An empty ParentTree() has no parent: every file is read. ``gone`` counts the
    unchanged files that were read again because a chunk of theirs is no longer
    in the store. Without ``identity`` the parent was taken on another host (a
    roaming volume's head), whose inodes and ctimes say nothing here: a file is
    unchanged if its size, mtime, mode and owner match (as restic's
    --ignore-inode --ignore-ctime).
    """

    store: ChunkStore | None = None
    root_node: str | None = None
    gone: int = 0
    identity: bool = True

    @classmethod
    def of(cls, store: ChunkStore, tree: str, *, identity: bool = True) -> ParentTree:
        """The parent whose root record is ``tree``; raises BadTree or StoreError."""
        return cls(store, dir_tree_root(store, tree), identity=identity)

    def root(self) -> ParentDir:
        return self._load(self.root_node, "")

    def child(self, folder: ParentDir, name: str, rel: str) -> ParentDir:
        return self._load(folder.subdirs.get(name), rel)

    def _load(self, node_id: str | None, rel: str) -> ParentDir:
        if node_id is None or self.store is None:
            return _NO_DIR
        try:
            items = read_node(self.store, node_id, rel)
        except (LayerfsError, BadTree) as exc:
            log.warning("parent backup's node of %r unreadable (%s): reading it all", rel, exc)
            return _NO_DIR
        files: dict[str, tuple[dict, int, int]] = {}
        subdirs: dict[str, str] = {}
        for item in items:
            name = item.get("p") if isinstance(item, dict) else None
            if not isinstance(name, str) or not name or "/" in name:
                continue
            kind, z = item.get("k"), item.get("z")
            if kind == _FILE and isinstance(z, list) and len(z) == 2:
                ino, ctime_ns = z
                if isinstance(ino, int) and isinstance(ctime_ns, int):
                    files[name] = (item, ino, ctime_ns)
            elif kind == Kind.DIR.value and isinstance(item.get("n"), str):
                subdirs[name] = item["n"]
        return ParentDir(files, subdirs)

    def unchanged(self, folder: ParentDir, name: str, rel: str, st: os.stat_result) -> dict | None:
        """The parent's entry (JSON, path ``rel``) of a file unchanged since, else None."""
        found = folder.files.get(name)
        if found is None:
            return None
        item, ino, ctime_ns = found
        if not (
            (not self.identity or (ino == st.st_ino and ctime_ns == st.st_ctime_ns))
            and item.get("t", 0) == st.st_mtime_ns
            and item.get("s", 0) == st.st_size
            and item.get("m", 0) == stat.S_IMODE(st.st_mode)
            and item.get("u", 0) == st.st_uid
            and item.get("g", 0) == st.st_gid
        ):
            return None
        has_blob = self.store.backend.has_blob  # type: ignore[union-attr]
        if not all(has_blob(digest) for digest, _size in item.get("c") or ()):
            self.gone += 1
            return None
        doc = {k: v for k, v in item.items() if k not in ("z", "n")}
        doc["p"] = rel
        return doc


@dataclass
class ScanResult:
    """What a scan found and cost; the entries (JSON form) and their [ino, ctime_ns] pairs
    too when the scanner was given no ``emit``."""

    docs: list[dict] = field(default_factory=list)
    stat: list[list[int]] = field(default_factory=list)
    files: int = 0
    size: int = 0
    bytes_read: int = 0
    files_read: int = 0
    writes: WriteStats = field(default_factory=WriteStats)
    skipped: list[str] = field(default_factory=list)  # changed identity mid-walk: not followed

    @property
    def entries(self) -> list[Entry]:
        """The entries as Entry objects (decoded from ``docs``)."""
        return [Entry.from_json(doc) for doc in self.docs]


class _Changed(Exception):
    """The name no longer holds the inode its lstat saw (swapped mid-walk)."""


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_ino == b.st_ino and a.st_dev == b.st_dev


class Scanner:
    """Walks one directory tree into entries; see the module docstring."""

    def __init__(
        self,
        store: ChunkStore,
        root: Path,
        parent: ParentTree,
        emit: Callable[[dict, list[int]], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.store = store
        self._progress = progress
        self.root = Path(root)
        self.parent = parent
        self.result = ScanResult()
        self._emit = emit or self._keep
        self._links: dict[tuple[int, int], str] = {}  # (dev, ino) -> first path

    def scan(self) -> ScanResult:
        try:
            fd = confined.open_root(self.root)
        except confined.Escape as exc:
            raise BackupError(
                f"{self.root} is not a directory: give the volume's directory"
            ) from exc
        except OSError as exc:
            raise BackupError(
                f"cannot read the volume directory {self.root}: {exc.strerror}"
            ) from exc
        try:
            st = os.fstat(fd)
            self._append_entry(self._entry("", st, confined.read_xattrs(fd, fd, ".")), st)
            self._walk(fd, "", self.parent.root())
        finally:
            os.close(fd)
        if self.result.skipped:
            log.warning(
                "backup of %s: %d path(s) changed while read and were skipped: %s",
                self.root,
                len(self.result.skipped),
                ", ".join(self.result.skipped[:20]),
            )
        return self.result

    def _skip(self, rel: str, why: str) -> None:
        log.warning("backup of %s: skipped %r: %s; not followed", self.root, rel, why)
        self.result.skipped.append(rel)

    def _walk(self, dirfd: int, rel: str, before: ParentDir) -> None:
        try:
            with os.scandir(dirfd) as found:
                children = sorted(found, key=lambda d: d.name)
        except OSError as exc:
            raise BackupError(f"cannot list {self.root / rel}: {exc.strerror}") from exc
        for dirent in children:
            name = dirent.name
            child = f"{rel}/{name}" if rel else name
            try:
                st = dirent.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we scan
            try:
                if stat.S_ISDIR(st.st_mode):
                    self._dir(dirfd, name, child, st, before)
                else:
                    self._add(dirfd, name, child, st, before)
            except FileNotFoundError:
                continue  # removed while we read it
            except _Changed as exc:
                self._skip(child, str(exc))

    def _dir(self, dirfd: int, name: str, rel: str, st: os.stat_result, before: ParentDir) -> None:
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _Changed("the directory was replaced (by a symlink or a file)") from None
            raise
        try:
            if not _same(os.fstat(fd), st):
                raise _Changed("the directory was replaced by another one")
            self._append_entry(self._entry(rel, st, confined.read_xattrs(fd, fd, ".")), st)
            self._walk(fd, rel, self.parent.child(before, name, rel))
        finally:
            os.close(fd)

    def _entry(self, rel: str, st: os.stat_result, xattrs: dict[str, bytes]) -> Entry:
        return Entry(
            path=rel,
            kind=kind_from_mode(st.st_mode),
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            xattrs=xattrs,
        )

    def _append_entry(self, entry: Entry, st: os.stat_result) -> None:
        self._append(entry.to_json(), st)

    def _add(self, dirfd: int, name: str, rel: str, st: os.stat_result, before: ParentDir) -> None:
        """A non-directory child ``name`` of ``dirfd`` whose lstat is ``st``."""
        if stat.S_ISREG(st.st_mode):
            if self._reuse(before, name, rel, st):
                return
            self._file(dirfd, name, rel, st)
            return
        entry = self._entry(rel, st, confined.read_xattrs(None, dirfd, name))
        if entry.kind is Kind.SYMLINK:
            try:
                entry.target = os.readlink(name, dir_fd=dirfd)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise _Changed("the symlink was replaced") from None
                raise
        elif entry.kind in (Kind.CHAR, Kind.BLOCK):
            entry.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        self._append(entry.to_json(), st)

    def _file(self, dirfd: int, name: str, rel: str, st: os.stat_result) -> None:
        if st.st_nlink > 1:
            first = self._links.get((st.st_dev, st.st_ino))
            if first is not None:
                entry = self._entry(rel, st, confined.read_xattrs(None, dirfd, name))
                entry.kind = Kind.HARDLINK
                entry.target = first
                self._append(entry.to_json(), st)
                return
        fd = self._open_file(dirfd, name, rel, st)
        try:
            entry = self._entry(rel, st, confined.read_xattrs(fd, dirfd, name))
            self._content(fd, entry, st)
        finally:
            os.close(fd)
        if st.st_nlink > 1:
            self._links[(st.st_dev, st.st_ino)] = rel
        self.result.files += 1
        self.result.size += entry.size
        self._append(entry.to_json(), st)
        if self._progress is not None:
            self._progress(self.result.files, self.result.size)

    def _open_file(self, dirfd: int, name: str, rel: str, st: os.stat_result) -> int:
        """A read descriptor of the regular file ``name``, if it is still the lstat's inode."""
        try:
            return confined.open_file_at(dirfd, name, same_as=st, noatime=True)
        except confined.Escape as exc:
            raise _Changed(exc.strerror) from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise BackupError(f"cannot read {self.root / rel}: {exc.strerror}") from exc

    def _reuse(self, before: ParentDir, name: str, rel: str, st: os.stat_result) -> bool:
        """Take the parent's entry of an unchanged file (not a second name of a link)."""
        if st.st_nlink > 1 and (st.st_dev, st.st_ino) in self._links:
            return False
        doc = self.parent.unchanged(before, name, rel, st)
        if doc is None:
            return False
        if st.st_nlink > 1:
            self._links[(st.st_dev, st.st_ino)] = rel
        self.result.files += 1
        self.result.size += st.st_size
        self._append(doc, st)
        if self._progress is not None:
            self._progress(self.result.files, self.result.size)
        return True

    def _append(self, doc: dict, st: os.stat_result) -> None:
        self._emit(doc, [st.st_ino, st.st_ctime_ns])

    def _keep(self, doc: dict, extra: list[int]) -> None:
        self.result.docs.append(doc)
        self.result.stat.append(extra)

    def _content(self, fd: int, entry: Entry, st: os.stat_result) -> None:
        if st.st_size <= INLINE_MAX:
            data = os.read(fd, INLINE_MAX + 1)
            if len(data) <= INLINE_MAX:
                entry.inline, entry.size = data, len(data)
                self._count_read(len(data))
                return
            os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            entry.chunks = self.store.write_stream(f, self.result.writes)
        entry.size = sum(ref.size for ref in entry.chunks)
        self._count_read(entry.size)

    def _count_read(self, n: int) -> None:
        self.result.bytes_read += n
        self.result.files_read += 1
