"""Per-answer attribute timeouts for libfuse 2's high-level API, in single-threaded mounts.

libfuse 2 answers every LOOKUP, GETATTR, SETATTR and create with one global
``attr_timeout``. A writable mount needs 0 for files with several names: the
path-based API gives each name its own kernel inode, so the cached attributes
of one name would go stale when the file changes through another (a file that
gains a second name has its cached attributes dropped, see
layerfs.fs.lowlevel). Caching directories' attributes saves one GETATTR per
path component of every system call (the kernel checks permissions with fresh
attributes); caching those of files saves the GETATTRs around every setattr.

libfuse reads the timeout from its configuration right after the operation's
getattr returns, in the same request. In a single-threaded mount no other
request runs in between, so getattr may set the value for its own answer.
The configuration (``struct fuse_config`` inside libfuse's ``struct fuse``)
is found at init by the timeouts given at mount time: entry_timeout, then the
marker value MARKER as negative_timeout, then attr_timeout 0. Once found, the
marker is replaced by the negative timeout wanted (how long the kernel may
remember that a name does not exist). If it is not found, nothing is changed:
every answer keeps attr_timeout 0, and absent names are not remembered.
"""

from __future__ import annotations

import ctypes
import logging

import fuse

log = logging.getLogger(__name__)

MARKER = 0.000123  # negative_timeout given at mount time, replaced once found
SCAN_BYTES = 512  # struct fuse_config starts ~150 bytes into struct fuse in libfuse 2.9
_D = ctypes.sizeof(ctypes.c_double)


def mount_options(entry_timeout: float) -> dict[str, float]:
    """The fusepy options that let ``AttrTimeout.attach`` find the configuration."""
    return {"entry_timeout": entry_timeout, "negative_timeout": MARKER, "attr_timeout": 0.0}


class AttrTimeout:
    """Sets libfuse's attr_timeout for the answer being built (see the module doc)."""

    def __init__(self, entry_timeout: float, cached: float, negative: float = 0.0) -> None:
        self.entry_timeout = entry_timeout
        self.cached = cached  # seconds for attributes the caller says may be cached
        self.negative = negative  # seconds the kernel may remember a name is absent
        self._attr: ctypes.c_double | None = None
        self._current = 0.0

    @property
    def active(self) -> bool:
        return self._attr is not None

    def attach(self) -> bool:
        """Find the configuration of the calling mount (call from init); return success."""
        ctx = fuse._libfuse.fuse_get_context()
        base = ctx.contents.fuse if ctx else None
        if not base:
            return False
        for off in range(0, SCAN_BYTES - 2 * _D, _D):
            entry = ctypes.c_double.from_address(base + off)
            negative = ctypes.c_double.from_address(base + off + _D)
            attr = ctypes.c_double.from_address(base + off + 2 * _D)
            if (entry.value, negative.value, attr.value) == (self.entry_timeout, MARKER, 0.0):
                negative.value = self.negative
                self._attr = attr
                return True
        log.warning("libfuse's attr_timeout not found: attributes are not cached")
        return False

    def answer(self, cacheable: bool) -> None:
        """Use ``cached`` seconds for this answer if ``cacheable``, else 0."""
        if self._attr is None:
            return
        value = self.cached if cacheable else 0.0
        if value != self._current:
            self._attr.value = value
            self._current = value
