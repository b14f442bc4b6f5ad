"""Marking: walk every root's tree records and put each referenced digest in the live set.

A tree's own records (a directory tree's nodes) are marked with the chunks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from layerfs.errors import ObjectMissing, StoreError
from layerfs.maintenance.liveset import DigestSets
from layerfs.maintenance.roots import Root
from layerfs.records import Entry, read_tree
from layerfs.store.chunks import ChunkStore


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A tree record that could not be loaded while marking."""

    digest: str
    owner: str
    reason: str
    missing: bool = False


def mark_roots(store: ChunkStore, roots: Iterable[Root], sets: DigestSets) -> list[Unreadable]:
    """Mark every tree, chunk and direct object the roots reference.

    Returns the tree records that could not be read; their chunks stay unmarked,
    so callers that delete garbage must stop when this list is not empty.
    """
    unreadable: list[Unreadable] = []
    for root in roots:
        sets.mark_many(root.blobs)
        for tree in root.trees:
            if not sets.mark(tree):
                continue
            try:
                read = read_tree(store, tree)
                entries = [Entry.from_json(d) for d in read.docs]
            except (StoreError, ValueError, KeyError, TypeError) as exc:
                missing = isinstance(exc, ObjectMissing)
                unreadable.append(Unreadable(tree, root.owner, str(exc), missing))
                continue
            sets.mark_many(read.records)  # a directory tree's nodes
            sets.mark_many(ref.digest for e in entries for ref in e.chunks)
    return unreadable
