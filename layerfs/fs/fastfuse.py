"""fusepy's FUSE class with lean getattr, readdir, readlink and read for operations that offer them.

fusepy turns every answer into ctypes fields one Python attribute at a time
and decodes every path. Operations that define ``raw_stat``, ``raw_dirents``,
``raw_readlink`` or ``raw_read`` (see layerfs.fs.readonly) take the path as the
bytes libfuse passes and answer with bytes ready to copy, so each call is one
lookup and one memmove. Errors still travel as FuseOSError through fusepy's
wrapper, which turns them into -errno. Operations without these methods get
fusepy's usual behaviour.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from fuse import FUSE, Operations, c_stat

from layerfs.fs.attrs import STAT_SIZE


class FastFUSE(FUSE):
    """Mount ``operations`` like fusepy's FUSE (this call serves until unmounted)."""

    def __init__(self, operations: Operations, mountpoint: str, **kwargs) -> None:
        self._raw_stat: Callable[[bytes], bytes] | None = getattr(operations, "raw_stat", None)
        self._raw_dirents: Callable | None = getattr(operations, "raw_dirents", None)
        self._raw_readlink: Callable[[bytes], bytes] | None = getattr(
            operations, "raw_readlink", None
        )
        self._raw_read: Callable[[bytes, int, int], bytes] | None = getattr(
            operations, "raw_read", None
        )
        super().__init__(operations, mountpoint, **kwargs)

    def getattr(self, path: bytes, buf) -> int:  # type: ignore[override]
        if self._raw_stat is None:
            return super().getattr(path, buf)
        ctypes.memmove(buf, self._raw_stat(path), STAT_SIZE)
        return 0

    def readdir(self, path: bytes, buf, filler, offset: int, fip) -> int:  # type: ignore[override]
        if self._raw_dirents is None:
            return super().readdir(path, buf, filler, offset, fip)
        st = c_stat()  # filler copies what it needs (inode number and type)
        for name, ino, mode in self._raw_dirents(path):
            if ino:
                st.st_ino = ino
                st.st_mode = mode
                if filler(buf, name, st, 0) != 0:
                    break
            elif filler(buf, name, None, 0) != 0:
                break
        return 0

    def readlink(self, path: bytes, buf, bufsize: int) -> int:  # type: ignore[override]
        if self._raw_readlink is None:
            return super().readlink(path, buf, bufsize)
        target = self._raw_readlink(path)[: bufsize - 1] + b"\0"
        ctypes.memmove(buf, target, len(target))
        return 0

    def read(self, path: bytes, buf, size: int, offset: int, fip) -> int:  # type: ignore[override]
        if self._raw_read is None:
            return super().read(path, buf, size, offset, fip)
        data = self._raw_read(path, size, offset)
        n = len(data)
        if n:
            ctypes.memmove(buf, data, n)
        return n
