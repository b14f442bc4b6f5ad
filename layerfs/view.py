"""The read-only tree a union filesystem shows, whatever it comes from.

A *view* answers lookups by path and reads content. Two kinds exist:
an image index (the merged layers of an imported image, see layerfs.index) and
a stack of plain directories with overlayfs whiteout conventions (see
layerfs.dirstack). The FUSE layer (layerfs.fs) only talks to this interface,
so a writable mount works the same over either.

Paths are relative and '/'-separated; the root is ''.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class View(Protocol):
    """A read-only tree: lookups by path, directory listings, content, xattrs."""

    def lookup(self, path: str) -> Node | None:
        """The node at ``path``, or None if there is none."""

    def listdir(self, path: str) -> list[str]:
        """Names of the children of the directory at ``path`` (no '.' or '..')."""

    def read(self, node: Node, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of a regular file's content at ``offset``."""

    def xattrs(self, node: Node) -> dict[str, bytes]:
        """Extended attributes of a node."""

    def statfs(self) -> FsStats:
        """Totals of the view for statfs(2)."""
