"""What stat(2), statfs(2) and readdir show for view nodes, as the dicts fusepy expects.

Times are in nanoseconds (operations set ``use_ns = True``). A node's atime and
ctime are its mtime: an image has no other times to show.
"""

from __future__ import annotations

import os

from layerfs.view import FsStats, Node

BLOCK = 512  # st_blocks unit


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
        "st_blksize": 4096,
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
