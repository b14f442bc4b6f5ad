"""Which owners and paths use a set of digests: the one answer gc, fsck and verify share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from layerfs.errors import StoreError
from layerfs.maintenance.roots import Root
from layerfs.records import new_records
from layerfs.store.chunks import ChunkStore

TREE_PATH = "(tree record)"


@dataclass(frozen=True, slots=True)
class Use:
    """An owner's path that needs object ``digest`` (TREE_PATH when it is the tree itself)."""

    owner: str
    path: str
    digest: str


def find_users(store: ChunkStore, roots: Iterable[Root], digests: set[str]) -> list[Use]:
    """Every (owner, path) whose content or tree record is one of ``digests``.

    A tree's head record in ``digests`` is reported as TREE_PATH, a directory
    node as the directory it lists; nothing below either is read. Another record
    that cannot be read ends that tree's walk (its damage is reported by whoever
    found it). Each tree is walked one node at a time.
    """
    if not digests:
        return []
    uses: list[Use] = []
    for root in roots:
        uses.extend(Use(root.owner, "(object)", d) for d in root.blobs if d in digests)
        for tree in root.trees:

            def is_new(record: str, path: str | None, owner: str = root.owner) -> bool:
                if record not in digests:
                    return True
                uses.append(Use(owner, TREE_PATH if path is None else path or "/", record))
                return False

            try:
                for entries in new_records(store, tree, is_new):
                    for entry in entries:
                        for ref in entry.chunks:
                            if ref.digest in digests:
                                uses.append(Use(root.owner, entry.path or "/", ref.digest))
                                break
            except (StoreError, ValueError, KeyError):
                continue
    return uses
