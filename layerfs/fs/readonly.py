"""fusepy operations serving any layerfs.view.View read-only.

Hot paths come in two forms: fusepy's (getattr, readdir, readlink, read on
text paths, answering dicts and str) and raw ones for layerfs.fs.fastfuse
(bytes paths, answering packed bytes), which skip fusepy's per-field
conversions. flush, release, opendir, releasedir and access are left to
libfuse (None), so they never reach Python; open answers ENOSYS, which tells
Linux (4.19 and later) to open files without asking the daemon at all, keep
their cached pages and send no flush or release either. Nothing is lost: the
mount is kernel read-only ("ro"), which refuses writes before they get here,
and the kernel checks permissions itself (default_permissions). Other write
operations fall through to fusepy's defaults, which answer EROFS. A store error while reading (a
corrupt or missing chunk) is logged with the object it names and answered with
EIO, never with wrong bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat

from fuse import FuseOSError, Operations

from layerfs.errors import LayerfsError
from layerfs.fs.attrs import S_IFMT_OF, dirent_of, pack_stat, stat_of, statfs_of
from layerfs.records import Kind
from layerfs.view import Node, View

log = logging.getLogger(__name__)


def _kernel_skips_open() -> bool:
    """Whether this kernel opens files itself once the daemon answers open with ENOSYS."""
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return found is not None and (int(found[1]), int(found[2])) >= (4, 19)


_NO_OPEN = _kernel_skips_open()


def _rel(path: bytes) -> str:
    """A raw '/a/b' path from libfuse as the view's relative path 'a/b'."""
    return path[1:].decode("utf-8", "surrogateescape")


def _name_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class ReadOnlyOperations(Operations):
    """A read-only filesystem over a View; paths arrive from fusepy as '/a/b'."""

    use_ns = True
    # Answered by libfuse without a Python call (see the module docstring).
    opendir = None
    release = None
    releasedir = None
    flush = None
    access = None

    def __init__(self, view: View) -> None:
        self.view = view
        self._scandir = getattr(view, "scandir", None)
        self._dirents = getattr(view, "dirents", None)

    def lookup(self, rel: str) -> Node:
        """The node at a relative path; ENOENT if the view has none."""
        node = self.view.lookup(rel)
        if node is None:
            raise FuseOSError(errno.ENOENT)
        return node

    def node(self, path: str) -> Node:
        """The node at a fusepy path '/a/b'; ENOENT if the view has none."""
        return self.lookup(path[1:])

    if _NO_OPEN:

        def open(self, path: str, flags: int) -> int:
            raise FuseOSError(errno.ENOSYS)  # once: from then on the kernel opens on its own
    else:
        open = None

    def _children(self, rel: str) -> list[tuple[str, Node]]:
        if self._scandir is not None:
            return self._scandir(rel)
        prefix = rel + "/" if rel else ""
        found = ((n, self.view.lookup(prefix + n)) for n in self.view.listdir(rel))
        return [(n, node) for n, node in found if node is not None]

    def _dir(self, rel: str) -> Node:
        node = self.lookup(rel)
        if node.kind is not Kind.DIR:
            raise FuseOSError(errno.ENOTDIR)
        return node

    def _target(self, rel: str) -> str:
        node = self.lookup(rel)
        if node.kind is not Kind.SYMLINK:
            raise FuseOSError(errno.EINVAL)
        return node.target

    def _read(self, rel: str, size: int, offset: int) -> bytes:
        node = self.lookup(rel)
        try:
            return self.view.read(node, offset, size)
        except LayerfsError as exc:
            log.error("read of /%s failed: %s", rel, exc)
            raise FuseOSError(errno.EIO) from exc

    # -- fusepy's forms ----------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        return stat_of(self.node(path))

    def readdir(self, path: str, fh: int) -> list:
        node = self._dir(path[1:])
        out: list = [(".", dirent_of(node), 0), ("..", None, 0)]
        out.extend((name, dirent_of(child), 0) for name, child in self._children(path[1:]))
        return out

    def readlink(self, path: str) -> str:
        return self._target(path[1:])

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        value = self.view.xattrs(self.node(path)).get(name)
        if value is None:
            raise FuseOSError(errno.ENODATA)
        return value

    def listxattr(self, path: str) -> list[str]:
        return list(self.view.xattrs(self.node(path)))

    def statfs(self, path: str) -> dict[str, int]:
        return statfs_of(self.view.statfs())

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self._read(path[1:], size, offset)

    # -- raw forms for layerfs.fs.fastfuse ---------------------------------------
    def raw_stat(self, path: bytes) -> bytes:
        return pack_stat(self.lookup(_rel(path)))

    def raw_dirents(self, path: bytes) -> list[tuple[bytes, int, int]]:
        """'.', '..' and the children as (name, inode number, st_mode); 0 means unknown."""
        rel = _rel(path)
        node = self._dir(rel)
        out = [(b".", node.ino, stat.S_IFDIR | node.mode), (b"..", 0, 0)]
        if self._dirents is not None:
            out.extend(self._dirents(rel))
        else:
            out.extend(
                (_name_bytes(name), n.ino, S_IFMT_OF.get(n.kind, 0) | n.mode)
                for name, n in self._children(rel)
            )
        return out

    def raw_readlink(self, path: bytes) -> bytes:
        return _name_bytes(self._target(_rel(path)))

    def raw_read(self, path: bytes, size: int, offset: int) -> bytes:
        return self._read(_rel(path), size, offset)
