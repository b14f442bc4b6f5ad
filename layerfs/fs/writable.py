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

Requests that come by the thousand (lookups, create, write, release, getxattr,
chmod, chown, utimens) also have raw forms for layerfs.fs.fastfuse, taking the
bytes libfuse passes; they try the likely case first (an entry already in the
upper tree, a name no layer has) and fall back to the general path. The kernel
may cache the attributes of directories and of files with one name (see
``_shown``), and flush never reaches Python.
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
from typing import TypeVar

from fuse import FuseOSError, Operations, fuse_get_context

from layerfs.fs.attrs import pack_os_stat, pack_stat, stat_of
from layerfs.fs.attrtimeout import AttrTimeout
from layerfs.fs.copyup import CopyUp
from layerfs.fs.lowlevel import LinkInvalidation
from layerfs.fs.metafile import MetaFile
from layerfs.fs.upper import (
    UpperDirs,
    is_opaque_at,
    make_whiteout_at,
    read_ino_at,
    read_metacopy_at,
    set_opaque_at,
)
from layerfs.fs.utimes import utimens_at
from layerfs.records import Kind
from layerfs.store.chunks import AVG_CHUNK
from layerfs.treedir import PATH_MAX, TreeDir
from layerfs.union.vocab import PRIVATE_XATTR_PREFIXES, is_private_xattr, is_whiteout_stat
from layerfs.view import Node, View

log = logging.getLogger(__name__)

UPPER_INO_TAG = 1 << 60  # st_ino of entries made in the upper tree
_ACCMODE = os.O_RDONLY | os.O_WRONLY | os.O_RDWR
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY
_CREATE = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
_PRIVATE_PREFIXES = tuple(os.fsencode(p) for p in PRIVATE_XATTR_PREFIXES)
_CAPS = b"security.capability"
_NO_CAPS_MAX = 1 << 16

T = TypeVar("T")


def _err(code: int) -> FuseOSError:
    return FuseOSError(code)


def _text(raw: bytes) -> str:
    """A path or name as libfuse passes it, as the str fusepy would give (see layerfs.fs.names)."""
    return raw.decode("utf-8", "surrogateescape")


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
    # libfuse passes a setattr that sets one time as utimens with the other UTIME_OMIT.
    flag_utime_omit_ok = 1
    # Answered by libfuse without a Python call: opening a directory needs nothing,
    # and flush has nothing to do (writes are written at once); its first ENOSYS
    # tells the kernel to send no more.
    opendir = None
    releasedir = None
    flush = None

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
        self._links = LinkInvalidation()
        self._cache_files = False  # set at init: attributes of one-name files may be cached
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
        self._ids = (os.geteuid(), os.getegid())  # new entries belong to this owner
        self._prefix = os.fsencode(self.tree.path)  # + a mount path: an absolute upper path
        # Paths known to have no security.capability (asked before every write);
        # forgotten on every change of names or xattrs.
        self._no_caps: set[bytes] = set()
        self._room = PATH_MAX - 1 - len(self._prefix)
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
        node = self.view.lookup(rel)  # first: most new names have no lower entry at all
        return node if node is not None and self._lower_visible(rel) else None

    def _resolve(self, path: str) -> tuple[os.stat_result | None, Node | None]:
        """(upper stat or None, visible lower node or None); both None if absent."""
        up = self._up(path)
        st = self._ulstat(up)
        if st is not None and is_whiteout_stat(st):
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

    def _blocks(self, st: os.stat_result, up: str) -> int:
        """st_blocks shown: a metacopy file counts its lower bytes as its own."""
        blocks = st.st_blocks
        if (
            stat.S_ISREG(st.st_mode)
            and blocks * 512 < st.st_size
            and read_metacopy_at(self.tree, up)
        ):
            blocks = -(-st.st_size // 512)
        return blocks

    def _upper_stat(self, st: os.stat_result, up: str) -> dict[str, int]:
        blocks = self._blocks(st, up)
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
        if st is not None and not is_whiteout_stat(st):
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

    def _new_entry(self, path: str, make: Callable[[str], T]) -> tuple[T, str, bool]:
        """Create a new entry at ``path`` with ``make(upper path)`` (call with the lock held).

        Makes room first: EEXIST if ``path`` shows an entry, a whiteout there is
        removed, missing parents are copied up (only if ``make`` finds them
        missing). Returns what ``make`` returned, the upper path, and whether a
        lower entry was hidden there (so a new directory must be opaque).
        """
        rel = path[1:]
        up = self._up(path)
        if self._lower_at(rel) is None:  # most new names: only the upper tree can refuse
            try:
                return self._make_in_parent(rel, up, make), up, False
            except FileExistsError:
                pass  # a whiteout (of an entry no longer shown), or an upper entry
        st = self._ulstat(up)
        if st is None or not is_whiteout_stat(st):
            raise _err(errno.EEXIST)
        os.unlink(up, dir_fd=self._fd)
        return make(up), up, True

    def _make_in_parent(self, rel: str, up: str, make: Callable[[str], T]) -> T:
        """``make(up)``, copying the parents of ``rel`` up if it finds them missing."""
        try:
            return make(up)
        except FileNotFoundError:
            if "/" not in rel:
                raise
        self.copier.ensure_parents(rel)
        return make(up)

    def _owner(self, up: str, follow: bool = False) -> None:
        uid, gid, _pid = fuse_get_context()
        if (uid, gid) != self._ids:
            os.chown(up, uid, gid, dir_fd=self._fd, follow_symlinks=follow)

    def init(self, path: str) -> None:
        if self._attr_timeout is not None and self._attr_timeout.attach():
            self._cache_files = self._links.attach()

    # -- metadata ------------------------------------------------------------------------
    def _shown(self, path: str) -> tuple[str, os.stat_result | None, Node | None]:
        """(upper path, upper stat or None, lower node or None) of what ``path`` shows.

        Every answer carrying attributes (lookup, getattr, setattr, create) is
        built right after this call, so this sets its attribute timeout too:
        the kernel may cache the attributes of directories and of files with
        one name. libfuse gives every name its own kernel inode, so those of a
        file with several names would go stale when it changes through another
        name; a file that gains a second name has its cached attributes dropped
        first (layerfs.fs.lowlevel), and without that hook only directories are
        cached. The kernel drops a directory's cached attributes itself when it
        changes an entry in it.
        """
        up = self._up(path)
        st = self._ulstat(up)
        if st is None:
            node = self._lower_shown(path[1:])
            if node is None:
                raise _err(errno.ENOENT)
            return up, None, node
        if is_whiteout_stat(st):
            raise _err(errno.ENOENT)
        mode = st.st_mode
        self._attrs.answer(stat.S_ISDIR(mode) or (self._cache_files and st.st_nlink == 1))
        return up, st, None

    def _lower_shown(self, rel: str) -> Node | None:
        """The lower node shown at ``rel`` (no upper entry there), for an answer with
        attributes (whose timeout this sets), or None."""
        node = self._lower_at(rel)
        if node is not None:
            self._attrs.answer(node.kind is Kind.DIR or (self._cache_files and node.nlink == 1))
        return node

    def getattr(self, path: str, fh=None) -> dict[str, int]:
        """Attributes of ``path`` (see ``_shown`` for how long the kernel keeps them)."""
        up, st, node = self._shown(path)
        return self._upper_stat(st, up) if st is not None else stat_of(node)

    def raw_stat(self, path: bytes) -> bytes | None:
        """``getattr`` as the bytes of a c_stat (layerfs.fs.fastfuse); None for ENOENT.

        The common case, an upper entry, is spelled out: this runs for every
        lookup (of new names too) and after every create and setattr.
        """
        text = _text(path)
        up = text[1:] or "."
        try:
            st = os.stat(up, dir_fd=self._fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None:
            node = self._lower_shown(text[1:])
            return pack_stat(node) if node is not None else None
        if is_whiteout_stat(st):
            return None
        return self._packed(st, up)

    def _packed(self, st: os.stat_result, up: str) -> bytes:
        """The answer for the upper entry ``up`` with stat ``st`` (sets its timeout)."""
        self._attrs.answer(stat.S_ISDIR(st.st_mode) or (self._cache_files and st.st_nlink == 1))
        ino = self._inos.get(st.st_ino) or self._ino(st, up)
        blocks = st.st_blocks
        if blocks * 512 < st.st_size:
            blocks = self._blocks(st, up)
        return pack_os_stat(st, ino, blocks)

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
                    if not plain and is_whiteout_stat(e.stat(follow_symlinks=False)):
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

    def _change(self, path: str, change: Callable[[str], object]) -> str:
        """Run ``change(upper path)`` on the entry ``path`` shows, copied up if it is
        lower; return the upper path.

        The upper entry is tried first: if it exists, it is the one shown (a
        path libfuse passes is never that of a whiteout, see ``raw_getxattr``).
        """
        up = self._up(path)
        with self._lock:
            try:
                change(up)
                return up
            except (FileNotFoundError, NotADirectoryError):
                pass
            up = self._need_upper(path)
            change(up)
            return up

    def _changed(self, up: str) -> bytes:
        """The answer for the upper entry ``up`` just changed (libfuse asks for it next)."""
        return self._packed(os.stat(up, dir_fd=self._fd, follow_symlinks=False), up)

    def _chmod(self, path: str, mode: int) -> str:
        perm = stat.S_IMODE(mode)
        return self._change(path, lambda up: os.chmod(up, perm, dir_fd=self._fd))

    def _chown(self, path: str, uid: int, gid: int) -> str:
        def change(up: str) -> None:
            os.chown(up, uid, gid, dir_fd=self._fd, follow_symlinks=False)

        return self._change(path, change)

    def _utimens(self, path: str, times: tuple[int, int] | None) -> str:
        return self._change(path, lambda up: utimens_at(self._fd, up, times))

    def chmod(self, path: str, mode: int) -> int:
        self._chmod(path, mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._chown(path, uid, gid)
        return 0

    def utimens(self, path: str, times=None) -> int:
        self._utimens(path, times)
        return 0

    # The same for layerfs.fs.fastfuse, answering with the new attributes.
    def raw_chmod(self, path: bytes, mode: int) -> bytes:
        return self._changed(self._chmod(_text(path), mode))

    def raw_chown(self, path: bytes, uid: int, gid: int) -> bytes:
        return self._changed(self._chown(_text(path), uid, gid))

    def raw_utimens(self, path: bytes, times: tuple[int, int] | None) -> bytes:
        return self._changed(self._utimens(_text(path), times))

    # -- xattrs --------------------------------------------------------------------------
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if is_private_xattr(name):
            raise _err(errno.ENODATA)
        up = self._up(path)
        st = self._ulstat(up)  # (the kernel asks for security.capability before every write)
        if st is not None:
            if is_whiteout_stat(st):
                raise _err(errno.ENOENT)
            return self.tree.xattr(os.getxattr, up, name)
        node = self._lower_at(path[1:])
        if node is None:
            raise _err(errno.ENOENT)
        value = self.view.xattrs(node).get(name)
        if value is None:
            raise _err(errno.ENODATA)
        return value

    def raw_getxattr(self, path: bytes, name: bytes) -> bytes | None:
        """``getxattr`` for layerfs.fs.fastfuse: None if the attribute is not set.

        The kernel asks for security.capability before every write (and
        chown), almost always of an upper file without it: the upper entry is
        asked first, by its absolute path as bytes, and paths found without it
        are remembered until names or xattrs change (the kernel's own removal
        of the attribute on write is a removexattr). A path libfuse passes is
        one the kernel looked up, never a whiteout (its name is gone from
        libfuse's table when it is deleted), so only ENOENT needs the full
        ``getxattr``.
        """
        if name.startswith(_PRIVATE_PREFIXES):
            return None
        caps = name == _CAPS
        if caps and path in self._no_caps:
            return None
        try:
            if len(path) <= self._room:
                try:
                    return os.getxattr(self._prefix + path, name, follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    pass  # no upper entry: the general way
            return self.getxattr(_text(path), _text(name))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
        if caps:
            self._known_without_caps(path)
        return None

    def _known_without_caps(self, path: bytes) -> None:
        """Remember that ``path`` has no security.capability (see ``raw_getxattr``)."""
        if len(self._no_caps) >= _NO_CAPS_MAX:
            self._no_caps.clear()
        self._no_caps.add(path)

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
            self._no_caps.clear()
            self.tree.xattr(os.setxattr, self._need_upper(path), name, value, options)
        return 0

    def removexattr(self, path: str, name: str) -> int:
        if is_private_xattr(name):
            raise _err(errno.ENODATA)
        with self._lock:
            self._no_caps.clear()
            self.tree.xattr(os.removexattr, self._need_upper(path), name)
        return 0

    # -- namespace -----------------------------------------------------------------------
    def mkdir(self, path: str, mode: int) -> int:
        with self._lock:
            _, up, hid = self._new_entry(
                path, lambda up: os.mkdir(up, stat.S_IMODE(mode), dir_fd=self._fd)
            )
            if hid:
                set_opaque_at(self.tree, up)
            self._owner(up)
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        with self._lock:
            _, up, _ = self._new_entry(path, lambda up: os.mknod(up, mode, dev, dir_fd=self._fd))
            self._owner(up)
        return 0

    def symlink(self, target: str, source: str) -> int:
        with self._lock:
            _, up, _ = self._new_entry(target, lambda up: os.symlink(source, up, dir_fd=self._fd))
            self._owner(up)
        return 0

    def link(self, target: str, source: str) -> int:
        with self._lock:
            src = self._need_upper(source)

            def make(up: str) -> None:
                os.link(src, up, src_dir_fd=self._fd, dst_dir_fd=self._fd, follow_symlinks=False)

            _, up, _ = self._new_entry(target, make)
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
        if raw is not None and is_whiteout_stat(raw):
            raise _err(errno.ENOENT)
        if raw is None and under is None:
            raise _err(errno.ENOENT)
        return up, raw, (under if raw is None else None), under

    def unlink(self, path: str) -> int:
        with self._lock:
            self._no_caps.clear()
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
            self._no_caps.clear()
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
            self._no_caps.clear()
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
                if is_whiteout_stat(raw_new) and is_dir:
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

    def _open_upper(self, up: str, flags: int) -> int:
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
        return self._add(handle)

    def _open(self, path: str, flags: int) -> tuple[int, bool]:
        """Open ``path``; return the file handle and whether cached pages may be kept."""
        writing = (flags & _ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        up = self._up(path)
        st = self._ulstat(up)
        if st is not None and not is_whiteout_stat(st):
            with self._lock:
                return self._open_upper(up, flags), False
        node = self._lower_at(path[1:]) if st is None else None
        if node is None:
            raise _err(errno.ENOENT)
        if writing:
            with self._lock:
                return self._open_upper(self._need_upper(path), flags), False
        handle = Handle()
        if self._open_lower is not None:
            handle.fd = self._open_lower(node)
        else:
            handle.node = node
        return self._add(handle), True

    def open(self, path: str, fi) -> int:
        fi.fh, keep_cache = self._open(path, fi.flags)
        if keep_cache:
            fi.keep_cache = 1
        return 0

    def raw_open(self, path: bytes, flags: int) -> tuple[int, bool]:
        return self._open(_text(path), flags)

    def _create(self, path: str, mode: int) -> tuple[int, bytes]:
        """Create and open a new regular file at ``path``; return its file handle and
        its attributes (the answer libfuse asks for next)."""
        perm = stat.S_IMODE(mode)
        with self._lock:
            fd, up, _hid = self._new_entry(
                path, lambda up: os.open(up, _CREATE, perm, dir_fd=self._fd)
            )
            try:
                uid, gid, _pid = fuse_get_context()
                if (uid, gid) != self._ids:
                    os.fchown(fd, uid, gid)
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            self._inos[st.st_ino] = UPPER_INO_TAG | st.st_ino  # new: no inode number to keep
            attrs = self._packed(st, up)
            return self._add(Handle(fd=fd)), attrs

    def create(self, path: str, mode: int, fi) -> int:
        fi.fh, _attrs = self._create(path, mode)
        return 0

    def raw_create(self, path: bytes, mode: int) -> tuple[int, bytes]:
        made = self._create(_text(path), mode)
        self._known_without_caps(path)  # a new file has none
        return made

    def raw_pread(self, fh: int, size: int, offset: int) -> bytes:
        h = self._handles[fh]
        if h.meta is not None:
            return h.meta.read(size, offset)
        if h.fd >= 0:
            return os.pread(h.fd, size, offset)
        return self.view.read(h.node, offset, size)

    def raw_pwrite(self, fh: int, data: bytes, offset: int) -> int:
        h = self._handles[fh]
        if h.meta is not None:
            return h.meta.write(data, offset)
        return os.pwrite(h.fd, data, offset)

    def read(self, path: str, size: int, offset: int, fi) -> bytes:
        return self.raw_pread(fi.fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fi) -> int:
        return self.raw_pwrite(fi.fh, data, offset)

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

    def fsync(self, path: str, datasync: int, fi) -> int:
        h = self._handles[fi.fh]
        fd = h.meta.fd if h.meta is not None else h.fd
        if fd >= 0:
            if datasync and h.meta is None:
                os.fdatasync(fd)
            else:
                os.fsync(fd)
        return 0

    def raw_release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        if h.fd >= 0:
            os.close(h.fd)
        if h.meta is not None:
            with self._lock:
                self._drop_meta(h.meta_key, h.meta)

    def release(self, path: str, fi) -> int:
        self.raw_release(fi.fh)
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
