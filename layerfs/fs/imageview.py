"""ImageViewFS: the merged trees of a store's images served read-only through FUSE (pyfuse3).

One mount serves every image of a store mounted on this machine. Its root
holds two namespaces: ``X/ID``, every file content of the images by content
ID, the last data-only layer of every overlay mount (below the content cache,
so overlayfs finds a content here only while the cache lacks it; the image's
metadata tree, layerfs.content.metatree, points at it); and one directory per
image index, the merged tree itself, the only lower layer on kernels without
data-only layers. layerfs.fs.views names the images and writes their records;
an image is opened when the kernel first asks for its directory or for a
content no opened image has. Inode numbers are the index's own with the
image's slot in the high bits (``slot << 40 | ino``), so hard links share one
and nothing collides (a content's inode is that of a file holding it). The slot
comes from the directory's name (the next free one if two names meet), so an
image keeps its inode numbers across remounts and daemon restarts; numbers
stay below 2**60, as overlayfs' xino needs.

The trees never change, so every answer (entries, missing names, attributes,
pages) may stay in the kernel's caches for as long as it likes. Requests are
answered by inode number straight from the index, so path length never
matters; they run as concurrent trio tasks, and reads of content that is not
cached yet run on worker threads, so a slow chunk blocks only its own reader.

Each image fills the content cache (layerfs.content) in the background once
opened; a content read here before that is read from the store, from the
cache file as soon as it is there, and asked for ahead of the fill. Overlay
xattrs an image itself carries are never shown.

A store error while reading (a corrupt or missing chunk) is logged with the
object it names and answered with EIO, never with wrong bytes.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from layerfs.content.cache import ContentCache, content_id
from layerfs.content.fill import CacheFiller
from layerfs.errors import LayerfsError
from layerfs.fs.mounting import set_read_ahead
from layerfs.index.build import ROOT_INO, fs_bytes
from layerfs.index.view import ImageView
from layerfs.records import Kind
from layerfs.store.chunks import ChunkStore
from layerfs.union.vocab import is_private_xattr
from layerfs.unixsock import MAX_LINE
from layerfs.view import Node

log = logging.getLogger(__name__)

# The trees never change: let the kernel keep what it learned (seconds).
FOREVER = 365 * 86400.0
# Read-ahead of the view's files: sequential reads of a content not cached yet come in
# requests this large (libfuse 3 allows up to 1 MiB) instead of the kernel's 128 KiB.
READ_AHEAD_KIB = 1024
SLOT_SHIFT = 40  # an image's inode numbers: slot << SLOT_SHIFT | the index's own
SLOT_BITS = 20
_B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"  # content IDs


@dataclass
class _Image:
    slot: int
    name: str  # its directory's name
    view: ImageView
    filler: CacheFiller
    contents: dict[str, int] | None = None  # content ID -> a file's inode; made when needed

    def find(self, cid: str) -> int | None:
        """The inode of a file of this image whose content is ``cid``, or None."""
        if self.contents is None:  # one pass over the index, at the first miss only
            self.contents = {
                content_id(packed, inline): ino
                for ino, _size, inline, packed in self.view.file_contents()
            }
        return self.contents.get(cid)


def _content_dir(name: bytes) -> int | None:
    """The inode number of the content directory ``X`` (2 to 65), or None."""
    if len(name) == 1:
        index = _B64URL.find(name)
        if index >= 0:
            return 2 + index
    return None


def _dir_attrs(ino: int) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = ino
    attr.st_mode = stat.S_IFDIR | 0o755
    attr.st_nlink = 2
    attr.entry_timeout = attr.attr_timeout = FOREVER
    return attr


@dataclass
class _OpenFile:
    image: _Image
    node: Node
    cid: str
    fd: int = -1  # the cached content, once there


def _attrs(node: Node, slot: int) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = slot << SLOT_SHIFT | node.ino
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


def _root_attrs() -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = pyfuse3.ROOT_INODE
    attr.st_mode = stat.S_IFDIR | 0o755
    attr.st_nlink = 2
    attr.attr_timeout = 1.0  # images come and go
    return attr


class ImageViewFS(pyfuse3.Operations):
    """pyfuse3 operations over the images recorded in ``records`` (a directory of
    layerfs.fs.views ImageInfo files), with overlay redirects into ``cache``."""

    def __init__(
        self,
        store: ChunkStore,
        records: Path,
        cache: ContentCache,
        redirects: bool,
        on_filled: Callable[[Path], None] | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.records = records
        self.cache = cache
        self.redirects = redirects  # False: no data-only layer below, serve every byte
        self.on_filled = on_filled  # after an image's fill (e.g. to trim the cache)
        self._images: dict[int, _Image] = {}
        self._by_name: dict[str, _Image] = {}
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, tuple[_Image, list[tuple[bytes, Node]]]] = {}
        self._handles = itertools.count(1)

    def close(self) -> None:
        for image in self._images.values():
            image.filler.close()
            image.view.close()

    # -- images ---------------------------------------------------------------
    def _open_image(self, name: str) -> _Image | None:
        from layerfs.fs.views import ImageInfo

        found = self._by_name.get(name)
        if found is not None:
            return found
        info = ImageInfo.load(self.records, name)
        if info is None:
            return None
        try:
            view = ImageView(self.store, Path(info.index), read_ahead=True)
        except LayerfsError as exc:
            log.error("cannot open the index of %s: %s", info.image, exc)
            return None
        filler = CacheFiller(
            view, self.store, self.cache, on_filled=self.on_filled, walk=info.prefetch
        )
        image = _Image(self._free_slot(name), name, view, filler)
        if self.redirects:
            filler.start()
        self._images[image.slot] = image
        self._by_name[name] = image
        log.info("serving %s (%s) as %s", info.image, info.image_id, name)
        return image

    def _free_slot(self, name: str) -> int:
        slot = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % ((1 << SLOT_BITS) - 1) + 1
        while slot in self._images:
            slot = slot % ((1 << SLOT_BITS) - 1) + 1
        return slot

    def _content(self, cid: str) -> tuple[_Image, int] | None:
        """An opened image holding content ``cid`` and its file's inode; the images
        registered since are opened first if none does."""
        for attempt in range(2):
            for image in self._images.values():
                ino = image.find(cid)
                if ino is not None:
                    return image, ino
            if attempt == 0:
                for record in self.records.glob("*.json"):
                    if record.stem not in self._by_name:
                        self._open_image(record.stem)
        return None

    def _split(self, inode: int) -> tuple[_Image, int]:
        image = self._images.get(inode >> SLOT_SHIFT)
        if image is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return image, inode & ((1 << SLOT_SHIFT) - 1)

    def _node(self, inode: int) -> tuple[_Image, Node]:
        image, ino = self._split(inode)
        node = image.view.node(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return image, node

    def _cid(self, image: _Image, node: Node) -> str:
        inline, packed = image.view.stored_content(node.ino)
        return content_id(packed, inline)

    # -- metadata -------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        if name == b"..":
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent_inode == pyfuse3.ROOT_INODE:
            if name == b".":
                return _root_attrs()
            content_dir = _content_dir(name)
            if content_dir is not None:
                return _dir_attrs(content_dir)
            image = self._open_image(os.fsdecode(name))
            if image is None:
                raise pyfuse3.FUSEError(errno.ENOENT)  # not cached: it may come later
            root = image.view.node(ROOT_INO)
            assert root is not None
            return _attrs(root, image.slot)
        if parent_inode < 1 << SLOT_SHIFT:  # a content directory X: its contents
            found = self._content(os.fsdecode(name))
            if found is None:
                raise pyfuse3.FUSEError(errno.ENOENT)  # not cached: it may come later
            image, ino = found
            node = image.view.node(ino)
            assert node is not None
            return _attrs(node, image.slot)
        image, ino = self._split(parent_inode)
        if name == b".":
            return _attrs(self._node(parent_inode)[1], image.slot)
        node = image.view.child(ino, name)
        return _attrs(node, image.slot) if node is not None else _missing()

    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            return _root_attrs()
        if inode < 1 << SLOT_SHIFT:
            return _dir_attrs(inode)
        image, node = self._node(inode)
        return _attrs(node, image.slot)

    async def readlink(self, inode: int, ctx=None) -> bytes:
        _image, node = self._node(inode)
        if node.kind is not Kind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return fs_bytes(node.target)

    async def opendir(self, inode: int, ctx=None) -> int:
        fh = next(self._handles)
        if inode < 1 << SLOT_SHIFT:
            return fh  # the root and content directories list nothing: reached by name
        image, node = self._node(inode)
        if node.kind is not Kind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._dirs[fh] = (image, image.view.children(node.ino))
        return fh

    async def readdir(self, fh: int, start_id: int, token) -> None:
        image, listing = self._dirs.get(fh, (None, []))
        for position in range(start_id, len(listing)):
            name, node = listing[position]
            assert image is not None
            if not pyfuse3.readdir_reply(token, name, _attrs(node, image.slot), position + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def statfs(self, ctx=None) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = out.f_files = 0
        for image in self._images.values():
            stats = image.view.statfs()
            out.f_blocks += stats.blocks * stats.bsize // 4096
            out.f_files += stats.files
        out.f_bfree = out.f_bavail = out.f_ffree = out.f_favail = 0
        out.f_namemax = 255
        return out

    # -- xattrs ---------------------------------------------------------------
    async def getxattr(self, inode: int, name: bytes, ctx=None) -> bytes:
        if inode < 1 << SLOT_SHIFT:
            raise pyfuse3.FUSEError(errno.ENODATA)
        image, node = self._node(inode)
        text = os.fsdecode(name)
        if is_private_xattr(text):
            raise pyfuse3.FUSEError(errno.ENODATA)
        value = image.view.xattrs(node).get(text)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, inode: int, ctx=None) -> list[bytes]:
        if inode < 1 << SLOT_SHIFT:
            return []
        image, node = self._node(inode)
        return [os.fsencode(n) for n in image.view.xattrs(node) if not is_private_xattr(n)]

    # -- content --------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx=None) -> pyfuse3.FileInfo:
        image, node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = next(self._handles)
        cacheable = node.kind is Kind.FILE and node.size > 0
        handle = _OpenFile(image, node, self._cid(image, node) if cacheable else "")
        if cacheable and not self._try_cached(handle) and self.redirects:
            image.filler.want(node.ino)
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
        if handle.fd < 0 and handle.cid and handle.image.filler.writes(handle.cid):
            data = await trio.to_thread.run_sync(_read_written, handle, off, size)
            if data is not None:
                return data
            self._try_cached(handle)
        if handle.fd >= 0:
            return await trio.to_thread.run_sync(os.pread, handle.fd, size, off)
        return await trio.to_thread.run_sync(self._read_store, handle, off, size)

    def _read_store(self, handle: _OpenFile, off: int, size: int) -> bytes:
        try:
            return handle.image.view.read(handle.node, off, size)
        except LayerfsError as exc:
            log.error("read of %s inode %d failed: %s", handle.image.name, handle.node.ino, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None and handle.fd >= 0:
            os.close(handle.fd)


def _read_written(handle: _OpenFile, off: int, size: int) -> bytes | None:
    """The bytes of a read from the content cache's file being written by the image's
    filler, once they are there; None if it is not writing that content (any more)."""
    end = min(off + size, handle.node.size)
    fd = handle.image.filler.open_written(handle.cid, end)
    if fd is None:
        return None
    try:
        return os.pread(fd, size, off)
    finally:
        os.close(fd)


def serve_views(
    ops: ImageViewFS,
    mountpoint: str,
    on_ready: Callable[[], None] | None,
    release_if_unused: Callable[[], bool],
    idle_seconds: float,
    control: tuple[Path, Callable[[dict], dict]] | None = None,
) -> None:
    """Mount ``ops`` at ``mountpoint`` and answer until it is unmounted.

    Every ``idle_seconds`` the daemon calls ``release_if_unused`` (on a worker
    thread), which unmounts it when no mount uses any of its images any more.
    With ``control`` (a socket path and a function) the daemon also listens there,
    mode 0600, for requests of one JSON line each, answered by the function (on a
    worker thread) with one JSON line.
    """
    options = set(pyfuse3.default_options)
    options |= {"fsname=layerfs", "subtype=layerfs-view", "ro", "allow_other", "dev", "suid"}
    listener = _control_listener(control[0]) if control is not None else None
    pyfuse3.init(ops, mountpoint, options)

    async def ready() -> None:
        # The kernel takes the read-ahead libfuse offers (128 KiB) when it gets the
        # answer to its INIT, so the larger window is set after that: once a stat of
        # the root has been answered. Mounts over the view are made after on_ready.
        try:
            await trio.to_thread.run_sync(os.stat, mountpoint)
            tuned = set_read_ahead(mountpoint, READ_AHEAD_KIB)
        except OSError:
            tuned = False
        if not tuned:
            log.info("cannot set the read-ahead of %s: reads come in smaller requests", mountpoint)
        if on_ready is not None:
            on_ready()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ready)

            async def watch() -> None:
                while True:
                    await trio.sleep(idle_seconds)
                    try:
                        if await trio.to_thread.run_sync(release_if_unused):
                            return
                    except LayerfsError as exc:
                        log.warning("%s", exc)

            nursery.start_soon(watch)
            if listener is not None and control is not None:
                answer = control[1]
                serve = functools.partial(_answer_control, answer=answer)
                nursery.start_soon(trio.serve_listeners, serve, [trio.SocketListener(listener)])
            await pyfuse3.main(1, 64)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=False)
        if control is not None:
            control[0].unlink(missing_ok=True)


def _control_listener(path: Path) -> trio.socket.SocketType | None:
    """A listening unix socket at ``path`` (a stale one replaced), for root only; None
    (logged) if it cannot be made: mounts then open the store themselves."""
    from layerfs.unixsock import bind_private

    path.unlink(missing_ok=True)
    try:
        sock = bind_private(path)
    except (LayerfsError, OSError) as exc:
        log.warning("no control socket for this view (%s): mounts open the store themselves", exc)
        return None
    sock.listen(64)
    return trio.socket.from_stdlib_socket(sock)


async def _answer_control(stream: trio.SocketStream, answer: Callable[[dict], dict]) -> None:
    """One request on the control socket: a JSON line in, a JSON line out."""
    try:
        async with stream:
            data = b""
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk or len(data) > MAX_LINE:
                    return
                data += chunk
            try:
                request = json.loads(data)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                reply = {"error": f"malformed request: {exc}"}
            else:
                reply = await trio.to_thread.run_sync(answer, request)
            await stream.send_all(json.dumps(reply).encode() + b"\n")
    except trio.BrokenResourceError:  # the asker went away: nothing to tell it
        pass
    except Exception:  # one request never ends the daemon serving the mounts
        log.exception("a request on the control socket failed")
