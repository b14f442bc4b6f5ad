"""ImageViewFS: an image's merged tree served read-only through FUSE (pyfuse3, low level).

The tree never changes, so every answer (entries, missing names, attributes,
pages) may stay in the kernel's caches for as long as it likes. Requests are
answered by inode number straight from the index, so path length never
matters; they run as concurrent trio tasks, and reads of content that is not
cached yet run on worker threads, so a slow chunk blocks only its own reader.

For kernel overlayfs above it, a regular file whose content is in the content
cache (layerfs.content) answers ``trusted.overlay.metacopy`` (empty) and
``trusted.overlay.redirect`` (the content's path in the cache): overlayfs then
reads the bytes from the cache, a data-only lower layer, and never asks this
daemon. A file not yet cached is read through this daemon, from the store,
and asked for ahead of the background fill. Overlay xattrs the image itself
carries are never shown: only this daemon decides where bytes come from.

A store error while reading (a corrupt or missing chunk) is logged with the
object it names and answered with EIO, never with wrong bytes.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from layerfs.content.cache import ContentCache, content_id
from layerfs.content.fill import CacheFiller
from layerfs.errors import LayerfsError
from layerfs.index.build import fs_bytes
from layerfs.index.view import ImageView
from layerfs.records import Kind
from layerfs.union.vocab import XATTR_METACOPY, XATTR_REDIRECT, is_private_xattr
from layerfs.view import Node

log = logging.getLogger(__name__)

# The tree never changes: let the kernel keep what it learned (seconds).
FOREVER = 365 * 86400.0
_METACOPY = XATTR_METACOPY.encode()
_REDIRECT = XATTR_REDIRECT.encode()


@dataclass
class _OpenFile:
    node: Node
    cid: str
    fd: int = -1  # the cached content, once there


def _attrs(node: Node) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = node.ino
    attr.generation = 0
    attr.entry_timeout = FOREVER
    attr.attr_timeout = FOREVER
    attr.st_mode = node.st_mode
    attr.st_nlink = node.nlink
    attr.st_uid = node.uid
    attr.st_gid = node.gid
    attr.st_rdev = os.makedev(*node.rdev)
    attr.st_size = node.size
    attr.st_blksize = 4096
    attr.st_blocks = (node.size + 511) // 512
    attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
    return attr


def _missing() -> pyfuse3.EntryAttributes:
    """A negative entry the kernel may keep (inode 0)."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = 0
    attr.entry_timeout = FOREVER
    return attr


class ImageViewFS(pyfuse3.Operations):
    """pyfuse3 operations over an ImageView, with overlay redirects into ``cache``."""

    def __init__(
        self, view: ImageView, cache: ContentCache, filler: CacheFiller, redirects: bool = True
    ) -> None:
        super().__init__()
        self.view = view
        self.cache = cache
        self.filler = filler
        self.redirects = redirects  # False: no data-only layer below, serve every byte
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, list[tuple[bytes, Node]]] = {}
        self._handles = itertools.count(1)

    def _node(self, ino: int) -> Node:
        node = self.view.node(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _cid(self, node: Node) -> str:
        inline, packed = self.view.stored_content(node.ino)
        return content_id(packed, inline)

    # -- metadata -------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        if name == b".":
            return _attrs(self._node(parent_inode))
        if name == b"..":
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.view.child(parent_inode, name)
        return _attrs(node) if node is not None else _missing()

    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        return _attrs(self._node(inode))

    async def readlink(self, inode: int, ctx=None) -> bytes:
        node = self._node(inode)
        if node.kind is not Kind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return fs_bytes(node.target)

    async def opendir(self, inode: int, ctx=None) -> int:
        node = self._node(inode)
        if node.kind is not Kind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = next(self._handles)
        self._dirs[fh] = self.view.children(inode)
        return fh

    async def readdir(self, fh: int, start_id: int, token) -> None:
        listing = self._dirs.get(fh, [])
        for position in range(start_id, len(listing)):
            name, node = listing[position]
            if not pyfuse3.readdir_reply(token, name, _attrs(node), position + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def statfs(self, ctx=None) -> pyfuse3.StatvfsData:
        stats = self.view.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = stats.bsize
        out.f_blocks = stats.blocks
        out.f_bfree = out.f_bavail = 0
        out.f_files = stats.files
        out.f_ffree = out.f_favail = 0
        out.f_namemax = stats.namemax
        return out

    # -- xattrs ---------------------------------------------------------------
    async def getxattr(self, inode: int, name: bytes, ctx=None) -> bytes:
        if name in (_METACOPY, _REDIRECT):
            node = self._node(inode)
            if self.redirects and node.kind is Kind.FILE and node.size > 0:
                cid = self._cid(node)
                if self.cache.has(cid):
                    return b"" if name == _METACOPY else self.cache.redirect(cid)
            raise pyfuse3.FUSEError(errno.ENODATA)
        text = os.fsdecode(name)
        if is_private_xattr(text):
            raise pyfuse3.FUSEError(errno.ENODATA)
        value = self.view.xattrs(self._node(inode)).get(text)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, inode: int, ctx=None) -> list[bytes]:
        names = self.view.xattrs(self._node(inode))
        return [os.fsencode(name) for name in names if not is_private_xattr(name)]

    # -- content --------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx=None) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = next(self._handles)
        handle = _OpenFile(node, self._cid(node) if node.kind is Kind.FILE else "")
        cacheable = self.redirects and node.kind is Kind.FILE and node.size > 0
        if cacheable and not self._try_cached(handle):
            self.filler.want(inode)
        self._files[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _try_cached(self, handle: _OpenFile) -> bool:
        try:
            handle.fd = os.open(self.cache.path(handle.cid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        return True

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.fd < 0 and handle.node.size > 0:
            self._try_cached(handle)
        if handle.fd >= 0:
            return await trio.to_thread.run_sync(os.pread, handle.fd, size, off)
        return await trio.to_thread.run_sync(self._read_store, handle.node, off, size)

    def _read_store(self, node: Node, off: int, size: int) -> bytes:
        try:
            return self.view.read(node, off, size)
        except LayerfsError as exc:
            log.error("read of inode %d failed: %s", node.ino, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None and handle.fd >= 0:
            os.close(handle.fd)


def serve(
    ops: ImageViewFS,
    mountpoint: str,
    fsname: str,
    on_ready: Callable[[], None] | None,
    release_if_unused: Callable[[], bool],
    idle_seconds: float,
) -> None:
    """Mount ``ops`` at ``mountpoint`` and answer until it is unmounted.

    Every ``idle_seconds`` the view calls ``release_if_unused`` (on a worker
    thread), which unmounts it when no mount uses it any more.
    """
    options = set(pyfuse3.default_options)
    label = "".join(c if c.isprintable() and c not in ", \\" else "_" for c in fsname)
    options |= {f"fsname={label}", "subtype=layerfs-view", "ro", "allow_other", "dev", "suid"}
    pyfuse3.init(ops, mountpoint, options)
    if on_ready is not None:
        on_ready()

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while True:
                    await trio.sleep(idle_seconds)
                    try:
                        if await trio.to_thread.run_sync(release_if_unused):
                            return
                    except LayerfsError as exc:
                        log.warning("%s", exc)

            nursery.start_soon(watch)
            await pyfuse3.main(1, 64)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=False)
