"""Pass setattr requests that change only one of atime and mtime on to ``utimens``.

libfuse 2's high-level API calls ``utimens`` only when the kernel sets both
times at once, so ``touch -a``, ``touch -m`` or utimensat with UTIME_OMIT
would silently change nothing. This wraps libfuse's own low-level setattr
handler: a request that sets one time is changed to set both, the other one
as UTIME_OMIT (``tv_sec`` 0), which fusepy hands to ``utimens`` as the value
UTIME_OMIT (see layerfs.fs.utimes). The ``*_NOW`` flags become UTIME_NOW.

The handler table is ``struct fuse_lowlevel_ops`` inside libfuse 2.9's
``struct fuse_ll`` (the session data), after twelve ints. It is recognised by
its first six entries (init ... setattr) all pointing into libfuse; if they do
not, nothing is changed and a warning is logged.
"""

from __future__ import annotations

import ctypes
import logging

import fuse

from layerfs.fs.utimes import UTIME_NOW, UTIME_OMIT

log = logging.getLogger(__name__)

FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
OPS_OFFSET = 12 * ctypes.sizeof(ctypes.c_int)  # struct fuse_ll starts with twelve ints
SETATTR = 5  # index of setattr in struct fuse_lowlevel_ops

SetattrFn = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(fuse.c_stat), ctypes.c_int,
    ctypes.c_void_p,
)  # fmt: skip


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _in_libfuse(libc: ctypes.CDLL, addr: int | None) -> bool:
    info = _DlInfo()
    if not addr or not libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)):
        return False
    return b"libfuse" in (info.dli_fname or b"")


def complete_times(st: fuse.c_stat, valid: int) -> int:
    """Fill ``st`` so that both times are set; return the new ``valid`` flags."""
    for now, flag, spec in (
        (FATTR_ATIME_NOW, FATTR_ATIME, st.st_atimespec),
        (FATTR_MTIME_NOW, FATTR_MTIME, st.st_mtimespec),
    ):
        if valid & now:
            spec.tv_sec, spec.tv_nsec = 0, UTIME_NOW
            valid |= flag
    both = FATTR_ATIME | FATTR_MTIME
    if valid & both and valid & both != both:
        spec = st.st_mtimespec if valid & FATTR_ATIME else st.st_atimespec
        spec.tv_sec, spec.tv_nsec = 0, UTIME_OMIT
        valid |= both
    return valid


class OneTimeSetattr:
    """Installs the wrapper around libfuse's setattr handler (call ``attach`` from init)."""

    def __init__(self) -> None:
        self._orig: SetattrFn | None = None
        self._hook: SetattrFn | None = None  # kept referenced while libfuse may call it

    def attach(self) -> bool:
        lib = fuse._libfuse
        ctx = lib.fuse_get_context()
        base = ctx.contents.fuse if ctx else None
        if not base:
            return False
        get_session = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(("fuse_get_session", lib))
        session_data = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(
            ("fuse_session_data", lib)
        )
        ll = session_data(get_session(base))
        if not ll:
            return False
        table = (ctypes.c_void_p * (SETATTR + 1)).from_address(ll + OPS_OFFSET)
        libc = ctypes.CDLL(None)
        if not all(_in_libfuse(libc, p) for p in table):
            log.warning("libfuse's setattr handler not found: one-time utimensat is ignored")
            return False
        self._orig = SetattrFn(table[SETATTR])
        self._hook = SetattrFn(self._setattr)
        table[SETATTR] = ctypes.cast(self._hook, ctypes.c_void_p).value
        return True

    def _setattr(self, req, ino, attr, valid, fi) -> None:
        try:
            valid = complete_times(attr.contents, valid)
        except Exception:  # never let an exception cross into C; libfuse answers as before
            log.exception("setattr time flags")
        self._orig(req, ino, attr, valid, fi)
