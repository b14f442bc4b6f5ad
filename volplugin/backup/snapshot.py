"""Scanning a volume's directory into tree entries, reading only files that changed.

A regular file whose size, mtime, inode, ctime, mode and owner equal those
recorded for the same path in the parent snapshot keeps the parent's entry as
it is (chunks and xattrs: any change of content or xattrs moves the ctime),
without being read or asked for its xattrs. Inode and ctime live in the tree
record's meta (``meta["stat"]``: one ``[ino, ctime_ns]`` pair per entry, in entry
order), so Entry's JSON stays as everyone else reads it. Entries are kept in
their JSON form (Entry.to_json), so an unchanged file costs neither decoding nor
encoding.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.records import Entry, Kind, kind_from_mode
from layerfs.store.chunks import ChunkStore, WriteStats
from volplugin.backup.errors import BackupError

INLINE_MAX = 2048
META_STAT = "stat"
_FILE = Kind.FILE.value


@dataclass
class ParentIndex:
    """The regular files of the parent snapshot, by path: (entry JSON, ino, ctime_ns)."""

    files: dict[str, tuple[dict, int, int]] = field(default_factory=dict)

    @classmethod
    def from_docs(cls, docs: list[dict], meta: dict) -> ParentIndex:
        """From a tree record's entries in JSON form (records.decode_tree_docs)."""
        stats = meta.get(META_STAT) or []
        if len(stats) != len(docs):
            return cls()
        return cls(
            {
                doc["p"]: (doc, ino, ctime_ns)
                for doc, (ino, ctime_ns) in zip(docs, stats, strict=True)
                if doc["k"] == _FILE
            }
        )

    def unchanged(self, path: str, st: os.stat_result) -> dict | None:
        """The parent's entry of ``path`` if the file is unchanged since, else None."""
        found = self.files.get(path)
        if found is None:
            return None
        doc, ino, ctime_ns = found
        if (
            ino == st.st_ino
            and ctime_ns == st.st_ctime_ns
            and doc.get("t", 0) == st.st_mtime_ns
            and doc.get("s", 0) == st.st_size
            and doc.get("m", 0) == stat.S_IMODE(st.st_mode)
            and doc.get("u", 0) == st.st_uid
            and doc.get("g", 0) == st.st_gid
        ):
            return doc
        return None


@dataclass
class ScanResult:
    """The entries of a snapshot (JSON form), their [ino, ctime_ns] pairs, what reading cost."""

    docs: list[dict] = field(default_factory=list)
    stat: list[list[int]] = field(default_factory=list)
    files: int = 0
    size: int = 0
    bytes_read: int = 0
    files_read: int = 0
    writes: WriteStats = field(default_factory=WriteStats)

    @property
    def entries(self) -> list[Entry]:
        """The entries as Entry objects (decoded from ``docs``)."""
        return [Entry.from_json(doc) for doc in self.docs]


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out = {}
    for name in sorted(names):
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed meanwhile
                raise
    return out


class Scanner:
    """Walks one directory tree into entries; see the module docstring."""

    def __init__(self, store: ChunkStore, root: Path, parent: ParentIndex) -> None:
        self.store = store
        self.root = Path(root)
        self.parent = parent
        self.result = ScanResult()
        self._links: dict[tuple[int, int], str] = {}  # (dev, ino) -> first path

    def scan(self) -> ScanResult:
        try:
            st = os.lstat(self.root)
        except OSError as exc:
            raise BackupError(
                f"cannot read the volume directory {self.root}: {exc.strerror}"
            ) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise BackupError(f"{self.root} is not a directory: give the volume's directory")
        self._add(str(self.root), "", st)
        self._walk(str(self.root), "")
        return self.result

    def _walk(self, dirpath: str, rel: str) -> None:
        try:
            names = sorted(os.listdir(dirpath))
        except OSError as exc:
            raise BackupError(f"cannot list {dirpath}: {exc.strerror}") from exc
        for name in names:
            full = os.path.join(dirpath, name)
            child = f"{rel}/{name}" if rel else name
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue  # removed while we scan
            try:
                self._add(full, child, st)
            except FileNotFoundError:
                continue  # removed while we read it
            if stat.S_ISDIR(st.st_mode):
                self._walk(full, child)

    def _add(self, full: str, rel: str, st: os.stat_result) -> None:
        if stat.S_ISREG(st.st_mode) and self._reuse(rel, st):
            return
        kind = kind_from_mode(st.st_mode)
        entry = Entry(
            path=rel,
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            xattrs=_xattrs(full),
        )
        if kind is Kind.SYMLINK:
            entry.target = os.readlink(full)
        elif kind in (Kind.CHAR, Kind.BLOCK):
            entry.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif kind is Kind.FILE:
            if st.st_nlink > 1:
                first = self._links.get((st.st_dev, st.st_ino))
                if first is not None:
                    entry.kind = Kind.HARDLINK
                    entry.target = first
                    self._append(entry.to_json(), st)
                    return
            self._content(full, entry, st)
            if st.st_nlink > 1:
                self._links[(st.st_dev, st.st_ino)] = rel
            self.result.files += 1
            self.result.size += entry.size
        self._append(entry.to_json(), st)

    def _reuse(self, rel: str, st: os.stat_result) -> bool:
        """Take the parent's entry of an unchanged file (not a second name of a link)."""
        if st.st_nlink > 1 and (st.st_dev, st.st_ino) in self._links:
            return False
        doc = self.parent.unchanged(rel, st)
        if doc is None:
            return False
        if st.st_nlink > 1:
            self._links[(st.st_dev, st.st_ino)] = rel
        self.result.files += 1
        self.result.size += st.st_size
        self._append(doc, st)
        return True

    def _append(self, doc: dict, st: os.stat_result) -> None:
        self.result.docs.append(doc)
        self.result.stat.append([st.st_ino, st.st_ctime_ns])

    def _content(self, full: str, entry: Entry, st: os.stat_result) -> None:
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
        except PermissionError:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise BackupError(f"cannot read {full}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb", buffering=0) as f:
            if st.st_size <= INLINE_MAX:
                data = f.read(INLINE_MAX + 1)
                if len(data) <= INLINE_MAX:
                    entry.inline, entry.size = data, len(data)
                    self._count_read(len(data))
                    return
                f.seek(0)
            entry.chunks = self.store.write_stream(f, self.result.writes)
        entry.size = sum(ref.size for ref in entry.chunks)
        self._count_read(entry.size)

    def _count_read(self, n: int) -> None:
        self.result.bytes_read += n
        self.result.files_read += 1
