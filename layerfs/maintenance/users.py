"""Which owners and paths use a set of digests: the one answer gc, fsck and verify share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from layerfs.errors import StoreError
from layerfs.maintenance.roots import Root
from layerfs.records import get_tree
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

    A tree record that cannot be read is itself reported when it is in ``digests``
    and skipped otherwise (its damage is reported by whoever found it).
    """
    if not digests:
        return []
    uses: list[Use] = []
    for root in roots:
        uses.extend(Use(root.owner, "(object)", d) for d in root.blobs if d in digests)
        for tree in root.trees:
            if tree in digests:
                uses.append(Use(root.owner, TREE_PATH, tree))
                continue
            try:
                entries, _meta = get_tree(store, tree)
            except (StoreError, ValueError, KeyError):
                continue
            for entry in entries:
                for ref in entry.chunks:
                    if ref.digest in digests:
                        uses.append(Use(root.owner, entry.path or "/", ref.digest))
                        break
    return uses
