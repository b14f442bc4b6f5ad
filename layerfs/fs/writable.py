"""fusepy operations for a writable copy-on-write mount: a View below, an upper tree above.

Lookups look in the upper tree first (see layerfs.fs.upper for its format):
an upper entry wins, a whiteout hides, and otherwise the lower view answers
unless an upper ancestor is opaque or not a directory. Changes copy the entry
up first (layerfs.fs.copyup), metadata only; bytes of a lower file move into
the upper only when written (layerfs.fs.metafile). Open files are kept in a
handle table of raw file descriptors, so reads and writes of upper files are
one pread/pwrite each. Namespace changes take one lock; reads and writes do not.

The upper tree is opened once and every upper call is relative to that
descriptor (layerfs.treedir), so paths near PATH_MAX inside the mount work
whatever the upper directory's own path.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fuse import FuseOSError, Operations, fuse_get_context

from layerfs.fs.attrs import stat_of
from layerfs.fs.attrtimeout import AttrTimeout
from layerfs.fs.copyup import CopyUp
from layerfs.fs.metafile import MetaFile
from layerfs.fs.settimes import OneTimeSetattr
from layerfs.fs.upper import (
    UpperDirs,
    is_opaque_at,
    is_private_xattr,
    is_whiteout,
    make_whiteout_at,
    read_ino_at,
    read_metacopy_at,
    set_opaque_at,
)
from layerfs.fs.utimes import utimens_at
from layerfs.records import Kind
from layerfs.store.chunks import AVG_CHUNK
from layerfs.treedir import TreeDir
from layerfs.view import Node, View

log = logging.getLogger(__name__)

UPPER_INO_TAG = 1 << 60  # st_ino of entries made in the upper tree
_ACCMODE = os.O_RDONLY | os.O_WRONLY | os.O_RDWR
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY


def _err(code: int) -> FuseOSError:
    return FuseOSError(code)


@dataclass(slots=True)
class Handle:
    """One open file: a raw fd (upper or lower file), or a metacopy file, or a view node."""

    fd: int = -1
    meta: MetaFile | None = None
    node: Node | None = None  # lower file read through the view (no real path)
    meta_key: int = 0


class WritableOperations(Operations):
    """A writable union of ``view`` (read-only) and the upper tree of ``dirs``.

    ``overlay`` selects overlay mode: a written lower file is copied whole on
    first write, and metacopy files carry kernel overlayfs xattrs too. In image
    mode writes copy only the store chunks they touch.
    """

    use_ns = True

    def __init__(
        self,
        view: View,
        dirs: UpperDirs,
        *,
        overlay: bool = False,
        on_exit: Callable[[], None] | None = None,
        attr_timeout: AttrTimeout | None = None,
    ) -> None:
        self.view = view
        self._attr_timeout = attr_timeout  # attached at init, if given
        self._attrs = attr_timeout or AttrTimeout(0.0, 0.0)
        self._one_time = OneTimeSetattr()
        self.on_exit = on_exit
        self.dirs = dirs
        self.tree = TreeDir(str(dirs.tree))
        self._fd = self.tree.fd
        self.overlay = overlay
        self.copier = CopyUp(view, dirs, self._lower_at, overlay, self.tree)
        self._lock = threading.RLock()
        self._handles: dict[int, Handle] = {}
        self._metas: dict[int, MetaFile] = {}  # upper st_ino -> open metacopy file
        self._inos: dict[int, int] = {}  # upper st_ino -> st_ino shown
        self._next_fh = itertools.count(1)
        self._open_lower = getattr(view, "open_file", None)
        self._chunk_offsets = getattr(view, "chunk_offsets", None)

    # -- resolution --------------------------------------------------------------------
    @staticmethod
    def _up(path: str) -> str:
        """The upper path of mount path ``path``, relative to the upper tree."""
        return path[1:] or "."

    def _ulstat(self, up: str) -> os.stat_result | None:
        try:
            return os.stat(up, dir_fd=self._fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _lower_visible(self, rel: str) -> bool:
        """Whether no upper ancestor of ``rel`` hides the lower layers."""
        if not rel:
            return True
        cur = ""
        for name in rel.split("/")[:-1]:
            cur = f"{cur}/{name}" if cur else name
            st = self._ulstat(cur)
            if st is None:
                return True
            if not stat.S_ISDIR(st.st_mode) or is_opaque_at(self.tree, cur):
                return False
        return True

    def _lower_at(self, rel: str) -> Node | None:
        """The lower node at ``rel`` if no upper ancestor hides it (ignores rel itself)."""
        return self.view.lookup(rel) if self._lower_visible(rel) else None

    def _resolve(self, path: str) -> tuple[os.stat_result | None, Node | None]:
        """(upper stat or None, visible lower node or None); both None if absent."""
        up = self._up(path)
        st = self._ulstat(up)
        if st is not None and is_whiteout(st):
            return None, None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return st, None  # lower is only needed for directories and removals
        return st, self._lower_at(path[1:])

    def _ino(self, st: os.stat_result, up: str) -> int:
        ino = self._inos.get(st.st_ino)
        if ino is None:
            ino = read_ino_at(self.tree, up) or (UPPER_INO_TAG | st.st_ino)
            self._inos[st.st_ino] = ino
        return ino

    def _forget(self, st: os.stat_result | None) -> None:
        if st is not None and (stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1):
            self._inos.pop(st.st_ino, None)

    def _upper_stat(self, st: os.stat_result, up: str) -> dict[str, int]:
        blocks = st.st_blocks
        if (
            stat.S_ISREG(st.st_mode)
            and blocks * 512 < st.st_size
            and read_metacopy_at(self.tree, up)
        ):
            blocks = -(-st.st_size // 512)
        return {
            "st_ino": self._ino(st, up),
            "st_mode": st.st_mode,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_size": st.st_size,
            "st_blocks": blocks,
            "st_blksize": st.st_blksize,
            "st_rdev": st.st_rdev,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    def _need_upper(self, path: str) -> str:
        """Copy the entry at ``path`` up (metadata only) if needed; return its upper path."""
        up = self._up(path)
        st = self._ulstat(up)
        if st is not None and not is_whiteout(st):
            return up
        if st is not None:
            raise _err(errno.ENOENT)
        with self._lock:
            if self._ulstat(up) is not None:
                return up
            node = self._lower_at(path[1:])
            if node is None:
                raise _err(errno.ENOENT)
            return self.copier.copy_up(path[1:], node)

    def _prepare_new(self, path: str) -> tuple[str, bool]:
        """Make room for a new entry at ``path``: parents up, whiteout gone.

        Returns the upper path and whether a lower entry was hidden there (so a
        new directory must be opaque).
        """
        rel = path[1:]
        self.copier.ensure_parents(rel)
        up = self._up(path)
        st = self._ulstat(up)
        if st is not None:
            if not is_whiteout(st):
                raise _err(errno.EEXIST)
            os.unlink(up, dir_fd=self._fd)
            return up, True
        if self._lower_at(rel) is not None:
            raise _err(errno.EEXIST)
        return up, False

    def _owner(self, up: str, follow: bool = False) -> None:
        uid, gid, _pid = fuse_get_context()
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.chown(up, uid, gid, dir_fd=self._fd, follow_symlinks=follow)

    def init(self, path: str) -> None:
        if self._attr_timeout is not None:
            self._attr_timeout.attach()
        self._one_time.attach()

    # -- metadata ------------------------------------------------------------------------
    def getattr(self, path: str, fh=None) -> dict[str, int]:
        """Attributes of ``path``; the kernel may cache those of directories.

        Every answer carrying attributes (lookup, getattr, setattr, create) is
        built right after this call, so this sets its attribute timeout too.
        Only directories qualify: any other file may gain a second name, and
        since the kernel (6.x) keeps the first name's cached attributes when a
        link is made, they would go stale when the file changes through the
        new name. Directories have one name, and the kernel drops their cached
        attributes itself when it changes an entry in them.
        """
        up = self._up(path)
        st = self._ulstat(up)
        if st is not None:
            if is_whiteout(st):
                raise _err(errno.ENOENT)
            self._attrs.answer(stat.S_ISDIR(st.st_mode))
            return self._upper_stat(st, up)
        node = self._lower_at(path[1:])
        if node is None:
            raise _err(errno.ENOENT)
        self._attrs.answer(node.kind is Kind.DIR)
        return stat_of(node)

    def access(self, path: str, amode: int) -> int:
        self.getattr(path)
        return 0

    def readlink(self, path: str) -> str:
        st, node = self._resolve(path)
        if st is not None:
            return os.readlink(self._up(path), dir_fd=self._fd)
        if node is None:
            raise _err(errno.ENOENT)
        if node.kind is not Kind.SYMLINK:
            raise _err(errno.EINVAL)
        return node.target

    def _names(self, path: str) -> list[str]:
        """Merged directory listing of ``path``."""
        st, node = self._resolve(path)
        if st is None and node is None:
            raise _err(errno.ENOENT)
        if (st is not None and not stat.S_ISDIR(st.st_mode)) or (
            st is None and node is not None and node.kind is not Kind.DIR
        ):
            raise _err(errno.ENOTDIR)
        names: list[str] = []
        hidden: set[str] = set()
        up = self._up(path)
        if st is not None:
            with self.tree.scandir(up) as (_fd, it):
                for e in it:
                    plain = e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)
                    if not plain and is_whiteout(e.stat(follow_symlinks=False)):
                        hidden.add(e.name)
                        continue
                    hidden.add(e.name)
                    names.append(e.name)
            if is_opaque_at(self.tree, up):
                return names
        if node is not None and node.kind is Kind.DIR:
            names.extend(n for n in self.view.listdir(path[1:]) if n not in hidden)
        return names

    def readdir(self, path: str, fh) -> list:
        return [".", "..", *self._names(path)]

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._fd)
        return {
            "f_bsize": sv.f_bsize,
            "f_frsize": sv.f_frsize,
            "f_blocks": sv.f_blocks,
            "f_bfree": sv.f_bfree,
            "f_bavail": sv.f_bavail,
            "f_files": sv.f_files,
            "f_ffree": sv.f_ffree,
            "f_favail": sv.f_favail,
            "f_namemax": sv.f_namemax,
        }

    def chmod(self, path: str, mode: int) -> int:
        with self._lock:
            os.chmod(self._need_upper(path), stat.S_IMODE(mode), dir_fd=self._fd)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        with self._lock:
            up = self._need_upper(path)
            os.chown(up, uid, gid, dir_fd=self._fd, follow_symlinks=False)
        return 0

    def utimens(self, path: str, times=None) -> int:
        with self._lock:
            utimens_at(self._fd, self._need_upper(path), times)
        return 0

    # -- xattrs --------------------------------------------------------------------------
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if is_private_xattr(name):
            raise _err(errno.ENODATA)
        st, node = self._resolve(path)
        if st is not None:
            return self.tree.xattr(os.getxattr, self._up(path), name)
        if node is None:
            raise _err(errno.ENOENT)
        value = self.view.xattrs(node).get(name)
        if value is None:
            raise _err(errno.ENODATA)
        return value

    def listxattr(self, path: str) -> list[str]:
        st, node = self._resolve(path)
        if st is not None:
            names = self.tree.xattr(os.listxattr, self._up(path))
        elif node is not None:
            names = list(self.view.xattrs(node))
        else:
            raise _err(errno.ENOENT)
        return [n for n in names if not is_private_xattr(n)]

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0):
        if is_private_xattr(name):
            raise _err(errno.EPERM)
        with self._lock:
            self.tree.xattr(os.setxattr, self._need_upper(path), name, value, options)
        return 0

    def removexattr(self, path: str, name: str) -> int:
        if is_private_xattr(name):
            raise _err(errno.ENODATA)
        with self._lock:
            self.tree.xattr(os.removexattr, self._need_upper(path), name)
        return 0

    # -- namespace -----------------------------------------------------------------------
    def mkdir(self, path: str, mode: int) -> int:
        with self._lock:
            up, hid = self._prepare_new(path)
            os.mkdir(up, stat.S_IMODE(mode), dir_fd=self._fd)
            if hid:
                set_opaque_at(self.tree, up)
            self._owner(up)
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        with self._lock:
            up, _ = self._prepare_new(path)
            os.mknod(up, mode, dev, dir_fd=self._fd)
            self._owner(up)
        return 0

    def symlink(self, target: str, source: str) -> int:
        with self._lock:
            up, _ = self._prepare_new(target)
            os.symlink(source, up, dir_fd=self._fd)
            self._owner(up)
        return 0

    def link(self, target: str, source: str) -> int:
        with self._lock:
            src = self._need_upper(source)
            up, _ = self._prepare_new(target)
            os.link(src, up, src_dir_fd=self._fd, dst_dir_fd=self._fd, follow_symlinks=False)
            self._inos.pop(os.stat(up, dir_fd=self._fd, follow_symlinks=False).st_ino, None)
        return 0

    def _entry(self, path: str) -> tuple[str, os.stat_result | None, Node | None, Node | None]:
        """(upper path, upper stat, lower node shown, lower node under the upper entry).

        The upper stat is None for a whiteout; the lower node shown is None when
        an upper entry or whiteout hides it. ENOENT when nothing is shown.
        """
        up = self._up(path)
        raw = self._ulstat(up)
        under = self._lower_at(path[1:])
        if raw is not None and is_whiteout(raw):
            raise _err(errno.ENOENT)
        if raw is None and under is None:
            raise _err(errno.ENOENT)
        return up, raw, (under if raw is None else None), under

    def unlink(self, path: str) -> int:
        with self._lock:
            up, st, shown, under = self._entry(path)
            if shown is not None and shown.kind is Kind.FILE and shown.nlink > 1:
                self._need_upper(path)  # keep the other names one file, with the right nlink
                st = self._ulstat(up)
            if st is not None:
                self._forget(st)
                os.unlink(up, dir_fd=self._fd)
            if under is not None:
                self.copier.ensure_parents(path[1:])
                make_whiteout_at(self.tree, up)
        return 0

    def _clear_whiteouts(self, up: str) -> None:
        """Remove the whiteouts of an upper directory that is empty when merged."""
        with self.tree.scandir(up) as (dfd, it):
            for e in it:
                os.unlink(e.name, dir_fd=dfd)

    def rmdir(self, path: str) -> int:
        with self._lock:
            up, st, _shown, under = self._entry(path)
            if self._names(path):
                raise _err(errno.ENOTEMPTY)
            if st is not None:
                self._clear_whiteouts(up)
                self._forget(st)
                os.rmdir(up, dir_fd=self._fd)
            if under is not None:
                self.copier.ensure_parents(path[1:])
                make_whiteout_at(self.tree, up)
        return 0

    def rename(self, old: str, new: str) -> int:
        with self._lock:
            up_old, so, lo_shown, lo = self._entry(old)
            is_dir = stat.S_ISDIR(so.st_mode) if so is not None else lo_shown.kind is Kind.DIR
            up_new = self._up(new)
            try:
                _, sn, ln_shown, _ = self._entry(new)
            except FuseOSError:
                sn = ln_shown = None
            ln = self._lower_at(new[1:])
            if sn is not None or ln_shown is not None:
                new_dir = stat.S_ISDIR(sn.st_mode) if sn is not None else ln_shown.kind is Kind.DIR
                if is_dir and not new_dir:
                    raise _err(errno.ENOTDIR)
                if new_dir and not is_dir:
                    raise _err(errno.EISDIR)
                if new_dir and self._names(new):
                    raise _err(errno.ENOTEMPTY)
            if is_dir and lo is not None and lo.kind is Kind.DIR:
                self.copier.copy_up_tree(old[1:])
            else:
                self._need_upper(old)
            self.copier.ensure_parents(new[1:])
            raw_new = self._ulstat(up_new)
            if raw_new is not None:
                if is_whiteout(raw_new) and is_dir:
                    os.unlink(up_new, dir_fd=self._fd)
                elif stat.S_ISDIR(raw_new.st_mode):
                    self._clear_whiteouts(up_new)
                if not os.path.samestat(raw_new, self._ulstat(up_old)):
                    self._forget(raw_new)
            os.rename(up_old, up_new, src_dir_fd=self._fd, dst_dir_fd=self._fd)
            if is_dir and ln is not None:
                set_opaque_at(self.tree, up_new)
            if lo is not None:
                make_whiteout_at(self.tree, up_old)
        return 0

    # -- files ---------------------------------------------------------------------------
    def _chunk_starts(self, node: Node) -> list[int]:
        if self._chunk_offsets is not None:
            starts = self._chunk_offsets(node)
            if starts:
                return starts
        return list(range(0, max(node.size, 1), AVG_CHUNK))

    def _lower_read(self, node: Node, offset: int, size: int) -> bytes:
        if self._open_lower is not None:
            fd = self._open_lower(node)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        return self.view.read(node, offset, size)

    def _meta_file(self, up: str, st: os.stat_result) -> MetaFile | None:
        """The shared MetaFile of an upper metacopy file (one more reference), or None."""
        mf = self._metas.get(st.st_ino)
        if mf is None:
            meta = read_metacopy_at(self.tree, up)
            if meta is None:
                return None
            fd = self.tree.open(up, os.O_RDWR)
            node = self.view.lookup(meta.origin)
            mf = MetaFile(fd, meta, node, self._lower_read, self._chunk_starts)
            self._metas[st.st_ino] = mf
        mf.refs += 1
        return mf

    def _drop_meta(self, key: int, mf: MetaFile) -> None:
        mf.refs -= 1
        if mf.refs <= 0 and self._metas.get(key) is mf:
            del self._metas[key]
            mf.close()

    def _add(self, handle: Handle) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = handle
        return fh

    def _open_upper(self, up: str, flags: int, fi) -> int:
        writing = (flags & _ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        st = os.stat(up, dir_fd=self._fd)
        handle = Handle()
        if stat.S_ISREG(st.st_mode):
            mf = self._meta_file(up, st)
            if mf is not None:
                handle.meta, handle.meta_key = mf, st.st_ino
                if flags & os.O_TRUNC:
                    mf.truncate(0)
                elif writing and self.overlay:
                    mf.materialize_all()
        handle.fd = os.open(up, flags & ~_OPEN_DROP, dir_fd=self._fd)
        if flags & os.O_TRUNC and handle.meta is None:
            os.ftruncate(handle.fd, 0)
        fi.fh = self._add(handle)
        return 0

    def open(self, path: str, fi) -> int:
        flags = fi.flags
        writing = (flags & _ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        up = self._up(path)
        st = self._ulstat(up)
        if st is not None and not is_whiteout(st):
            with self._lock:
                return self._open_upper(up, flags, fi)
        node = self._lower_at(path[1:]) if st is None else None
        if node is None:
            raise _err(errno.ENOENT)
        if writing:
            with self._lock:
                return self._open_upper(self._need_upper(path), flags, fi)
        handle = Handle()
        if self._open_lower is not None:
            handle.fd = self._open_lower(node)
        else:
            handle.node = node
        fi.keep_cache = 1
        fi.fh = self._add(handle)
        return 0

    def create(self, path: str, mode: int, fi) -> int:
        with self._lock:
            up, _ = self._prepare_new(path)
            fd = os.open(
                up, os.O_CREAT | os.O_EXCL | os.O_RDWR, stat.S_IMODE(mode), dir_fd=self._fd
            )
            try:
                uid, gid, _pid = fuse_get_context()
                if (uid, gid) != (os.geteuid(), os.getegid()):
                    os.fchown(fd, uid, gid)
            except BaseException:
                os.close(fd)
                raise
            fi.fh = self._add(Handle(fd=fd))
        return 0

    def read(self, path: str, size: int, offset: int, fi) -> bytes:
        h = self._handles[fi.fh]
        if h.meta is not None:
            return h.meta.read(size, offset)
        if h.fd >= 0:
            return os.pread(h.fd, size, offset)
        return self.view.read(h.node, offset, size)

    def write(self, path: str, data: bytes, offset: int, fi) -> int:
        h = self._handles[fi.fh]
        if h.meta is not None:
            return h.meta.write(data, offset)
        return os.pwrite(h.fd, data, offset)

    def truncate(self, path: str, length: int, fh=None) -> int:
        if fh is not None:
            h = self._handles[fh.fh]
            if h.meta is not None:
                h.meta.truncate(length)
            else:
                os.ftruncate(h.fd, length)
            return 0
        with self._lock:
            up = self._need_upper(path)
            st = os.stat(up, dir_fd=self._fd)
            mf = self._meta_file(up, st) if stat.S_ISREG(st.st_mode) else None
            if mf is None:
                self._truncate_path(up, length)
                return 0
            try:
                if self.overlay and length:
                    mf.materialize_all()
                mf.truncate(length)
            finally:
                self._drop_meta(st.st_ino, mf)
        return 0

    def _truncate_path(self, up: str, length: int) -> None:
        full = self.tree.full(up)
        if full is not None:
            os.truncate(full, length)
            return
        fd = self.tree.open(up, os.O_WRONLY)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)

    def flush(self, path: str, fi) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fi) -> int:
        h = self._handles[fi.fh]
        fd = h.meta.fd if h.meta is not None else h.fd
        if fd >= 0:
            if datasync and h.meta is None:
                os.fdatasync(fd)
            else:
                os.fsync(fd)
        return 0

    def release(self, path: str, fi) -> int:
        h = self._handles.pop(fi.fh, None)
        if h is None:
            return 0
        if h.fd >= 0:
            os.close(h.fd)
        if h.meta is not None:
            with self._lock:
                self._drop_meta(h.meta_key, h.meta)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh) -> int:
        try:
            fd = self.tree.open(self._up(path), os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0

    def destroy(self, path: str) -> None:
        for h in list(self._handles.values()):
            if h.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(h.fd)
        for mf in list(self._metas.values()):
            with contextlib.suppress(OSError):
                mf.close()
        self._handles.clear()
        self._metas.clear()
        self.tree.close()
        if self.on_exit is not None:
            self.on_exit()
