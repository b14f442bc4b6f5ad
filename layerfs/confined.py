"""File access confined beneath a directory descriptor, never following a symlink.

Volumes and upper directories are written by containers while we, as root, read
or write them. Every call here works on one name inside a directory held open
by descriptor, with ``O_NOFOLLOW`` (or ``AT_SYMLINK_NOFOLLOW``): a path is
walked one component at a time, each opened ``O_DIRECTORY | O_NOFOLLOW``, so a
directory swapped for a symlink mid-walk fails with ``ELOOP`` or ``ENOTDIR``
(raised as ``Escape``) instead of leading elsewhere. Calls that have no ``*at``
form (chmod of a non-directory, xattrs) go through the entry's own ``O_PATH``
descriptor (``/proc/self/fd/N``), checked with ``fstat`` first, or through the
directory's descriptor plus one no-follow name; both only ever reach the object
inside the tree.

Paths given here are stored paths (``formats.paths.check_stored``): relative,
'/'-separated, without '.' or '..'; the root is ''.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field

from layerfs.formats.paths import BadPath, check_stored

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_ESCAPES = (errno.ELOOP, errno.ENOTDIR, errno.EXDEV)


class Escape(OSError):
    """A path component inside the tree is not a plain directory (a symlink, a file...)."""


def _escape(exc: OSError, root_label: str, rel: str) -> OSError:
    if exc.errno in _ESCAPES:
        return Escape(
            exc.errno,
            f"{rel!r} in {root_label} is not a plain directory (a symlink or a file); "
            "refusing to follow it",
        )
    return exc


def open_root(path: str | os.PathLike, *, create: bool = False, mode: int = 0o755) -> int:
    """A descriptor of the directory ``path`` (its last component must not be a symlink).

    The components above it are trusted: they belong to the host, not to a container.
    """
    path = os.fspath(path)
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise _escape(exc, path, os.path.basename(path)) from None


def split(rel: str) -> tuple[str, str]:
    """(parent, name) of a stored path; the root's parent is ''."""
    if "/" in rel:
        parent, name = rel.rsplit("/", 1)
        return parent, name
    return "", rel


def open_dir(dirfd: int, rel: str, *, create: int | None = None, label: str = "the tree") -> int:
    """A new descriptor of directory ``rel`` beneath ``dirfd``, walked without following.

    ``create``: make missing directories with that mode (a component that exists
    and is not a directory is still refused).
    """
    try:
        check_stored(rel)
    except BadPath as exc:
        raise Escape(errno.EINVAL, str(exc)) from None
    fd = os.dup(dirfd)
    if not rel:
        return fd
    done = ""
    try:
        for name in rel.split("/"):
            done = f"{done}/{name}" if done else name
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, create, dir_fd=fd)
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except OSError as exc:
        os.close(fd)
        raise _escape(exc, label, done) from None
    return fd


@dataclass
class DirFds:
    """Open descriptors of directories beneath a root, reused while a job walks them.

    ``get(rel)`` opens ``rel`` from its nearest cached ancestor, one no-follow
    component at a time. At most ``limit`` descriptors stay open (least recently
    used closed first). ``forget`` drops a directory and everything below it,
    for when it was removed or replaced. The root descriptor is owned: ``close``
    closes it with the rest.
    """

    root: int
    label: str = "the tree"
    limit: int = 256
    _fds: OrderedDict[str, int] = field(default_factory=OrderedDict)

    @classmethod
    def open(cls, path: str | os.PathLike, *, label: str | None = None) -> DirFds:
        """The directories beneath the directory ``path`` (opened with ``open_root``)."""
        return cls(open_root(path), label=label or os.fspath(path))

    def get(self, rel: str, *, create: int | None = None) -> int:
        if not rel:
            return self.root
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        parent, name = split(rel)
        pfd = self.get(parent, create=create)
        try:
            fd = open_dir(pfd, name, create=create, label=self.label)
        except Escape as exc:
            raise Escape(exc.errno, exc.strerror.replace(repr(name), repr(rel), 1)) from None
        self._fds[rel] = fd
        while len(self._fds) > self.limit:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def forget(self, rel: str) -> None:
        if not rel:
            return
        prefix = rel + "/"
        for key in [k for k in self._fds if k == rel or k.startswith(prefix)]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        """Close every descriptor, the root's included; idempotent."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.root >= 0:
            os.close(self.root)
            self.root = -1

    def __enter__(self) -> DirFds:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def proc_path(fd: int, name: str = "") -> str:
    """The /proc path of descriptor ``fd`` (plus ``/name``): reaches what ``fd`` holds."""
    return f"/proc/self/fd/{fd}/{name}" if name else f"/proc/self/fd/{fd}"


def lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    """lstat of ``name`` in ``dirfd``, or None if it is missing."""
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def read_xattrs(fd: int | None, dirfd: int, name: str) -> dict[str, bytes]:
    """The xattrs of ``name`` in ``dirfd`` (through ``fd``, its own descriptor, when given)."""
    target: int | str = fd if fd is not None else proc_path(dirfd, name)
    follow = fd is not None
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.ENOENT):
            return {}
        raise
    out: dict[str, bytes] = {}
    for key in sorted(names):
        try:
            out[key] = os.getxattr(target, key, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOENT):  # removed meanwhile
                raise
    return out


@dataclass(frozen=True, slots=True)
class Attributes:
    """What a restore sets on an entry: owner, permission bits, xattrs, modification time."""

    uid: int
    gid: int
    mode: int
    mtime_ns: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _set_xattrs(target: int | str, xattrs: dict[str, bytes], follow: bool) -> None:
    for key, value in xattrs.items():
        try:
            os.setxattr(target, key, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise


def apply_fd(fd: int, attrs: Attributes, *, owner_required: bool) -> None:
    """Set ``attrs`` on the open file or directory ``fd`` (owner first: it clears setuid)."""
    try:
        os.fchown(fd, attrs.uid, attrs.gid)
    except PermissionError:
        if owner_required:
            raise
    os.fchmod(fd, attrs.mode & 0o7777)
    _set_xattrs(fd, attrs.xattrs, True)
    os.utime(fd, ns=(attrs.mtime_ns, attrs.mtime_ns))


def apply_at(dirfd: int, name: str, attrs: Attributes, *, owner_required: bool) -> None:
    """Set ``attrs`` on ``name`` in ``dirfd``, whatever its type, never following a symlink."""
    fd = os.open(name, _NODE_FLAGS, dir_fd=dirfd)
    try:
        link = stat.S_ISLNK(os.fstat(fd).st_mode)
        try:
            if link:
                os.chown(name, attrs.uid, attrs.gid, dir_fd=dirfd, follow_symlinks=False)
            else:
                os.chown(proc_path(fd), attrs.uid, attrs.gid)
        except PermissionError:
            if owner_required:
                raise
        if link:
            _set_xattrs(proc_path(dirfd, name), attrs.xattrs, False)
            os.utime(name, ns=(attrs.mtime_ns, attrs.mtime_ns), dir_fd=dirfd, follow_symlinks=False)
        else:
            os.chmod(proc_path(fd), attrs.mode & 0o7777)
            _set_xattrs(proc_path(fd), attrs.xattrs, True)
            os.utime(proc_path(fd), ns=(attrs.mtime_ns, attrs.mtime_ns))
    finally:
        os.close(fd)


def remove_at(dirfd: int, name: str) -> None:
    """Remove ``name`` from ``dirfd``: a file or link, or a whole directory tree (no-follow)."""
    import shutil

    st = lstat_at(dirfd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        try:
            os.unlink(name, dir_fd=dirfd)
        except IsADirectoryError:  # replaced by a directory meanwhile
            shutil.rmtree(name, dir_fd=dirfd)
        except FileNotFoundError:
            pass


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding ``fd`` to disk (syncfs(2))."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def syncfs_dir(path: str | os.PathLike) -> None:
    """syncfs on the filesystem of the directory ``path`` (opened as ``open_root`` does)."""
    fd = open_root(path)
    try:
        syncfs(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"syncfs of {os.fspath(path)}: {os.strerror(exc.errno)}") from None
    finally:
        os.close(fd)


def open_file_at(
    dirfd: int, name: str, *, same_as: os.stat_result | None = None, noatime: bool = False
) -> int:
    """A read descriptor of the regular file ``name`` in ``dirfd``, never following a symlink.

    ``name`` is first opened ``O_PATH`` (opening a device or FIFO put there could
    block or act), checked with fstat to be a regular file and, with ``same_as``,
    the same inode (st_dev, st_ino) as that earlier lstat; then reopened for
    reading through its descriptor. Raises Escape (``ELOOP`` for a symlink,
    ``ESTALE`` for another object) otherwise.
    """
    try:
        pfd = os.open(name, _NODE_FLAGS, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Escape(errno.ELOOP, f"{name!r} is a symlink; refusing to follow it") from None
        raise
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise Escape(errno.ESTALE, f"{name!r} is not a regular file (any more)")
        if same_as is not None and (st.st_dev, st.st_ino) != (same_as.st_dev, same_as.st_ino):
            raise Escape(errno.ESTALE, f"{name!r} was replaced while it was read")
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY
        if noatime:
            try:
                return os.open(proc_path(pfd), flags | os.O_NOATIME)
            except PermissionError:
                pass
        return os.open(proc_path(pfd), flags)
    finally:
        os.close(pfd)
