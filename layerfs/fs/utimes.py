"""Setting file times as libfuse asks: utimensat(2) with UTIME_NOW and UTIME_OMIT.

libfuse 2 passes a setattr that changes only one time (``touch -a``,
utimensat with UTIME_OMIT) as two timespecs whose other ``tv_nsec`` is
UTIME_OMIT (or UTIME_NOW), which fusepy folds into one nanosecond count.
os.utime cannot leave one time unchanged, so this calls utimensat itself.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100
_SPECIAL = (UTIME_NOW, UTIME_OMIT)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load() -> Callable[..., int]:
    fn = ctypes.CDLL(None, use_errno=True).utimensat
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_UTIMENSAT = _load()


def timespec_of(ns: int) -> tuple[int, int]:
    """(tv_sec, tv_nsec) of a time as fusepy passes it (``sec * 10**9 + nsec``).

    UTIME_NOW and UTIME_OMIT come with tv_sec 0, so they arrive as themselves.
    """
    if ns in _SPECIAL:
        return 0, ns
    return divmod(ns, 1_000_000_000)


def utimens_at(dir_fd: int, rel: str, times: tuple[int, int] | None) -> None:
    """Set the access and modification times of ``rel`` (not following a symlink).

    ``times`` is (atime, mtime) as fusepy passes them; None means both now.
    """
    spec = (_Timespec * 2)()
    for i, ns in enumerate(times if times is not None else (UTIME_NOW, UTIME_NOW)):
        spec[i].tv_sec, spec[i].tv_nsec = timespec_of(int(ns))
    if _UTIMENSAT(dir_fd, os.fsencode(rel), spec, AT_SYMLINK_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
