"""Marking: walk every root's tree records and put each referenced digest in the live set.

A tree's own records (a directory tree's nodes) are marked with the chunks. A
record already marked is not read again, nor anything below it, so marking many
backups of one volume reads each distinct directory once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from layerfs.errors import CorruptObject, ObjectMissing, StoreError
from layerfs.maintenance.liveset import DigestSets
from layerfs.maintenance.roots import Root
from layerfs.records import new_records
from layerfs.store.chunks import ChunkStore


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A tree record (a tree's head or one of its directory nodes) that could not be read
    while marking; ``problem`` is missing, corrupt or unreadable."""

    digest: str
    owner: str
    reason: str
    problem: str = "unreadable"


def mark_roots(store: ChunkStore, roots: Iterable[Root], sets: DigestSets) -> list[Unreadable]:
    """Mark every tree, chunk and direct object the roots reference.

    Returns the records that could not be read; what lies below them stays
    unmarked, so callers that delete garbage must stop when this list is not
    empty. A damaged record shared by several roots is listed once (see
    ``find_users`` for everyone it affects).
    """
    unreadable: list[Unreadable] = []
    for root in roots:
        sets.mark_many(root.blobs)
        for tree in root.trees:
            reading = tree

            def is_new(record: str, _path: str | None) -> bool:
                nonlocal reading
                reading = record
                return sets.mark(record)

            try:
                for entries in new_records(store, tree, is_new):
                    sets.mark_many(ref.digest for e in entries for ref in e.chunks)
            except (StoreError, ValueError, KeyError, TypeError) as exc:
                unreadable.append(Unreadable(reading, root.owner, str(exc), _problem(exc)))
    return unreadable


def _problem(exc: Exception) -> str:
    if isinstance(exc, ObjectMissing):
        return "missing"
    if isinstance(exc, CorruptObject):
        return "corrupt"
    return "unreadable"
