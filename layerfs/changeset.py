"""What a writable mount changed: its upper directory turned into OCI changeset entries.

The upper directory (overlayfs' format, layerfs.union.vocab) says *which*
paths changed: a character device 0/0 is a whiteout, a directory with
``trusted.overlay.opaque=y`` replaced its lower namesake, anything else was
added or modified (a metacopy file, ``trusted.overlay.metacopy``, holds only
metadata: its bytes are still the lower file's). By default metadata and
content are read through the mountpoint, which shows the merged tree. With
``upper_exact`` (a mount of layerfs, where the upper tree holds exactly what
the mount shows for its entries) they are read from the upper tree itself,
and a metacopy file takes its lower file's inline bytes or chunk references,
so a chmod of a large file reads nothing. A directory carrying
``trusted.overlay.redirect`` (a rename kept as a pointer) is treated as
opaque and its children are listed and read through the mount.

Files of at most INLINE_MAX bytes are kept inline in their entry, as an
import keeps them, not stored as chunks; larger files' new chunks are
compressed and written on worker threads while the next files are read.

Access is confined: the upper tree and the mount are both written by the
container, so every path below either root is reached through directory
descriptors opened one no-follow component at a time (layerfs.confined), and
files are opened only if they are regular files; a symlink planted in place of
a directory is read as a symlink, never followed.

Order of the changeset: depth first, a directory before its children, its
opaque marker right after it, whiteouts before their siblings, names sorted
bytewise; no path appears twice.

Hardlinks: regular files are grouped by the mount's (st_dev, st_ino). The first
member in changeset order carries the content and the others are tar links to
it. If the mount says a group has more names than the upper holds (a new link
to an unchanged lower file), those lower names are found among the lower files
of the same size and re-emitted in the layer (with any missing parent
directories), so every link target is inside the layer itself: appliers such as
Docker's overlay2 driver cannot link to a file of a lower layer. This is also
what overlayfs copy-up makes Docker write for the same change.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from layerfs import confined
from layerfs.catalog import LayerRecord
from layerfs.formats.layertar import INLINE_MAX
from layerfs.records import Entry, Kind, get_tree, kind_from_mode
from layerfs.store.chunks import ChunkRef, ChunkStore, WriteStats
from layerfs.union.vocab import (
    OPAQUE_VALUE,
    UNCOMMITTED_XATTR_PREFIXES,
    XATTR_METACOPY,
    XATTR_OPAQUE,
    XATTR_REDIRECT,
    is_whiteout_stat,
)

PREFETCH_MAX = 1 << 20  # larger files get the kernel's sequential read-ahead anyway
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PREFETCH_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class UpperItem:
    """One changed path of the upper directory."""

    path: str
    whiteout: bool = False
    opaque: bool = False  # a directory that hides its lower children
    via_mount: bool = False  # listed through the mount (below a redirected directory)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Tree:
    """A root directory (upper tree or mountpoint) whose entries are reached by descriptor.

    ``at(rel)`` gives the descriptor of ``rel``'s parent, walked without following
    symlinks (confined.DirFds), and ``rel``'s last name. The root is opened on
    first use.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fds: confined.DirFds | None = None

    @property
    def fds(self) -> confined.DirFds:
        if self._fds is None:
            self._fds = confined.DirFds.open(self.path)
        return self._fds

    def at(self, rel: str) -> tuple[int, str]:
        if not rel:
            return self.fds.root, "."
        parent, name = confined.split(rel)
        return self.fds.get(parent), name

    def lstat(self, rel: str) -> os.stat_result:
        dirfd, name = self.at(rel)
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)

    def open_file(self, rel: str) -> int:
        """A read descriptor of the regular file ``rel`` (confined.open_file_at)."""
        dirfd, name = self.at(rel)
        return confined.open_file_at(dirfd, name)

    def close(self) -> None:
        if self._fds is not None:
            self._fds.close()
            self._fds = None


@contextmanager
def opened(path: Path | str | Tree) -> Iterator[Tree]:
    """``path`` as a Tree, closed on exit (a Tree given is passed through, left open)."""
    if isinstance(path, Tree):
        yield path
        return
    tree = Tree(path)
    try:
        yield tree
    finally:
        tree.close()


def _fgetxattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


def _open_subdir(dirfd: int, name: str) -> int | None:
    """The directory ``name`` in ``dirfd``, or None if it is no directory (any more)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            return None
        raise


def scan_upper(upper: Path | Tree, mountpoint: Path | Tree) -> list[UpperItem]:
    """Every changed path of ``upper`` (unordered walk, whiteouts flagged)."""
    items: list[UpperItem] = []

    def walk(dirfd: int, rel: str, listed_from_mount: bool) -> None:
        with os.scandir(dirfd) as found:
            children = list(found)
        for dirent in children:  # d_type saves a stat of most children
            child = _join(rel, dirent.name)
            subdir = None
            if dirent.is_dir(follow_symlinks=False):
                subdir = _open_subdir(dirfd, dirent.name)  # None: replaced meanwhile
            try:
                if listed_from_mount:
                    items.append(UpperItem(child, via_mount=True))
                    if subdir is not None:
                        walk(subdir, child, True)
                elif subdir is not None:
                    redirect = _fgetxattr(subdir, XATTR_REDIRECT) is not None
                    opaque = redirect or _fgetxattr(subdir, XATTR_OPAQUE) == OPAQUE_VALUE
                    items.append(UpperItem(child, opaque=opaque))
                    if redirect:
                        mount_dir = _open_subdir(*mount.at(child))
                        if mount_dir is not None:
                            try:
                                walk(mount_dir, child, True)
                            finally:
                                os.close(mount_dir)
                    else:
                        walk(subdir, child, False)
                elif dirent.is_file(follow_symlinks=False) or dirent.is_symlink():
                    items.append(UpperItem(child))
                else:
                    try:
                        whiteout = is_whiteout_stat(dirent.stat(follow_symlinks=False))
                    except FileNotFoundError:
                        continue
                    items.append(UpperItem(child, whiteout=whiteout))
            finally:
                if subdir is not None:
                    os.close(subdir)

    with opened(upper) as up, opened(mountpoint) as mount:
        walk(up.fds.root, "", False)
    return items


def read_entry(mountpoint: Path | Tree, path: str) -> tuple[Entry, os.stat_result]:
    """Metadata of ``path`` as the mount shows it (no content yet)."""
    with opened(mountpoint) as tree:
        entry, st, _metacopy = _read_entry(tree, path)
    return entry, st


def _read_entry(tree: Tree, path: str) -> tuple[Entry, os.stat_result, bool]:
    """Metadata of ``path`` below ``tree``, and whether it carries a metacopy xattr."""
    dirfd, name = tree.at(path)
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    entry = Entry(
        path=path,
        kind=kind_from_mode(st.st_mode),
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
    )
    if entry.kind is Kind.SYMLINK:
        entry.target = os.readlink(name, dir_fd=dirfd)
    if entry.kind in (Kind.CHAR, Kind.BLOCK):
        entry.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    xattrs = confined.read_xattrs(None, dirfd, name)
    for key, value in xattrs.items():
        if not key.startswith(UNCOMMITTED_XATTR_PREFIXES):
            entry.xattrs[key] = value
    return entry, st, XATTR_METACOPY in xattrs


def _ancestors(path: str) -> Iterable[str]:
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


def _sort_key(path: str, whiteout: bool) -> tuple:
    parts = path.split("/")
    key = [(1, p.encode("utf-8", "surrogateescape")) for p in parts]
    if whiteout:
        key[-1] = (0, key[-1][1])
    return tuple(key)


def _lower_partners(
    mount: Tree, lower: dict[str, Entry], st: os.stat_result, taken: set[str]
) -> list[str]:
    """Lower names of the file ``st`` that the layer does not hold yet."""
    found = []
    for path, entry in lower.items():
        if path in taken or entry.kind is not Kind.FILE or entry.size != st.st_size:
            continue
        try:
            other = mount.lstat(path)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            found.append(path)
    return found


def build_changeset(
    store: ChunkStore,
    upper: Path,
    mountpoint: Path,
    lower: dict[str, Entry],
    write_stats: WriteStats | None = None,
    upper_exact: bool = False,
) -> list[Entry]:
    """The ordered changeset entries of a mount, file content stored in ``store``.

    ``upper_exact``: the mount is a layerfs mount of ``upper``, so entries are
    read from the upper tree rather than through the mount (see above).
    """
    with opened(upper) as up, opened(mountpoint) as mount:
        return _build(store, up, mount, lower, write_stats, upper_exact)


def _build(
    store: ChunkStore,
    upper: Tree,
    mountpoint: Tree,
    lower: dict[str, Entry],
    write_stats: WriteStats | None,
    upper_exact: bool,
) -> list[Entry]:
    items = {item.path: item for item in scan_upper(upper, mountpoint)}
    stat_of: dict[str, os.stat_result] = {}
    nodes: dict[str, Entry] = {}
    from_upper: dict[str, bool] = {}  # read from the upper tree: path -> has a metacopy xattr
    for path, item in items.items():
        if item.whiteout:
            continue
        if upper_exact and not item.via_mount:
            nodes[path], stat_of[path], from_upper[path] = _read_entry(upper, path)
        else:
            nodes[path], stat_of[path] = read_entry(mountpoint, path)

    groups: dict[tuple[int, int], list[str]] = {}
    for path, st in stat_of.items():
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), []).append(path)
    for members in list(groups.values()):
        st = stat_of[members[0]]
        if st.st_nlink > len(members) and members[0] not in from_upper:
            for extra in _lower_partners(mountpoint, lower, st, set(nodes)):
                nodes[extra], stat_of[extra] = read_entry(mountpoint, extra)
                items[extra] = UpperItem(extra)
                members.append(extra)
                for parent in _ancestors(extra):
                    if parent not in nodes:
                        nodes[parent], stat_of[parent] = read_entry(mountpoint, parent)
                        items[parent] = UpperItem(parent)

    _prefetch(upper, (p for p in from_upper if stat.S_ISREG(stat_of[p].st_mode)), stat_of)
    order = sorted(items.values(), key=lambda i: _sort_key(i.path, i.whiteout))
    first_of: dict[tuple[int, int], str] = {}
    out: list[Entry] = []
    files: list[tuple[Entry, int, bool | None]] = []  # entry, size, from_upper[path] if any
    for item in order:
        if item.whiteout:
            out.append(Entry(item.path, Kind.WHITEOUT))
            continue
        entry, st = nodes[item.path], stat_of[item.path]
        out.append(entry)
        if item.opaque:
            out.append(Entry(item.path, Kind.OPAQUE))
        if entry.kind is not Kind.FILE:
            continue
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in first_of:
            entry.kind, entry.target = Kind.HARDLINK, first_of[key]
            continue
        first_of.setdefault(key, item.path)
        files.append((entry, st.st_size, from_upper.get(item.path)))
    with store.background_writes():  # chunks compressed and written on worker threads
        for entry, size, metacopy in files:
            where = None if metacopy is None else upper
            meta = bool(metacopy)
            _store_content(store, entry, size, where, meta, mountpoint, lower, write_stats)
    return out


def _prefetch(upper: Tree, paths: Iterable[str], stat_of: dict[str, os.stat_result]) -> None:
    """Ask the kernel to start reading small upper files now, all at once.

    Reading thousands of small files one after the other waits for the disk
    once per file; queued read-ahead lets it serve them together.
    """
    for path in paths:
        st = stat_of[path]
        if not 0 < st.st_size <= PREFETCH_MAX or st.st_blocks == 0:
            continue
        try:
            dirfd, name = upper.at(path)
            fd = os.open(name, _PREFETCH_FLAGS, dir_fd=dirfd)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _store_content(
    store: ChunkStore,
    entry: Entry,
    size: int,
    upper: Tree | None,
    metacopy: bool,
    mountpoint: Tree,
    lower: dict[str, Entry],
    write_stats: WriteStats | None,
) -> None:
    """Give a file entry its content: inline if small, else chunks in ``store``.

    ``size`` is the file's size as stat saw it. ``upper``: read the file from
    the upper tree there, else through the mount; ``metacopy``: it carries a
    metacopy xattr (a layerfs one reuses its origin's chunks).
    """
    content = None
    if upper is not None:
        fd = upper.open_file(entry.path)
        try:
            content = _upper_content(store, entry.path, fd, size, metacopy, lower, write_stats)
        finally:
            os.close(fd)
    if content is None:
        with io.FileIO(mountpoint.open_file(entry.path)) as f:  # unbuffered: chunking reads 4 MiB
            content = _file_content(store, f, size, write_stats)
    if isinstance(content, bytes):
        entry.inline, entry.chunks, entry.size = content, [], len(content)
    else:
        entry.inline, entry.chunks = None, content
        entry.size = sum(c.size for c in content)


def _file_content(
    store: ChunkStore, f: BinaryIO, size: int, write_stats: WriteStats | None
) -> bytes | list[ChunkRef]:
    """A file's bytes if it is small enough to keep inline (see INLINE_MAX), else its chunks."""
    if size <= INLINE_MAX:
        data = f.read(INLINE_MAX + 1)
        if len(data) <= INLINE_MAX:
            return data
        f.seek(0)  # it grew meanwhile
    return store.write_stream(f, write_stats)


def _upper_content(
    store: ChunkStore,
    path: str,
    fd: int,
    size: int,
    metacopy: bool,
    lower: dict[str, Entry],
    write_stats: WriteStats | None,
) -> bytes | list[ChunkRef] | None:
    """Content of the upper file open as ``fd``; a metacopy file reuses its lower file's.

    An overlayfs metacopy file holds metadata only: its bytes are those of the
    lower file at the same path (unless it was renamed: it then carries a
    redirect), so the lower entry's inline bytes or chunks are taken as they
    are, nothing read. None: only the mount shows its content (a renamed
    metacopy file, or one whose lower file the lower layers do not hold).
    """
    if not metacopy:
        if size <= INLINE_MAX:  # most new files: one read, no file object
            data = os.read(fd, INLINE_MAX + 1)
            if len(data) <= INLINE_MAX:
                return data
            os.lseek(fd, 0, os.SEEK_SET)
        with io.FileIO(fd, closefd=False) as f:
            return _file_content(store, f, size, write_stats)
    origin = lower.get(path)
    if (
        _fgetxattr(fd, XATTR_REDIRECT) is not None
        or origin is None
        or origin.kind is not Kind.FILE
        or origin.size != size
    ):
        return None
    return origin.inline if origin.inline is not None else list(origin.chunks)


def lower_entries(store: ChunkStore, layers: Iterable[LayerRecord]) -> dict[str, Entry]:
    """Path -> entry of the merged tree of ``layers`` (hardlinks show their target's entry)."""
    from layerfs.index.merge import merge_layers

    tree = merge_layers(get_tree(store, layer.tree)[0] for layer in layers)
    return {path: node.entry for path, node in tree.walk()}


def _same_time(a: int, b: int) -> bool:
    """Equal mtimes, tolerating a side that only knows whole seconds (tar headers)."""
    if a == b:
        return True
    whole = a % 1_000_000_000 == 0 or b % 1_000_000_000 == 0
    return whole and a // 1_000_000_000 == b // 1_000_000_000


def _modified(old: Entry, new: Entry, st: os.stat_result) -> bool:
    if old.kind is not new.kind or (old.mode, old.uid, old.gid) != (new.mode, new.uid, new.gid):
        return True
    if old.rdev != new.rdev or old.target != new.target:
        return True
    if new.kind is Kind.DIR:
        return False
    return old.size != st.st_size or not _same_time(old.mtime_ns, new.mtime_ns)


def docker_diff(upper: Path, mountpoint: Path, lower: dict[str, Entry]) -> list[tuple[str, str]]:
    """(kind, path) changes the way ``docker diff`` reports them, sorted by path.

    A: not in the image; C: in both but type, mode, owner, device, link target,
    or (not for directories) size or mtime differ; D: in the image, gone from the
    mount - only the topmost deleted path. Every parent of a change is shown as C.
    """
    with opened(upper) as up, opened(mountpoint) as mount:
        return _diff(up, mount, lower)


def _gone(mount: Tree, path: str) -> bool:
    """``path`` is missing from the mount while its parent is a plain directory there."""
    try:
        dirfd, name = mount.at(path)
    except OSError:  # a parent is missing or no plain directory
        return False
    return confined.lstat_at(dirfd, name) is None


def _diff(upper: Tree, mount: Tree, lower: dict[str, Entry]) -> list[tuple[str, str]]:
    changes: dict[str, str] = {}
    for item in scan_upper(upper, mount):
        old = lower.get(item.path)
        if item.whiteout:
            if old is not None:
                changes[item.path] = "D"
            continue
        if old is None:
            changes[item.path] = "A"
            continue
        if item.opaque:
            prefix = item.path + "/"
            for path in lower:
                if path.startswith(prefix) and _gone(mount, path):
                    changes[path] = "D"
        new, st, _metacopy = _read_entry(mount, item.path)
        if _modified(old, new, st):
            changes[item.path] = "C"
    for path in list(changes):
        for parent in _ancestors(path):
            changes.setdefault(parent, "C")
    return sorted(((kind, path) for path, kind in changes.items()), key=lambda c: c[1])
