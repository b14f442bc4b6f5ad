"""Records of the read-only tree an image view shows: a node and the totals statfs reports.

An image index (layerfs.index) answers with these; the image view
(layerfs.fs.imageview) turns them into what the kernel asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerfs.records import Kind


@dataclass(slots=True)
class Node:
    """One entry of a view, with the attributes stat(2) shows."""

    ino: int
    kind: Kind  # never HARDLINK, WHITEOUT or OPAQUE: links share one ino instead
    mode: int  # permission bits only
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    rdev: tuple[int, int] = (0, 0)
    target: str = ""  # symlink target
    key: object = None  # the view's own handle for content and xattrs

    @property
    def st_mode(self) -> int:
        from layerfs.records import Entry

        return Entry("", self.kind, self.mode).st_mode


@dataclass(slots=True)
class FsStats:
    """Figures statfs(2) reports for a view."""

    blocks: int  # in units of bsize
    files: int
    bsize: int = 4096
    namemax: int = 255
