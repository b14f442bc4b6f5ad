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
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from pathlib import Path

from layerfs.fs.upper import is_opaque, is_private_xattr, is_whiteout, read_metacopy
from layerfs.view import View

PIECE = 1 << 20


def merge_upper(upper: Path, target: Path, view: View) -> int:
    """Apply the upper tree ``upper`` onto ``target``; return the entries applied."""
    merger = _Merger(Path(upper), Path(target), view)
    merger.directory("")
    return merger.applied


class _Merger:
    def __init__(self, upper: Path, target: Path, view: View) -> None:
        self.upper = upper
        self.target = target
        self.view = view
        self.applied = 0
        self._groups: dict[tuple[int, int], str] = {}  # rebuilt metacopy inode -> path

    def _up(self, rel: str) -> str:
        return os.path.join(self.upper, rel) if rel else str(self.upper)

    def _dst(self, rel: str) -> str:
        return os.path.join(self.target, rel) if rel else str(self.target)

    def directory(self, rel: str) -> None:
        up, dst = self._up(rel), self._dst(rel)
        names = sorted(os.listdir(up))
        if rel and is_opaque(up):
            keep = set(names)
            for name in os.listdir(dst):
                if name not in keep:
                    _remove(os.path.join(dst, name))
        for name in names:
            self.entry(f"{rel}/{name}" if rel else name)
        _copy_attributes(up, dst)
        self.applied += 1

    def entry(self, rel: str) -> None:
        up, dst = self._up(rel), self._dst(rel)
        st = os.lstat(up)
        if is_whiteout(st):
            _remove(dst)
            self.applied += 1
            return
        if stat.S_ISDIR(st.st_mode):
            if os.path.islink(dst) or (os.path.lexists(dst) and not os.path.isdir(dst)):
                _remove(dst)
            if not os.path.lexists(dst):
                os.mkdir(dst, 0o700)
            self.directory(rel)
            return
        meta = read_metacopy(up) if stat.S_ISREG(st.st_mode) else None
        if meta is None:
            _strip_private(up)
            if not _same_inode(dst, st):  # already linked by an earlier run
                _place(dst, lambda tmp: os.link(up, tmp, follow_symlinks=False))
        elif (st.st_dev, st.st_ino) in self._groups:
            first = self._groups[(st.st_dev, st.st_ino)]
            _place(dst, lambda tmp: os.link(first, tmp))
        else:
            _place(dst, lambda tmp: self._rebuild(up, tmp, st, meta))
            if st.st_nlink > 1:
                self._groups[(st.st_dev, st.st_ino)] = dst
        self.applied += 1

    def _rebuild(self, up: str, tmp: str, st: os.stat_result, meta) -> None:
        """Write a metacopy file's full content (backup bytes + its ranges) to ``tmp``."""
        node = self.view.lookup(meta.origin)
        lower_size = node.size if node is not None else 0
        src = os.open(up, os.O_RDONLY)
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
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
        finally:
            os.close(src)
            os.close(out)
        _copy_attributes(up, tmp)


def _same_inode(path: str, st: os.stat_result) -> bool:
    try:
        other = os.lstat(path)
    except FileNotFoundError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _copy_fd(src: int, out: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        data = os.pread(src, min(PIECE, end - pos), pos)
        if not data:
            break
        os.pwrite(out, data, pos)
        pos += len(data)


def _place(dst: str, make) -> None:
    """Make an entry at a temp name next to ``dst`` with ``make(tmp)``, then rename it over."""
    tmp = os.path.join(os.path.dirname(dst), f".lazy-merge-{secrets.token_hex(6)}")
    try:
        make(tmp)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _xattrs(path: str) -> dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    for name in names:
        if not is_private_xattr(name):
            with contextlib.suppress(OSError):
                out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _strip_private(path: str) -> None:
    with contextlib.suppress(OSError):
        for name in os.listxattr(path, follow_symlinks=False):
            if is_private_xattr(name):
                os.removexattr(path, name, follow_symlinks=False)


def _copy_attributes(src: str, dst: str) -> None:
    """Owner, mode, public xattrs (dropping others) and mtime of ``src`` onto ``dst``."""
    st = os.lstat(src)
    os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    wanted = _xattrs(src)
    for name in set(_xattrs(dst)) - set(wanted):
        os.removexattr(dst, name, follow_symlinks=False)
    for name, value in wanted.items():
        os.setxattr(dst, name, value, follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
