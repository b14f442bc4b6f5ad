"""fusepy's FUSE class with lean request paths for operations that answer in raw form.

fusepy decodes every path, wraps every fuse_file_info and buffer in ctypes
objects, turns every answer into ctypes fields one attribute at a time, and
calls each operation through two generic wrappers. FastFUSE builds libfuse's
operations table itself: every callback is one closure that maps OSError to
-errno, and operations may offer raw forms, which then take the request's
bytes (paths and names as libfuse passes them) and answer bytes ready to copy:

* ``raw_stat(path) -> bytes | None``: getattr, and fgetattr by path (a packed
  ``c_stat``, see layerfs.fs.attrs; None: ENOENT, the answer to every lookup
  of a new name, without an exception);
* ``raw_dirents(path)``: readdir, (name, st_ino, st_mode) triples, ino 0 for
  an entry without attributes;
* ``raw_readlink(path) -> bytes``; ``raw_read(path, size, offset) -> bytes``;
* by file handle (``fuse_file_info.fh``): ``raw_pread(fh, size, offset) ->
  bytes``, ``raw_pwrite(fh, data, offset) -> int`` (``data`` a memoryview of
  libfuse's buffer, valid during the call), ``raw_release(fh)``;
* ``raw_open(path, flags) -> (fh, keep_cache)``, ``raw_create(path, mode) -> fh``;
* ``raw_getxattr(path, name) -> bytes | None`` (None: ENODATA),
  ``raw_chmod(path, mode)``, ``raw_chown(path, uid, gid)`` (-1 leaves one
  unchanged) and ``raw_utimens(path, times)`` (None, or (atime, mtime) in
  nanoseconds as fusepy passes them with ``use_ns``; UTIME_NOW and UTIME_OMIT
  arrive as themselves).

libfuse asks for the attributes of the entry right after a create or setattr
(in the same request), so ``raw_create`` may return ``(fh, attributes)`` and
the setattr forms the attributes they leave, as ``raw_stat`` would give them:
that next getattr of the same path is then answered from them. Any other
callback first forgets them, so they never answer a later request. This needs
requests served one at a time, so it is done only in ``nothreads`` mounts.

Every other operation gets fusepy's own conversions, and flag attributes of
the operations (``flag_utime_omit_ok``, ...) are copied into the table, as
fusepy does. Errors travel as OSError (FuseOSError); any other exception is
logged and answered with EINVAL.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from collections.abc import Callable
from signal import SIG_DFL, SIGINT, signal

from fuse import (
    FUSE,
    Operations,
    c_mode_t,
    c_off_t,
    c_stat,
    fuse_exit,
    fuse_file_info,
    fuse_operations,
)
from fuse import _libfuse as libfuse

from layerfs.fs.attrs import STAT_SIZE

log = logging.getLogger(__name__)

_P = ctypes.c_char_p
_V = ctypes.c_void_p
_INT = ctypes.c_int
_UID_T = ctypes.c_uint32  # uid_t and gid_t on Linux
_FH = fuse_file_info.fh.offset
_U64 = ctypes.c_uint64
_STAT_BUF = ctypes.c_char * STAT_SIZE
# A window onto libfuse's write buffer: one ctypes type for every size (each
# `c_char * n` is a new type that ctypes keeps for good).
_WINDOW = ctypes.c_char * (1 << 24)
_NS = 1_000_000_000

# Prototypes of the raw callbacks: buffers and fuse_file_info as plain addresses.
RAW_PROTOTYPES = {
    "getattr": ctypes.CFUNCTYPE(_INT, _P, _V),
    "fgetattr": ctypes.CFUNCTYPE(_INT, _P, _V, _V),
    "read": ctypes.CFUNCTYPE(_INT, _P, _V, ctypes.c_size_t, c_off_t, _V),
    "write": ctypes.CFUNCTYPE(_INT, _P, _V, ctypes.c_size_t, c_off_t, _V),
    "release": ctypes.CFUNCTYPE(_INT, _P, _V),
    "open": ctypes.CFUNCTYPE(_INT, _P, _V),
    "create": ctypes.CFUNCTYPE(_INT, _P, c_mode_t, _V),
    "getxattr": ctypes.CFUNCTYPE(_INT, _P, _P, _V, ctypes.c_size_t),
    "chmod": ctypes.CFUNCTYPE(_INT, _P, c_mode_t),
    "chown": ctypes.CFUNCTYPE(_INT, _P, _UID_T, _UID_T),
    "utimens": ctypes.CFUNCTYPE(_INT, _P, _V),
}
# Which operation method makes a table entry raw.
RAW_METHODS = {
    "getattr": "raw_stat",
    "fgetattr": "raw_stat",
    "read": "raw_pread",
    "write": "raw_pwrite",
    "release": "raw_release",
    "open": "raw_open",
    "create": "raw_create",
    "getxattr": "raw_getxattr",
    "chmod": "raw_chmod",
    "chown": "raw_chown",
    "utimens": "raw_utimens",
}


class _Table(ctypes.Structure):
    """struct fuse_operations with every function pointer as a plain address."""

    _fields_ = [(f[0], _V) if hasattr(f[1], "argtypes") else f for f in fuse_operations._fields_]


_READS_LEFT = ("_fast_getattr", "_fast_fgetattr")  # callbacks that use what a change left


def _id_or_minus_one(value: int) -> int:
    """(uid_t) -1 means 'leave unchanged'."""
    return -1 if value == 0xFFFFFFFF else value


def _time(sec: int, nsec: int) -> int:
    """A timespec as fusepy passes it with use_ns (UTIME_NOW/OMIT come with tv_sec 0)."""
    return sec * _NS + nsec


class FastFUSE(FUSE):
    """Mount ``operations`` like fusepy's FUSE (this call serves until unmounted)."""

    def __init__(
        self,
        operations: Operations,
        mountpoint: str,
        raw_fi: bool = False,
        encoding: str = "utf-8",
        **kwargs,
    ) -> None:
        # what fusepy's own conversions (the non-raw callbacks) use
        self.operations = operations
        self.raw_fi = raw_fi
        self.encoding = encoding
        self.use_ns = getattr(operations, "use_ns", False)
        self._critical: BaseException | None = None
        self._callbacks: list = []  # referenced while libfuse may call them
        self._left: tuple[bytes, bytes] | None = None  # (path, attributes) a change left
        self._keeps_left = bool(kwargs.get("nothreads"))  # one request at a time

        def raw(name: str) -> Callable | None:
            return getattr(operations, name, None)

        self._raw_stat: Callable[[bytes], bytes | None] | None = raw("raw_stat")
        self._raw_dirents: Callable | None = raw("raw_dirents")
        self._raw_readlink: Callable[[bytes], bytes] | None = raw("raw_readlink")
        self._raw_read: Callable[[bytes, int, int], bytes] | None = raw("raw_read")
        self._raw_pread: Callable[[int, int, int], bytes] | None = raw("raw_pread")
        self._raw_pwrite: Callable[[int, memoryview, int], int] | None = raw("raw_pwrite")
        self._raw_release: Callable[[int], None] | None = raw("raw_release")
        self._raw_open: Callable[[bytes, int], tuple[int, bool]] | None = raw("raw_open")
        self._raw_create: Callable[[bytes, int], int | tuple[int, bytes]] | None = raw("raw_create")
        self._raw_getxattr: Callable[[bytes, bytes], bytes | None] | None = raw("raw_getxattr")
        self._raw_chmod: Callable[[bytes, int], bytes | None] | None = raw("raw_chmod")
        self._raw_chown: Callable[[bytes, int, int], bytes | None] | None = raw("raw_chown")
        self._raw_utimens: Callable | None = raw("raw_utimens")

        args = ["fuse", *(flag for arg, flag in self.OPTIONS if kwargs.pop(arg, False))]
        kwargs.setdefault("fsname", operations.__class__.__name__)
        args += ["-o", ",".join(self._normalize_fuse_options(**kwargs)), mountpoint]
        argv_items = [arg.encode(encoding) for arg in args]
        argv = (ctypes.c_char_p * len(argv_items))(*argv_items)
        table = self._table(operations)
        try:
            old_handler = signal(SIGINT, SIG_DFL)
        except ValueError:  # not the main thread
            old_handler = None
        try:
            err = libfuse.fuse_main_real(
                len(argv_items), argv, ctypes.pointer(table), ctypes.sizeof(table), None
            )
        finally:
            if old_handler is not None:
                signal(SIGINT, old_handler)
        del self.operations  # as fusepy: let the operations go
        if self._critical is not None:
            raise self._critical
        if err:
            raise RuntimeError(err)

    # -- the operations table --------------------------------------------------------
    def _table(self, operations: Operations) -> _Table:
        table = _Table()
        for field in fuse_operations._fields_:
            name, prototype = field[:2]
            method = name[1:] if name in ("ftruncate", "fgetattr") else name
            value = getattr(operations, method, None)
            if value is None:
                continue
            if not hasattr(prototype, "argtypes"):
                setattr(table, name, value)  # a flag
                continue
            raw_name = RAW_METHODS.get(name)
            if name == "read" and self._raw_pread is None:
                raw_name = "raw_read"
            if raw_name is not None and getattr(operations, raw_name, None) is not None:
                prototype = RAW_PROTOTYPES[name]
                handler = getattr(self, f"_fast_{name}")
            else:
                handler = getattr(self, name)
            if name == "init":
                guard = self._init_guard(handler)
            else:
                guard = self._guard(handler, forgets=handler.__name__ not in _READS_LEFT)
            callback = prototype(guard)
            self._callbacks.append(callback)
            setattr(table, name, ctypes.cast(callback, _V).value)
        return table

    def _guard(self, handler: Callable[..., int | None], forgets: bool) -> Callable[..., int]:
        """``handler`` as a libfuse callback: 0 or a count, or -errno. Unless it reads
        them itself, the callback first forgets the attributes a change left."""
        name = handler.__name__

        def callback(*args) -> int:
            if forgets:
                self._left = None
            try:
                return handler(*args) or 0
            except OSError as exc:
                if exc.errno and exc.errno > 0:
                    return -exc.errno
                log.error("FUSE operation %s raised %r, answering EINVAL", name, exc)
                return -errno.EINVAL
            except Exception:
                log.exception("FUSE operation %s failed, answering EINVAL", name)
                return -errno.EINVAL
            except BaseException as exc:  # stop serving; raised again by __init__
                self._critical = exc
                fuse_exit()
                return -errno.EFAULT

        return callback

    def _init_guard(self, handler: Callable[..., int | None]) -> Callable[..., int]:
        def callback(*args) -> int:
            try:
                handler(*args)
            except BaseException as exc:  # init cannot fail: stop serving
                log.exception("FUSE init failed")
                self._critical = exc
                fuse_exit()
            return 0

        return callback

    # -- raw callbacks (prototypes in RAW_PROTOTYPES) ---------------------------------
    def _fast_getattr(self, path: bytes, buf: int) -> int:
        left, self._left = self._left, None
        attrs = left[1] if left is not None and left[0] == path else self._raw_stat(path)
        if attrs is None:
            return -errno.ENOENT
        _STAT_BUF.from_address(buf).raw = attrs
        return 0

    def _fast_fgetattr(self, path: bytes | None, buf: int, fip: int) -> int:
        if path is None:  # libfuse passes a path unless the mount sets nullpath_ok
            return -errno.ENOENT
        return self._fast_getattr(path, buf)

    def _fast_read(self, path: bytes | None, buf: int, size: int, offset: int, fip: int) -> int:
        if self._raw_pread is not None:
            data = self._raw_pread(_U64.from_address(fip + _FH).value, size, offset)
        elif path is not None:
            data = self._raw_read(path, size, offset)
        else:
            return -errno.ENOENT
        n = len(data)
        if n:
            ctypes.memmove(buf, data, n)
        return n

    def _fast_write(self, path: bytes | None, buf: int, size: int, offset: int, fip: int) -> int:
        if size > ctypes.sizeof(_WINDOW):
            return -errno.EINVAL
        data = memoryview(_WINDOW.from_address(buf))[:size]
        return self._raw_pwrite(_U64.from_address(fip + _FH).value, data, offset)

    def _fast_release(self, path: bytes | None, fip: int) -> int:
        self._raw_release(_U64.from_address(fip + _FH).value)
        return 0

    def _fast_open(self, path: bytes, fip: int) -> int:
        fi = fuse_file_info.from_address(fip)
        fh, keep_cache = self._raw_open(path, fi.flags)
        fi.fh = fh
        if keep_cache:
            fi.keep_cache = 1
        return 0

    def _fast_create(self, path: bytes, mode: int, fip: int) -> int:
        made = self._raw_create(path, mode)
        if isinstance(made, tuple):
            made, attrs = made
            self._leave(path, attrs)
        _U64.from_address(fip + _FH).value = made
        return 0

    def _fast_getxattr(self, path: bytes, name: bytes, value: int | None, size: int) -> int:
        data = self._raw_getxattr(path, name)
        if data is None:
            return -errno.ENODATA
        n = len(data)
        if not value:  # a size query
            return n
        if n > size:
            return -errno.ERANGE
        ctypes.memmove(value, data, n)
        return n

    def _fast_chmod(self, path: bytes, mode: int) -> int:
        self._leave(path, self._raw_chmod(path, mode))
        return 0

    def _fast_chown(self, path: bytes, uid: int, gid: int) -> int:
        self._leave(path, self._raw_chown(path, _id_or_minus_one(uid), _id_or_minus_one(gid)))
        return 0

    def _fast_utimens(self, path: bytes, times: int | None) -> int:
        if times:
            t = (ctypes.c_long * 4).from_address(times)  # two struct timespec (Linux, 64-bit)
            attrs = self._raw_utimens(path, (_time(t[0], t[1]), _time(t[2], t[3])))
        else:
            attrs = self._raw_utimens(path, None)
        self._leave(path, attrs)
        return 0

    def _leave(self, path: bytes, attrs: bytes | None) -> None:
        if attrs is not None and self._keeps_left:
            self._left = (path, attrs)

    # -- fusepy-typed callbacks with raw answers --------------------------------------
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
