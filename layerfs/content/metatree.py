"""The metadata tree of an image: its merged tree on local disk, every file pointing at its bytes.

Built once per image index from the index, under ``ROOT/INDEX/``, and then never
changed: the first lower layer of every overlay mount of the image. Directories,
symlinks, devices, fifos and sockets are made as they are, with their owner,
mode, times and xattrs; hard links are hard links; a regular file with content
is a sparse file of its size (no data) carrying overlayfs'
``trusted.overlay.metacopy`` and ``trusted.overlay.redirect`` = ``/X/ID``,
its content's place in the content cache (layerfs.content.cache): overlayfs
looks that up in the data-only layers below, the cache first. So the kernel
answers every lookup, stat, readdir and read from local filesystems, with no
process of ours in the way.

Overlay xattrs an image itself carries are never copied: only this builder
decides where a file's bytes come from. The tree is built in a temp directory
beside it, through directory descriptors (paths of any length), and renamed
into place whole; a builder that loses a race drops its copy. The directory
holding the trees must be private to root (the store's cache directory is),
since they hold the image's devices and setuid files as the image has them.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from pathlib import Path

from layerfs.content.cache import ContentCache, content_id
from layerfs.errors import StoreError
from layerfs.index.build import ROOT_INO
from layerfs.records import Kind
from layerfs.union.vocab import XATTR_METACOPY, XATTR_REDIRECT, is_private_xattr

_COLUMNS = "i.ino, i.kind, i.mode, i.uid, i.gid, i.size, i.mtime_ns, i.nlink, "
_COLUMNS += "i.rdev_major, i.rdev_minor, i.target, i.inline, i.chunks"
_SPECIAL = {
    Kind.CHAR.value: stat.S_IFCHR,
    Kind.BLOCK.value: stat.S_IFBLK,
    Kind.FIFO.value: stat.S_IFIFO,
    Kind.SOCKET.value: stat.S_IFSOCK,
}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


TREE_FORMAT = 3  # 3: redirects name 20-character content IDs, /X/ID (layerfs.content.cache)


def meta_tree_path(root: Path, index: Path) -> Path:
    return root / f"{index.stem}.{TREE_FORMAT}"


def ensure_meta_tree(index: Path, cache: ContentCache, root: Path) -> Path:
    """The metadata tree of the image whose index is ``index``, built first if missing."""
    final = meta_tree_path(root, index)
    if final.is_dir():
        return final
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = root / f".tmp-{os.getpid()}-{index.stem}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        build_meta_tree(index, cache, tmp)
        os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():  # another builder won the race
            return final
        raise StoreError(f"cannot build the metadata tree of {index.name}: {exc}") from exc
    return final


def build_meta_tree(index: Path, cache: ContentCache, target: Path) -> int:
    """Build the tree at ``target`` (which must not exist); return the entries made."""
    db = sqlite3.connect(f"file:{index}?mode=ro&immutable=1", uri=True)
    try:
        xattrs: dict[int, list[tuple[bytes, bytes]]] = {}
        for ino, name, value in db.execute("SELECT ino, name, value FROM xattrs"):
            if not is_private_xattr(name.decode("utf-8", "surrogateescape")):
                xattrs.setdefault(ino, []).append((name, value))
        root = db.execute(f"SELECT {_COLUMNS} FROM inodes i WHERE i.ino = ?", (ROOT_INO,))
        row = root.fetchone()
        if row is None:
            raise StoreError(f"the image index {index} has no root directory")
        os.mkdir(target, 0o700)
        fd = os.open(target, _DIR_FLAGS)
        builder = _Builder(db, cache, xattrs, fd)
        try:
            builder.fill_dir(fd, ROOT_INO, b"")
            builder.set_attrs(fd, row)
        finally:
            os.close(fd)
        return builder.made
    finally:
        db.close()


class _Builder:
    def __init__(
        self, db: sqlite3.Connection, cache: ContentCache, xattrs: dict[int, list], root_fd: int
    ) -> None:
        self.db = db
        self.cache = cache
        self.xattrs = xattrs
        self.root_fd = root_fd
        self.linked: dict[int, bytes] = {}  # ino -> its first path from the root, nlink > 1
        self.made = 0

    def fill_dir(self, dir_fd: int, parent: int, prefix: bytes) -> None:
        rows = self.db.execute(
            f"SELECT d.name, {_COLUMNS} FROM dirents d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = ? ORDER BY d.name",
            (parent,),
        ).fetchall()
        for name, *row in rows:
            self.made += 1
            ino, kind = row[0], row[1]
            if kind == Kind.DIR.value:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self.fill_dir(fd, ino, prefix + name + b"/")
                    self.set_attrs(fd, row)
                finally:
                    os.close(fd)
                continue
            first = self.linked.get(ino)
            if first is not None:  # a hard link to a name made before
                os.link(first, name, src_dir_fd=self.root_fd, dst_dir_fd=dir_fd)
                continue
            self.make(dir_fd, name, row)
            if row[7] > 1:
                self.linked[ino] = prefix + name

    def make(self, dir_fd: int, name: bytes, row: tuple) -> None:
        ino, kind, mode, uid, gid, size, mtime_ns, _nlink, major, minor, target = row[:11]
        if kind == Kind.FILE.value:
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600,
                         dir_fd=dir_fd)  # fmt: skip
            try:
                if size > 0:
                    os.ftruncate(fd, size)
                    cid = content_id(row[12], row[11])
                    os.setxattr(fd, XATTR_METACOPY, b"")
                    os.setxattr(fd, XATTR_REDIRECT, self.cache.redirect(cid))
                self.set_attrs(fd, row)
            finally:
                os.close(fd)
            return
        if kind == Kind.SYMLINK.value:
            os.symlink(target, name, dir_fd=dir_fd)
        elif kind in _SPECIAL:
            os.mknod(name, _SPECIAL[kind] | 0o600, os.makedev(major, minor), dir_fd=dir_fd)
        else:
            raise StoreError(f"the image index holds an entry of unknown kind {kind!r}")
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if kind != Kind.SYMLINK.value:
            os.chmod(name, mode, dir_fd=dir_fd)
        path = f"/proc/self/fd/{dir_fd}/".encode() + name
        for key, value in self.xattrs.get(ino, []):
            os.setxattr(path, key, value, follow_symlinks=False)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    def set_attrs(self, fd: int, row: tuple) -> None:
        """Owner, then mode and xattrs (a chown drops setuid bits and file capabilities),
        then times, of an open file or directory."""
        ino, _kind, mode, uid, gid, _size, mtime_ns = row[:7]
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        for key, value in self.xattrs.get(ino, []):
            os.setxattr(fd, key, value)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
