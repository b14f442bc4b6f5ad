"""A directory opened once, whose entries are reached by paths relative to its descriptor.

Union mounts keep their upper and lower trees under some base directory; the
base's own path plus a path near PATH_MAX inside the mount would exceed
PATH_MAX. Calls relative to a directory descriptor (``dir_fd=``) only need the
relative part to fit. Extended attributes have no ``*at`` call in Python: they
use the absolute path when it fits, and otherwise a descriptor of the entry
itself (directories and regular files; other kinds report ENAMETOOLONG).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

PATH_MAX = 4096  # bytes, with the terminating NUL (Linux)
_XATTR_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

T = TypeVar("T")


def _too_long(rel: str) -> OSError:
    return OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), rel)


class TreeDir:
    """The directory at ``path``, held open (O_PATH) for ``dir_fd``-relative calls.

    ``rel`` paths are relative to it, '/'-separated; ``"."`` is the directory itself.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._room = PATH_MAX - 2 - len(os.fsencode(path))  # bytes left after "path/"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def full(self, rel: str) -> str | None:
        """The absolute path of ``rel`` if it fits in PATH_MAX, else None."""
        if len(rel) * 4 <= self._room or len(os.fsencode(rel)) <= self._room:
            return f"{self.path}/{rel}"
        return None

    def lstat(self, rel: str) -> os.stat_result | None:
        """lstat of ``rel``, or None if it (or a parent) is missing."""
        try:
            return os.stat(rel, dir_fd=self.fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def lexists(self, rel: str) -> bool:
        """Whether ``rel`` exists; False on any error (as os.path.lexists), e.g. a
        ``.wh.NAME`` longer than NAME_MAX."""
        try:
            os.stat(rel, dir_fd=self.fd, follow_symlinks=False)
        except (OSError, ValueError):
            return False
        return True

    def open(self, rel: str, flags: int, mode: int = 0o777) -> int:
        return os.open(rel, flags | os.O_CLOEXEC, mode, dir_fd=self.fd)

    @contextmanager
    def scandir(self, rel: str) -> Iterator[tuple[int, Iterator[os.DirEntry]]]:
        """(directory fd, its entries) of the directory ``rel``; entry.name is relative to
        the fd, and entry.stat() works only inside the ``with``."""
        fd = self.open(rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as it:
                yield fd, it
        finally:
            os.close(fd)

    def xattr(self, op: Callable[..., T], rel: str, *args: object) -> T:
        """Run ``op`` (os.getxattr, setxattr, listxattr, removexattr) on ``rel``, not following
        a symlink at ``rel``."""
        full = self.full(rel)
        if full is not None:
            return op(full, *args, follow_symlinks=False)
        st = os.stat(rel, dir_fd=self.fd, follow_symlinks=False)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise _too_long(rel)
        fd = os.open(rel, _XATTR_OPEN, dir_fd=self.fd)
        try:
            return op(fd, *args)
        finally:
            os.close(fd)
