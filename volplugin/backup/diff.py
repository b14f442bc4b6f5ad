"""What changed between two snapshots: added, removed and modified paths."""

from __future__ import annotations

from dataclasses import dataclass

from layerfs.records import Entry, Kind

ADDED = "+"
REMOVED = "-"
MODIFIED = "M"


@dataclass(frozen=True, slots=True)
class Change:
    """One changed path; ``what`` lists the changed aspects of a modified entry."""

    change: str
    path: str
    what: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"change": self.change, "path": self.path, "what": list(self.what)}

    def __str__(self) -> str:
        suffix = f"  ({', '.join(self.what)})" if self.what else ""
        return f"{self.change} {self.path or '/'}{suffix}"


def _content(entry: Entry, tree: dict[str, Entry]) -> object:
    """What a file holds; a hardlink holds what its target holds."""
    if entry.kind is Kind.HARDLINK:
        target = tree.get(entry.target)
        if target is None or target.kind is not Kind.FILE:
            return ("missing", entry.target)
        entry = target
    if entry.inline is not None:
        return ("i", entry.inline)
    return ("c", tuple(ref.digest for ref in entry.chunks))


def compare(
    a: Entry, b: Entry, tree_a: dict[str, Entry], tree_b: dict[str, Entry]
) -> tuple[str, ...]:
    """The aspects in which two entries of the same path differ."""
    what = []
    if a.kind is Kind.HARDLINK or b.kind is Kind.HARDLINK:
        regular = {Kind.FILE, Kind.HARDLINK}
        if not (a.kind in regular and b.kind in regular):
            return ("type",)
    elif a.kind != b.kind:
        return ("type",)
    if a.kind in (Kind.FILE, Kind.HARDLINK) and _content(a, tree_a) != _content(b, tree_b):
        what.append("content")
    if a.target != b.target and Kind.HARDLINK not in (a.kind, b.kind):
        what.append("target")
    if a.mode != b.mode:
        what.append("mode")
    if (a.uid, a.gid) != (b.uid, b.gid):
        what.append("owner")
    if a.rdev != b.rdev:
        what.append("device")
    if a.xattrs != b.xattrs:
        what.append("xattrs")
    # A directory's mtime only reflects its children, which are listed themselves.
    if a.mtime_ns != b.mtime_ns and a.kind is not Kind.DIR:
        what.append("mtime")
    return tuple(what)


def diff_entries(old: list[Entry], new: list[Entry]) -> list[Change]:
    """Changes from ``old`` to ``new``, sorted by path."""
    before = {e.path: e for e in old}
    after = {e.path: e for e in new}
    changes = []
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path), after.get(path)
        if a is None:
            changes.append(Change(ADDED, path))
        elif b is None:
            changes.append(Change(REMOVED, path))
        else:
            what = compare(a, b, before, after)
            if what:
                changes.append(Change(MODIFIED, path, what))
    return changes
