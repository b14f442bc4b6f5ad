"""Asking ext4 to place a directory's new subdirectories away from it (chattr +T).

On ext4 without a journal, creating a file scans past every inode of its block
group that was freed in the last minutes; right after a large delete (a store
removed and re-created, a gc) that makes each create slow. A directory with the
"top directory" flag has its subdirectories spread over groups with many free
inodes, so a fresh per-writer temp directory lands in a quiet group and the
files created in it are cheap. Elsewhere the flag is unknown or ignored, so
this is best effort and never fails.
"""

from __future__ import annotations

import fcntl
import os
import struct
from contextlib import suppress

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_TOPDIR_FL = 0x00020000


def spread_subdirs(path: str | os.PathLike[str]) -> bool:
    """Set the ext4 top-directory flag on ``path``; return whether it is set."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        with suppress(OSError):
            (flags,) = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))
            if not flags & FS_TOPDIR_FL:
                fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | FS_TOPDIR_FL))
            return True
        return False
    finally:
        os.close(fd)
