"""DirStack: a layerfs.view.View over plain lower directories, as overlayfs merges them.

The first directory is the top, as in overlayfs' ``lowerdir=A:B``. A name is
hidden from the layers below by a whiteout in a layer above: a character device
0/0 of that name, or a file ``.wh.NAME``. A directory hides every lower child
when it has the xattr ``trusted.overlay.opaque`` = ``y`` or contains
``.wh..wh..opq``. Directory over directory merges (upper attributes win);
anything else hides what is below. ``.wh.*`` names are never shown.

Inode numbers are the layer's own st_ino tagged with the layer's position
(``(index + 1) << 48``), so they stay the same across mounts of the same stack.
Each lower directory is opened once and reached through its descriptor
(layerfs.treedir), so paths near PATH_MAX inside the stack work.
"""

from __future__ import annotations

import errno
import os
import stat
from functools import lru_cache
from pathlib import Path

from layerfs.errors import LayerfsError
from layerfs.records import kind_from_mode
from layerfs.treedir import TreeDir
from layerfs.union.vocab import (
    OPAQUE_MARKER,
    OPAQUE_VALUE,
    OVERLAY_XATTR_PREFIX,
    WHITEOUT_PREFIX,
    XATTR_OPAQUE,
    NameKind,
    is_whiteout_stat,
    parse_member_name,
    whiteout_name,
)
from layerfs.view import FsStats, Node

LAYER_SHIFT = 48


class DirStackError(LayerfsError):
    """A lower directory of an overlay mount cannot be used."""


def _join(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


def _opaque(tree: TreeDir, rel: str) -> bool:
    try:
        if tree.xattr(os.getxattr, rel, XATTR_OPAQUE) == OPAQUE_VALUE:
            return True
    except OSError:
        pass
    return tree.lexists(_join(rel, OPAQUE_MARKER))


class DirStack:
    """A read-only View over lower directories, top first; see the module docstring.

    Node keys are (layer index, path relative to that layer's directory).
    """

    def __init__(self, lowers: list[str | Path], cache_entries: int = 65536) -> None:
        if not lowers:
            raise DirStackError("an overlay mount needs at least one lowerdir")
        self.lowers = [os.path.abspath(p) for p in lowers]
        for path in self.lowers:
            if not os.path.isdir(path):
                raise DirStackError(f"lowerdir {path} is not a directory: check the path")
        self._trees = [TreeDir(path) for path in self.lowers]
        self._dirs = lru_cache(maxsize=cache_entries)(self._resolve_dir)

    def close(self) -> None:
        """Close the lower directories' descriptors."""
        for tree in self._trees:
            tree.close()

    # -- resolution ----------------------------------------------------------------
    def _resolve_dir(self, path: str) -> tuple[tuple[int, str], ...]:
        """(layer index, path in the layer) of every layer contributing to directory ``path``."""
        if path == "":
            return tuple((i, ".") for i in range(len(self.lowers)))
        parent, _, name = path.rpartition("/")
        found = self._entry(parent, name)
        if not found or not stat.S_ISDIR(found[0][2].st_mode):
            return ()
        return tuple((i, real) for i, real, st in found if stat.S_ISDIR(st.st_mode))

    def _entry(self, parent: str, name: str) -> list[tuple[int, str, os.stat_result]]:
        """Layers showing ``name`` in directory ``parent``: the top one, plus merged dirs."""
        if name.startswith(WHITEOUT_PREFIX):
            return []
        out: list[tuple[int, str, os.stat_result]] = []
        for index, pdir in self._dirs(parent):
            tree = self._trees[index]
            real = _join(pdir, name)
            st = tree.lstat(real)
            if st is not None and is_whiteout_stat(st):
                break
            if st is None:
                if tree.lexists(_join(pdir, whiteout_name(name))):
                    break
            elif not out:
                out.append((index, real, st))
                if not stat.S_ISDIR(st.st_mode) or _opaque(tree, real):
                    break
            elif stat.S_ISDIR(st.st_mode):
                out.append((index, real, st))
                if _opaque(tree, real):
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
            target=os.readlink(real, dir_fd=self._trees[index].fd)
            if stat.S_ISLNK(st.st_mode)
            else "",
            key=(index, real),
        )

    # -- View ----------------------------------------------------------------------
    def lookup(self, path: str) -> Node | None:
        if path == "":
            return self._node(0, ".", os.lstat(self.lowers[0]))
        parent, _, name = path.rpartition("/")
        found = self._entry(parent, name)
        if not found:
            return None
        return self._node(*found[0])

    def listdir(self, path: str) -> list[str]:
        names: list[str] = []
        seen: set[str] = set()
        layers = self._dirs(path)
        for index, real in layers:
            hidden: list[str] = []
            try:
                with self._trees[index].scandir(real) as (_fd, entries):
                    for e in entries:
                        name = e.name
                        marked = parse_member_name(name)
                        if marked.kind is not NameKind.PLAIN:
                            if marked.kind is NameKind.WHITEOUT:
                                hidden.append(marked.hidden)
                            continue
                        if name in seen:
                            continue
                        plain = e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)
                        if not plain and is_whiteout_stat(e.stat(follow_symlinks=False)):
                            hidden.append(name)
                            continue
                        seen.add(name)
                        names.append(name)
            except OSError:
                continue
            seen.update(hidden)
        return names

    def open_file(self, node: Node) -> int:
        """A read-only descriptor of a regular file node (the caller closes it)."""
        index, rel = node.key
        return self._trees[index].open(rel, os.O_RDONLY)

    def read(self, node: Node, offset: int, size: int) -> bytes:
        fd = self.open_file(node)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def real_path(self, node: Node) -> str:
        """The absolute path of a node in its lower directory (may exceed PATH_MAX)."""
        index, rel = node.key
        return self._trees[index].path if rel == "." else f"{self._trees[index].path}/{rel}"

    def xattrs(self, node: Node) -> dict[str, bytes]:
        index, rel = node.key
        tree = self._trees[index]
        out = {}
        try:
            names = tree.xattr(os.listxattr, rel)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.ENOENT, errno.ENAMETOOLONG):
                return {}
            raise
        for name in names:
            if name.startswith(OVERLAY_XATTR_PREFIX):
                continue
            try:
                out[name] = tree.xattr(os.getxattr, rel, name)
            except OSError:
                continue
        return out

    def statfs(self) -> FsStats:
        st = os.statvfs(self.lowers[0])
        return FsStats(blocks=st.f_blocks * st.f_frsize // 4096, files=st.f_files)
