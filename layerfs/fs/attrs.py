"""What stat(2), statfs(2) and readdir show for view nodes, as fusepy dicts or packed structs.

Times are in nanoseconds (operations set ``use_ns = True``). A node's atime and
ctime are its mtime: an image has no other times to show. ``pack_stat`` gives
the same attributes as the bytes of fusepy's ``c_stat``, ready to copy into the
buffer libfuse passes to getattr (see layerfs.fs.fastfuse); ``pack_os_stat``
does the same for an ``os.stat_result`` (files of a writable mount's upper tree).
"""

from __future__ import annotations

import ctypes
import operator
import os
import struct

from fuse import c_stat

from layerfs.records import S_IFMT_OF
from layerfs.view import FsStats, Node

BLOCK = 512  # st_blocks unit
BLKSIZE = 4096
STAT_SIZE = ctypes.sizeof(c_stat)


def stat_of(node: Node) -> dict[str, int]:
    """The fusepy getattr dict of a node."""
    return {
        "st_ino": node.ino,
        "st_mode": node.st_mode,
        "st_nlink": node.nlink,
        "st_uid": node.uid,
        "st_gid": node.gid,
        "st_size": node.size,
        "st_blocks": -(-node.size // BLOCK),
        "st_blksize": BLKSIZE,
        "st_rdev": os.makedev(*node.rdev),
        "st_atime": node.mtime_ns,
        "st_mtime": node.mtime_ns,
        "st_ctime": node.mtime_ns,
    }


def dirent_of(node: Node) -> dict[str, int]:
    """The part of a stat dict readdir passes on (inode number and file type)."""
    return {"st_ino": node.ino, "st_mode": node.st_mode}


def statfs_of(stats: FsStats) -> dict[str, int]:
    """The fusepy statfs dict of a read-only view: nothing free."""
    return {
        "f_bsize": stats.bsize,
        "f_frsize": stats.bsize,
        "f_blocks": stats.blocks,
        "f_bfree": 0,
        "f_bavail": 0,
        "f_files": stats.files,
        "f_ffree": 0,
        "f_favail": 0,
        "f_namemax": stats.namemax,
    }


# -- packed struct stat ----------------------------------------------------------------

_PACKED_FIELDS = (
    "st_ino",
    "st_mode",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_rdev",
    "st_size",
    "st_blksize",
    "st_blocks",
    "st_atimespec.tv_sec",
    "st_atimespec.tv_nsec",
    "st_mtimespec.tv_sec",
    "st_mtimespec.tv_nsec",
    "st_ctimespec.tv_sec",
    "st_ctimespec.tv_nsec",
)


def _field_layout(name: str) -> tuple[int, str]:
    """Offset and struct code of a (possibly nested) c_stat field."""
    owner: type = c_stat
    offset = 0
    for part in name.split("."):
        descriptor = getattr(owner, part)
        offset += descriptor.offset
        owner = dict((f[0], f[1]) for f in owner._fields_)[part]
    size = ctypes.sizeof(owner)
    signed = owner._type_.islower()  # ctypes codes: lower case signed, upper case unsigned
    code = {8: "q", 4: "i", 2: "h", 1: "b"}[size]
    return offset, code if signed else code.upper()


def _stat_struct() -> tuple[struct.Struct, tuple[str, ...]]:
    """A struct writing _PACKED_FIELDS at their c_stat offsets (zeros elsewhere), and its order."""
    fields = sorted((*_field_layout(name), name) for name in _PACKED_FIELDS)
    fmt = "="
    pos = 0
    for offset, code, _name in fields:
        fmt += f"{offset - pos}x" if offset > pos else ""
        fmt += code
        pos = offset + struct.calcsize("=" + code)
    fmt += f"{STAT_SIZE - pos}x" if pos < STAT_SIZE else ""
    return struct.Struct(fmt), tuple(name for _offset, _code, name in fields)


_STAT, _ORDER = _stat_struct()


def pack_stat(node: Node) -> bytes:
    """The node's attributes as the bytes of a fusepy c_stat."""
    sec, nsec = divmod(node.mtime_ns, 1_000_000_000)
    values = {
        "st_ino": node.ino,
        "st_mode": S_IFMT_OF.get(node.kind, 0) | node.mode,
        "st_nlink": node.nlink,
        "st_uid": node.uid,
        "st_gid": node.gid,
        "st_rdev": os.makedev(*node.rdev) if node.rdev != (0, 0) else 0,
        "st_size": node.size,
        "st_blksize": BLKSIZE,
        "st_blocks": -(-node.size // BLOCK),
        "st_atimespec.tv_sec": sec,
        "st_atimespec.tv_nsec": nsec,
        "st_mtimespec.tv_sec": sec,
        "st_mtimespec.tv_nsec": nsec,
        "st_ctimespec.tv_sec": sec,
        "st_ctimespec.tv_nsec": nsec,
    }
    return _STAT.pack(*(values[name] for name in _ORDER))


_TO_MEMORY = operator.itemgetter(*(_PACKED_FIELDS.index(name) for name in _ORDER))
_NS = 1_000_000_000


def pack_os_stat(st: os.stat_result, ino: int, blocks: int) -> bytes:
    """``st`` as the bytes of a fusepy c_stat, with inode number ``ino`` and ``blocks``."""
    asec, ansec = divmod(st.st_atime_ns, _NS)
    msec, mnsec = divmod(st.st_mtime_ns, _NS)
    csec, cnsec = divmod(st.st_ctime_ns, _NS)
    values = (  # in _PACKED_FIELDS order
        ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
        st.st_blksize, blocks, asec, ansec, msec, mnsec, csec, cnsec,
    )  # fmt: skip
    return _STAT.pack(*_TO_MEMORY(values))
