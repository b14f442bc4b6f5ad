"""Merging the changes made through a lazy volume's mount onto its filled directory.

The FUSE mount keeps writes in an upper tree (format in layerfs.fs.upper) over the
backup. Once the fill has materialized the whole backup and the mount is gone, the
upper tree is applied on top of the filled directory, so the volume holds exactly what
the mount showed: whiteouts delete, opaque directories drop the filled children they
hid, directory attributes are the upper ones, metacopy files are rebuilt from the
backup's bytes (read through the view, never from the filled copy) plus their
materialized ranges, and every other upper entry is hard-linked into place. Nothing
in the upper tree is moved or changed (except dropping layerfs' private xattrs), so
the merge can be redone from the start after a crash and gives the same result.

Containers wrote the upper tree (through the mount), so both trees are walked through
directory descriptors and no symlink is ever followed (layerfs.confined): a symlink the
container made is linked into place as a symlink, and a directory that turns out not to
be one when opened is reported and skipped. `merge_upper` returns once the merged tree
is on disk (``syncfs``), so the caller may then delete the upper tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from layerfs import confined
from layerfs.confined import (
    Attributes,
    Escape,
    apply_fd,
    lstat_at,
    proc_path,
    read_xattrs,
    remove_at,
)
from layerfs.fs.upper import MetaCopy, read_metacopy
from layerfs.union.vocab import OPAQUE_VALUE, XATTR_OPAQUE, is_private_xattr, is_whiteout_stat
from layerfs.view import View

log = logging.getLogger("volplugin.lazy")

PIECE = 1 << 20
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def merge_upper(upper: Path, target: Path, view: View) -> int:
    """Apply the upper tree ``upper`` onto ``target`` and sync; return the entries applied."""
    up_root = confined.open_root(upper)
    try:
        dst_root = confined.open_root(target)
        try:
            merger = _Merger(dst_root, view, f"the upper tree {upper}")
            merger.directory(up_root, dst_root, "")
            confined.syncfs(dst_root)
        finally:
            os.close(dst_root)
    finally:
        os.close(up_root)
    return merger.applied


class _Merger:
    def __init__(self, dst_root: int, view: View, label: str) -> None:
        self.dst_root = dst_root
        self.view = view
        self.label = label
        self.applied = 0
        self.skipped: list[str] = []
        self._groups: dict[tuple[int, int], str] = {}  # rebuilt metacopy inode -> its path

    def directory(self, upfd: int, dstfd: int, rel: str) -> None:
        names = sorted(os.listdir(upfd))
        if rel and _opaque(upfd):
            keep = set(names)
            for name in os.listdir(dstfd):
                if name not in keep:
                    remove_at(dstfd, name)
        for name in names:
            self.entry(upfd, dstfd, f"{rel}/{name}" if rel else name, name)
        _copy_attributes(upfd, dstfd)
        self.applied += 1

    def entry(self, upfd: int, dstfd: int, rel: str, name: str) -> None:
        st = lstat_at(upfd, name)
        if st is None:
            return
        if is_whiteout_stat(st):
            remove_at(dstfd, name)
            self.applied += 1
            return
        if stat.S_ISDIR(st.st_mode):
            self._subdirectory(upfd, dstfd, rel, name)
            return
        if not stat.S_ISREG(st.st_mode):
            _strip_private(proc_path(upfd, name), follow=False)
            if not _same_inode(dstfd, name, st):
                _place(dstfd, name, lambda tmp: _link(upfd, name, dstfd, tmp))
            self.applied += 1
            return
        src = os.open(name, _READ_FLAGS, dir_fd=upfd)
        try:
            fst = os.fstat(src)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                self._skip(rel, "it was replaced during the merge")
                return
            meta = read_metacopy(src)
            if meta is None:
                _strip_private(src, follow=True)
                if not _same_inode(dstfd, name, st):  # already linked by an earlier run
                    _place(dstfd, name, lambda tmp: _link(upfd, name, dstfd, tmp))
            elif (st.st_dev, st.st_ino) in self._groups:
                first = self._groups[(st.st_dev, st.st_ino)]
                _place(dstfd, name, lambda tmp: self._link_first(first, dstfd, tmp))
            else:
                _place(dstfd, name, lambda tmp: self._rebuild(src, dstfd, tmp, fst, meta))
                if st.st_nlink > 1:
                    self._groups[(st.st_dev, st.st_ino)] = rel
        finally:
            os.close(src)
        self.applied += 1

    def _subdirectory(self, upfd: int, dstfd: int, rel: str, name: str) -> None:
        there = lstat_at(dstfd, name)
        if there is not None and not stat.S_ISDIR(there.st_mode):
            remove_at(dstfd, name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dstfd)
        try:
            sub_up = confined.open_dir(upfd, name, label=self.label)
        except Escape as exc:
            self._skip(rel, str(exc))
            return
        try:
            sub_dst = confined.open_dir(dstfd, name, label="the filled directory")
        except Escape as exc:
            os.close(sub_up)
            self._skip(rel, str(exc))
            return
        try:
            self.directory(sub_up, sub_dst, rel)
        finally:
            os.close(sub_up)
            os.close(sub_dst)

    def _skip(self, rel: str, why: str) -> None:
        log.warning("lazy merge: skipping %r of %s: %s", rel, self.label, why)
        self.skipped.append(rel)

    def _link_first(self, first: str, dstfd: int, tmp: str) -> None:
        parent, name = confined.split(first)
        pfd = confined.open_dir(self.dst_root, parent, label="the filled directory")
        try:
            os.link(name, tmp, src_dir_fd=pfd, dst_dir_fd=dstfd, follow_symlinks=False)
        finally:
            os.close(pfd)

    def _rebuild(self, src: int, dstfd: int, tmp: str, st: os.stat_result, meta: MetaCopy) -> None:
        """Write a metacopy file's full content (backup bytes + its ranges) to ``tmp``."""
        node = self.view.lookup(meta.origin)
        lower_size = node.size if node is not None else 0
        out = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dstfd
        )
        try:
            missing = meta.missing(0, st.st_size)
            pos = 0
            for start, end in [*missing, (st.st_size, st.st_size)]:
                _copy_fd(src, out, pos, start)  # materialized bytes before this gap
                for off in range(start, end, PIECE):
                    n = min(PIECE, end - off)
                    stop = min(off + n, lower_size)
                    data = self.view.read(node, off, stop - off) if node and stop > off else b""
                    os.pwrite(out, data + bytes(n - len(data)), off)
                pos = end
            os.ftruncate(out, st.st_size)
            _copy_attributes(src, out)
        finally:
            os.close(out)


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, XATTR_OPAQUE) == OPAQUE_VALUE
    except OSError:
        return False


def _same_inode(dirfd: int, name: str, st: os.stat_result) -> bool:
    other = lstat_at(dirfd, name)
    return other is not None and (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _link(upfd: int, name: str, dstfd: int, tmp: str) -> None:
    os.link(name, tmp, src_dir_fd=upfd, dst_dir_fd=dstfd, follow_symlinks=False)


def _copy_fd(src: int, out: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        data = os.pread(src, min(PIECE, end - pos), pos)
        if not data:
            break
        os.pwrite(out, data, pos)
        pos += len(data)


def _place(dstfd: int, name: str, make: Callable[[str], None]) -> None:
    """Make an entry at a temp name in ``dstfd`` with ``make(tmp)``, then rename it over."""
    tmp = f".lazy-merge-{secrets.token_hex(6)}"
    try:
        make(tmp)
        there = lstat_at(dstfd, name)
        if there is not None and stat.S_ISDIR(there.st_mode):
            remove_at(dstfd, name)
        os.rename(tmp, name, src_dir_fd=dstfd, dst_dir_fd=dstfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dstfd)
        raise


def _xattrs(fd: int) -> dict[str, bytes]:
    """The public xattrs of the open ``fd`` (layerfs' own are left out)."""
    return {k: v for k, v in read_xattrs(fd, fd, ".").items() if not is_private_xattr(k)}


def _strip_private(target: int | str, follow: bool) -> None:
    with contextlib.suppress(OSError):
        for name in os.listxattr(target, follow_symlinks=follow):
            if is_private_xattr(name):
                os.removexattr(target, name, follow_symlinks=follow)


def _copy_attributes(src: int, dst: int) -> None:
    """Owner, mode, public xattrs (dropping others) and mtime of open ``src`` onto ``dst``."""
    st = os.fstat(src)
    wanted = _xattrs(src)
    for name in set(_xattrs(dst)) - set(wanted):
        os.removexattr(dst, name)
    attrs = Attributes(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns, wanted)
    apply_fd(dst, attrs, owner_required=True)
