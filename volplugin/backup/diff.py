"""What changed between two snapshots: added, removed and modified paths."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from layerfs.records import (
    BadTree,
    Entry,
    Kind,
    dir_tree_root,
    find_entry,
    get_tree,
    iter_below,
    node_entries,
)
from layerfs.store.chunks import ChunkStore

Resolve = Callable[[str], Entry | None]  # the entry at a path of one snapshot

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


def _content(entry: Entry, resolve: Resolve) -> object:
    """What a file holds; a hardlink holds what its target holds."""
    if entry.kind is Kind.HARDLINK:
        target = resolve(entry.target)
        if target is None or target.kind is not Kind.FILE:
            return ("missing", entry.target)
        entry = target
    if entry.inline is not None:
        return ("i", entry.inline)
    return ("c", tuple(ref.digest for ref in entry.chunks))


def compare(a: Entry, b: Entry, resolve_a: Resolve, resolve_b: Resolve) -> tuple[str, ...]:
    """The aspects in which two entries of the same path differ."""
    what = []
    if a.kind is Kind.HARDLINK or b.kind is Kind.HARDLINK:
        regular = {Kind.FILE, Kind.HARDLINK}
        if not (a.kind in regular and b.kind in regular):
            return ("type",)
    elif a.kind != b.kind:
        return ("type",)
    if a.kind in (Kind.FILE, Kind.HARDLINK) and _content(a, resolve_a) != _content(b, resolve_b):
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
            what = compare(a, b, before.get, after.get)
            if what:
                changes.append(Change(MODIFIED, path, what))
    return changes


def diff_trees(store: ChunkStore, old: str, new: str) -> list[Change]:
    """Changes from tree ``old`` to tree ``new``, sorted by path.

    Directory trees are compared one pair of nodes at a time, so memory follows
    the directories being compared, not the snapshots' size. Below a directory
    whose node is the same in both, only hard links can differ (through a target
    elsewhere): that subtree is read once, for them. Flat trees are read whole.
    """
    try:
        roots = dir_tree_root(store, old), dir_tree_root(store, new)
    except BadTree:
        return diff_entries(get_tree(store, old)[0], get_tree(store, new)[0])
    resolve_a = functools.lru_cache(maxsize=1024)(functools.partial(find_entry, store, old))
    resolve_b = functools.lru_cache(maxsize=1024)(functools.partial(find_entry, store, new))
    changes: list[Change] = []

    def both(a: Entry | None, b: Entry | None) -> None:
        if a is None and b is not None:
            changes.append(Change(ADDED, b.path))
        elif b is None and a is not None:
            changes.append(Change(REMOVED, a.path))
        elif a is not None and b is not None and (what := compare(a, b, resolve_a, resolve_b)):
            changes.append(Change(MODIFIED, a.path, what))

    def below(node: str, folder: str, change: str) -> None:
        changes.extend(Change(change, e.path) for e in iter_below(store, node, folder))

    both(resolve_a(""), resolve_b(""))
    stack: list[tuple[str | None, str | None, str]] = [(roots[0], roots[1], "")]
    while stack:
        node_a, node_b, folder = stack.pop()
        if node_a == node_b:
            if node_a is not None:  # hard links below may name changed targets
                for e in iter_below(store, node_a, folder):
                    if e.kind is Kind.HARDLINK:
                        both(e, e)
            continue
        if node_b is None:
            below(node_a, folder, REMOVED)  # type: ignore[arg-type]
            continue
        if node_a is None:
            below(node_b, folder, ADDED)
            continue
        items_a = {e.name: (e, child) for e, child in node_entries(store, node_a, folder)}
        items_b = {e.name: (e, child) for e, child in node_entries(store, node_b, folder)}
        for name in items_a.keys() | items_b.keys():
            a, child_a = items_a.get(name, (None, None))
            b, child_b = items_b.get(name, (None, None))
            both(a, b)
            if child_a is not None or child_b is not None:
                stack.append((child_a, child_b, (a or b).path))  # type: ignore[union-attr]
    changes.sort(key=lambda c: c.path)
    return changes
