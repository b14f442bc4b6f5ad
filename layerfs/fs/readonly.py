"""fusepy operations serving any layerfs.view.View read-only.

Hot paths (getattr, readdir, read) do one cached view lookup and build one
small dict; write operations fall through to fusepy's defaults, which answer
EROFS. A store error while reading (a corrupt or missing chunk) is logged with
the object it names and answered with EIO, never with wrong bytes.
"""

from __future__ import annotations

import errno
import logging
import os

from fuse import FuseOSError, Operations

from layerfs.errors import LayerfsError
from layerfs.fs.attrs import dirent_of, stat_of, statfs_of
from layerfs.records import Kind
from layerfs.view import Node, View

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class ReadOnlyOperations(Operations):
    """A read-only filesystem over a View; paths arrive from fusepy as '/a/b'."""

    use_ns = True

    def __init__(self, view: View) -> None:
        self.view = view
        self._scandir = getattr(view, "scandir", None)

    def node(self, path: str) -> Node:
        """The node at a fusepy path; ENOENT if the view has none."""
        node = self.view.lookup(path[1:])
        if node is None:
            raise FuseOSError(errno.ENOENT)
        return node

    # -- metadata --------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        return stat_of(self.node(path))

    def readdir(self, path: str, fh: int) -> list:
        node = self.node(path)
        if node.kind is not Kind.DIR:
            raise FuseOSError(errno.ENOTDIR)
        if self._scandir is not None:
            children = self._scandir(path[1:])
        else:
            prefix = path[1:] + "/" if path != "/" else ""
            children = [(n, self.view.lookup(prefix + n)) for n in self.view.listdir(path[1:])]
        out: list = [(".", dirent_of(node), 0), ("..", None, 0)]
        out.extend((name, dirent_of(child), 0) for name, child in children if child is not None)
        return out

    def readlink(self, path: str) -> str:
        node = self.node(path)
        if node.kind is not Kind.SYMLINK:
            raise FuseOSError(errno.EINVAL)
        return node.target

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        value = self.view.xattrs(self.node(path)).get(name)
        if value is None:
            raise FuseOSError(errno.ENODATA)
        return value

    def listxattr(self, path: str) -> list[str]:
        return list(self.view.xattrs(self.node(path)))

    def statfs(self, path: str) -> dict[str, int]:
        return statfs_of(self.view.statfs())

    # -- content ---------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        if flags & _WRITE_FLAGS:
            raise FuseOSError(errno.EROFS)
        node = self.node(path)
        if node.kind is Kind.DIR:
            raise FuseOSError(errno.EISDIR)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        node = self.node(path)
        try:
            return self.view.read(node, offset, size)
        except LayerfsError as exc:
            log.error("read of /%s failed: %s", path[1:], exc)
            raise FuseOSError(errno.EIO) from exc
