"""Snapshots of a directory tree as comparable records, for checking a mount against the daemon.

A snapshot maps each relative path to what stat, readlink, the content and the
xattrs show, plus the hardlink groups (paths of regular files sharing an inode).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Item:
    """What one path shows; ``digest`` is the sha256 of a regular file's content."""

    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    rdev: tuple[int, int]
    target: str
    digest: str
    xattrs: tuple[tuple[str, bytes], ...]


_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


@dataclass
class Snapshot:
    items: dict[str, Item]
    links: set[frozenset[str]]  # groups of paths of one regular-file inode (2 or more)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    names = os.listxattr(path, follow_symlinks=False)
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def item_of(path: Path) -> Item:
    st = os.lstat(path)
    kind = _TYPES[stat.S_IFMT(st.st_mode)]
    special = kind in ("char", "block")
    return Item(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind in ("file", "symlink") else 0,
        mtime_ns=st.st_mtime_ns,
        nlink=st.st_nlink if kind == "file" else 0,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if special else (0, 0),
        target=os.readlink(path) if kind == "symlink" else "",
        digest=_digest(path) if kind == "file" else "",
        xattrs=_xattrs(path),
    )


def snapshot(root: Path) -> Snapshot:
    """Walk ``root`` (not following symlinks); paths are relative, the root is ''."""
    items: dict[str, Item] = {}
    inodes: dict[int, list[str]] = {}
    pending = [Path(root)]
    while pending:
        current = pending.pop()
        rel = os.path.relpath(current, root)
        rel = "" if rel == "." else rel
        items[rel] = item = item_of(current)
        if item.type == "dir":
            pending.extend(current / name for name in os.listdir(current))
        elif item.type == "file":
            inodes.setdefault(os.lstat(current).st_ino, []).append(rel)
    links = {frozenset(paths) for paths in inodes.values() if len(paths) > 1}
    return Snapshot(items, links)


def differences(expected: Snapshot, actual: Snapshot, limit: int = 40) -> list[str]:
    """Human-readable differences between two snapshots (empty when they match)."""
    out = []
    for path in sorted(expected.items.keys() | actual.items.keys()):
        want, got = expected.items.get(path), actual.items.get(path)
        if want is None or got is None:
            out.append(f"{path!r}: expected {want}, got {got}")
        elif want != got:
            fields = [
                f"{k} {getattr(want, k)!r} != {getattr(got, k)!r}"
                for k in want.__dataclass_fields__
                if getattr(want, k) != getattr(got, k)
            ]
            out.append(f"{path!r}: " + "; ".join(fields))
    if expected.links != actual.links:
        out.append(f"hardlink groups: expected {expected.links}, got {actual.links}")
    return out[:limit]
