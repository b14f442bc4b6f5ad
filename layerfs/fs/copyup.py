"""Copy-up: bringing lower entries into the upper tree, metadata first, data only when needed.

Every copy is built in the workdir and renamed into place, so the upper tree
never holds a half-made entry. Regular files are copied up as metacopy
placeholders (sparse, same size, xattr naming their origin, see
layerfs.fs.upper); their bytes move only when written. A lower file with
several names is copied up once and linked under every name still visible.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import threading
from collections.abc import Callable

from layerfs.fs.upper import (
    X_INO,
    MetaCopy,
    UpperDirs,
    clear_metacopy,
    is_opaque_at,
    set_opaque_at,
    write_metacopy,
)
from layerfs.records import Kind
from layerfs.treedir import TreeDir
from layerfs.union.vocab import XATTR_METACOPY, XATTR_REDIRECT, is_whiteout_stat
from layerfs.view import Node, View

LowerAt = Callable[[str], "Node | None"]
COPY_PIECE = 1 << 20
_XATTR_TOO_BIG = (errno.ENOSPC, errno.E2BIG, errno.ERANGE)


def _enoent(rel: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), rel)


class CopyUp:
    """Copies lower entries of ``view`` into the upper tree ``tree`` of ``dirs``.

    Upper paths are relative to ``tree`` (``"."`` is its root).
    """

    def __init__(
        self, view: View, dirs: UpperDirs, lower_at: LowerAt, overlay: bool, tree: TreeDir
    ) -> None:
        self.view = view
        self.tree = tree
        self.tmp = str(dirs.tmp)
        self.lower_at = lower_at  # the lower node visible at a path, or None
        self.overlay = overlay  # also write kernel overlayfs metacopy xattrs
        self._seq = itertools.count()
        self._groups: dict[int, list[str]] | None = None
        self._groups_lock = threading.Lock()

    @staticmethod
    def upath(rel: str) -> str:
        """The path of lower path ``rel`` relative to the upper tree."""
        return rel or "."

    def _tmp_name(self) -> str:
        return f"{self.tmp}/#{os.getpid()}.{next(self._seq)}"

    # -- metadata --------------------------------------------------------------------
    def _apply_meta(self, path: str, node: Node) -> None:
        os.lchown(path, node.uid, node.gid)
        if node.kind is not Kind.SYMLINK:
            os.chmod(path, node.mode & 0o7777)
        for name, value in self.view.xattrs(node).items():
            os.setxattr(path, name, value, follow_symlinks=False)
        with contextlib.suppress(OSError):
            os.setxattr(path, X_INO, str(node.ino).encode(), follow_symlinks=False)
        os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)

    def _mark_metacopy(self, fd: int, node: Node, origin: str) -> None:
        """Make the (sparse) file ``fd`` a metacopy of ``origin``, or a full copy of ``node``
        if its xattrs do not fit (an origin path near PATH_MAX is longer than ext4 allows)."""
        try:
            write_metacopy(fd, MetaCopy(origin))
            if self.overlay:
                os.setxattr(fd, XATTR_METACOPY, b"")
                os.setxattr(fd, XATTR_REDIRECT, ("/" + origin).encode())
        except OSError as exc:
            if exc.errno not in _XATTR_TOO_BIG:
                raise
            clear_metacopy(fd)
            self._copy_data(fd, node)

    def _copy_data(self, fd: int, node: Node) -> None:
        pos = 0
        while pos < node.size:
            data = self.view.read(node, pos, min(COPY_PIECE, node.size - pos))
            if not data:
                break
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n

    def _make(self, node: Node, origin: str) -> str:
        """Build a copy of ``node`` in the workdir; return its temporary path."""
        tmp = self._tmp_name()
        try:
            if node.kind is Kind.DIR:
                os.mkdir(tmp, 0o700)
            elif node.kind is Kind.FILE:
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                try:
                    if node.size:
                        os.ftruncate(fd, node.size)
                        self._mark_metacopy(fd, node, origin)
                finally:
                    os.close(fd)
            elif node.kind is Kind.SYMLINK:
                os.symlink(node.target, tmp)
            else:
                os.mknod(tmp, node.st_mode, os.makedev(*node.rdev))
            self._apply_meta(tmp, node)
        except BaseException:
            _remove(tmp)
            raise
        return tmp

    # -- entries -----------------------------------------------------------------------
    def ensure_parents(self, rel: str) -> None:
        """Make sure every ancestor directory of ``rel`` exists in the upper tree."""
        cur = ""
        for name in rel.split("/")[:-1]:
            cur = f"{cur}/{name}" if cur else name
            if self.tree.lstat(cur) is None:
                node = self.lower_at(cur)
                if node is None or node.kind is not Kind.DIR:
                    raise _enoent(cur)
                self._place(self._make(node, cur), cur)

    def _place(self, tmp: str, rel: str) -> None:
        try:
            os.rename(tmp, self.upath(rel), dst_dir_fd=self.tree.fd)
        except BaseException:
            _remove(tmp)
            raise

    def copy_up(self, rel: str, node: Node) -> str:
        """Copy the lower ``node`` visible at ``rel`` into the upper tree; return its upper
        path."""
        self.ensure_parents(rel)
        if node.kind is Kind.FILE and node.nlink > 1:
            self._copy_group(rel, node)
        else:
            self._place(self._make(node, rel), rel)
        return self.upath(rel)

    def _copy_group(self, rel: str, node: Node) -> None:
        tmp = self._make(node, rel)
        try:
            for path in self._group_paths(node, rel):
                if path != rel:
                    other = self.lower_at(path)
                    if other is None or other.ino != node.ino:
                        continue
                    if self.tree.lstat(path) is not None:
                        continue
                self.ensure_parents(path)
                os.link(tmp, path, dst_dir_fd=self.tree.fd, follow_symlinks=False)
        finally:
            _remove(tmp)

    def _group_paths(self, node: Node, rel: str) -> list[str]:
        finder = getattr(self.view, "hardlink_paths", None)
        if finder is not None:
            paths = list(finder(node))
        else:
            with self._groups_lock:
                if self._groups is None:
                    self._groups = self._scan_groups()
            paths = list(self._groups.get(node.ino, []))
        return [rel] + [p for p in paths if p != rel]

    def _scan_groups(self) -> dict[int, list[str]]:
        """Every lower path of every regular file with several names, by inode."""
        groups: dict[int, list[str]] = {}
        stack = [""]
        while stack:
            parent = stack.pop()
            for name in self.view.listdir(parent):
                path = f"{parent}/{name}" if parent else name
                node = self.view.lookup(path)
                if node is None:
                    continue
                if node.kind is Kind.DIR:
                    stack.append(path)
                elif node.kind is Kind.FILE and node.nlink > 1:
                    groups.setdefault(node.ino, []).append(path)
        return groups

    def copy_up_tree(self, rel: str) -> None:
        """Copy a directory and everything below it up, so it no longer needs the lower.

        Directories become opaque; files become metacopy files pointing at their
        old lower paths. Used before a directory with lower content is renamed.
        """
        up = self.upath(rel)
        if self.tree.lstat(up) is None:
            node = self.lower_at(rel)
            if node is None:
                raise _enoent(rel)
            self.copy_up(rel, node)
        if is_opaque_at(self.tree, up):
            return
        lower = self.lower_at(rel)
        if lower is not None and lower.kind is Kind.DIR:
            for name in self.view.listdir(rel):
                child = f"{rel}/{name}" if rel else name
                cst = self.tree.lstat(child)
                if cst is None:
                    node = self.view.lookup(child)
                    if node is None:
                        continue
                    self.copy_up(child, node)
                    if node.kind is Kind.DIR:
                        self.copy_up_tree(child)
                    continue
                if stat.S_ISDIR(cst.st_mode):
                    self.copy_up_tree(child)
        with self.tree.scandir(up) as (dfd, it):  # whiteouts hide nothing in an opaque dir
            for e in it:
                if not e.is_dir(follow_symlinks=False) and is_whiteout_stat(
                    e.stat(follow_symlinks=False)
                ):
                    os.unlink(e.name, dir_fd=dfd)
        set_opaque_at(self.tree, up)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
