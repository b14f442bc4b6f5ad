"""DirStack: a layerfs.view.View over plain lower directories, as overlayfs merges them.

The first directory is the top, as in overlayfs' ``lowerdir=A:B``. A name is
hidden from the layers below by a whiteout in a layer above: a character device
0/0 of that name, or a file ``.wh.NAME``. A directory hides every lower child
when it has the xattr ``trusted.overlay.opaque`` = ``y`` or contains
``.wh..wh..opq``. Directory over directory merges (upper attributes win);
anything else hides what is below. ``.wh.*`` names are never shown.

Inode numbers are the layer's own st_ino tagged with the layer's position
(``(index + 1) << 48``), so they stay the same across mounts of the same stack.
"""

from __future__ import annotations

import errno
import os
import stat
from functools import lru_cache
from pathlib import Path

from layerfs.errors import LayerfsError
from layerfs.records import kind_from_mode
from layerfs.view import FsStats, Node

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
X_OPAQUE = "trusted.overlay.opaque"
_HIDDEN_XATTRS = ("trusted.overlay.",)
LAYER_SHIFT = 48


class DirStackError(LayerfsError):
    """A lower directory of an overlay mount cannot be used."""


def _whiteout_st(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _opaque(path: str) -> bool:
    try:
        if os.getxattr(path, X_OPAQUE, follow_symlinks=False) == b"y":
            return True
    except OSError:
        pass
    return os.path.lexists(os.path.join(path, WH_OPAQUE))


class DirStack:
    """A read-only View over lower directories, top first; see the module docstring."""

    def __init__(self, lowers: list[str | Path], cache_entries: int = 65536) -> None:
        if not lowers:
            raise DirStackError("an overlay mount needs at least one lowerdir")
        self.lowers = [os.path.abspath(p) for p in lowers]
        for path in self.lowers:
            if not os.path.isdir(path):
                raise DirStackError(f"lowerdir {path} is not a directory: check the path")
        self._dirs = lru_cache(maxsize=cache_entries)(self._resolve_dir)

    # -- resolution ----------------------------------------------------------------
    def _resolve_dir(self, path: str) -> tuple[tuple[int, str], ...]:
        """(layer index, real path) of every layer contributing to directory ``path``."""
        if path == "":
            return tuple(enumerate(self.lowers))
        parent, _, name = path.rpartition("/")
        found = self._entry(parent, name)
        if not found or not stat.S_ISDIR(found[0][2].st_mode):
            return ()
        return tuple((i, real) for i, real, st in found if stat.S_ISDIR(st.st_mode))

    def _entry(self, parent: str, name: str) -> list[tuple[int, str, os.stat_result]]:
        """Layers showing ``name`` in directory ``parent``: the top one, plus merged dirs."""
        if name.startswith(WH_PREFIX):
            return []
        out: list[tuple[int, str, os.stat_result]] = []
        for index, pdir in self._dirs(parent):
            real = os.path.join(pdir, name)
            st = _lstat(real)
            if st is not None and _whiteout_st(st):
                break
            if st is None:
                if os.path.lexists(os.path.join(pdir, WH_PREFIX + name)):
                    break
            elif not out:
                out.append((index, real, st))
                if not stat.S_ISDIR(st.st_mode) or _opaque(real):
                    break
            elif stat.S_ISDIR(st.st_mode):
                out.append((index, real, st))
                if _opaque(real):
                    break
            else:
                break  # a non-directory below a directory ends the merge
        return out

    def _node(self, index: int, real: str, st: os.stat_result) -> Node:
        kind = kind_from_mode(st.st_mode)
        return Node(
            ino=((index + 1) << LAYER_SHIFT) | st.st_ino,
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if not stat.S_ISDIR(st.st_mode) else 4096,
            mtime_ns=st.st_mtime_ns,
            nlink=st.st_nlink,
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)),
            target=os.readlink(real) if stat.S_ISLNK(st.st_mode) else "",
            key=real,
        )

    # -- View ----------------------------------------------------------------------
    def lookup(self, path: str) -> Node | None:
        if path == "":
            return self._node(0, self.lowers[0], os.lstat(self.lowers[0]))
        parent, _, name = path.rpartition("/")
        found = self._entry(parent, name)
        if not found:
            return None
        return self._node(*found[0])

    def listdir(self, path: str) -> list[str]:
        names: list[str] = []
        seen: set[str] = set()
        layers = self._dirs(path)
        for _index, real in layers:
            try:
                entries = list(os.scandir(real))
            except OSError:
                continue
            hidden: list[str] = []
            for e in entries:
                name = e.name
                if name.startswith(WH_PREFIX):
                    if name != WH_OPAQUE:
                        hidden.append(name[len(WH_PREFIX) :])
                    continue
                if name in seen:
                    continue
                plain = e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)
                if not plain and _whiteout_st(e.stat(follow_symlinks=False)):
                    hidden.append(name)
                    continue
                seen.add(name)
                names.append(name)
            seen.update(hidden)
        return names

    def read(self, node: Node, offset: int, size: int) -> bytes:
        fd = os.open(node.key, os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def real_path(self, node: Node) -> str:
        """The path of a node in its lower directory (for copying it with the kernel)."""
        return node.key

    def xattrs(self, node: Node) -> dict[str, bytes]:
        out = {}
        try:
            names = os.listxattr(node.key, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.ENOENT):
                return {}
            raise
        for name in names:
            if name.startswith(_HIDDEN_XATTRS):
                continue
            try:
                out[name] = os.getxattr(node.key, name, follow_symlinks=False)
            except OSError:
                continue
        return out

    def statfs(self) -> FsStats:
        st = os.statvfs(self.lowers[0])
        return FsStats(blocks=st.f_blocks * st.f_frsize // 4096, files=st.f_files)
