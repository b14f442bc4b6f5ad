"""Drop the kernel's cached attributes of a file before libfuse 2 gives it a second name.

libfuse 2's high-level API gives every name its own kernel inode, so when
``link`` makes a second name, the first name's inode keeps the attributes the
kernel cached for it (link count 1, and later sizes and times written through
the new name). A writable mount caches the attributes of files with one name
(layerfs.fs.attrtimeout), so it wraps libfuse's own low-level link handler: the
wrapper sends FUSE_NOTIFY_INVAL_INODE for the linked inode, then lets libfuse
handle the request. The mount serves one request at a time, so no attributes
can be fetched between the notification and the reply; from then on the file
has two names and its attributes are not cached.

The handler table is ``struct fuse_lowlevel_ops`` inside libfuse 2.9's
``struct fuse_ll`` (the session data), after twelve ints. It is recognised by
its first entries (init ... link) all pointing into libfuse; if they do not,
nothing is changed and ``attach`` says so (the caller then caches no file
attributes).
"""

from __future__ import annotations

import ctypes
import logging

import fuse

log = logging.getLogger(__name__)

OPS_OFFSET = 12 * ctypes.sizeof(ctypes.c_int)  # struct fuse_ll starts with twelve ints
LINK = 13  # index of link in struct fuse_lowlevel_ops (init, destroy, lookup, ...)
NO_PAGES = -1  # offset for notify_inval_inode: attributes only, cached pages stay

LinkFn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p)
_VoidpFn = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
_NextChanFn = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_InvalInodeFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64
)


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


class LinkInvalidation:
    """Installs the wrapper around libfuse's link handler (call ``attach`` from init)."""

    def __init__(self) -> None:
        self._orig: LinkFn | None = None
        self._hook: LinkFn | None = None  # kept referenced while libfuse may call it
        self._chan: int | None = None
        self._inval: _InvalInodeFn | None = None

    @property
    def active(self) -> bool:
        return self._hook is not None

    def attach(self) -> bool:
        """Wrap the link handler of the calling mount; return whether it was found."""
        lib = fuse._libfuse
        ctx = lib.fuse_get_context()
        base = ctx.contents.fuse if ctx else None
        if not base:
            return False
        session = _VoidpFn(("fuse_get_session", lib))(base)
        ll = _VoidpFn(("fuse_session_data", lib))(session) if session else None
        chan = _NextChanFn(("fuse_session_next_chan", lib))(session, None) if session else None
        if not ll or not chan:
            log.warning("libfuse's session not found: file attributes are not cached")
            return False
        table = (ctypes.c_void_p * (LINK + 1)).from_address(ll + OPS_OFFSET)
        libc = ctypes.CDLL(None)
        if not all(_in_libfuse(libc, p) for p in table):
            log.warning("libfuse's link handler not found: file attributes are not cached")
            return False
        self._chan = chan
        self._inval = _InvalInodeFn(("fuse_lowlevel_notify_inval_inode", lib))
        self._orig = LinkFn(table[LINK])
        self._hook = LinkFn(self._link)
        table[LINK] = ctypes.cast(self._hook, ctypes.c_void_p).value
        return True

    def _link(self, req, ino, newparent, newname) -> None:
        try:
            err = self._inval(self._chan, ino, NO_PAGES, 0)
            if err not in (0, -2):  # -ENOENT: the kernel no longer has the inode
                log.warning("invalidating the attributes of inode %d failed: %d", ino, err)
        except Exception:  # never let an exception cross into C; libfuse answers as before
            log.exception("link: invalidating attributes")
        self._orig(req, ino, newparent, newname)
