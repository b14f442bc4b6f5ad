"""The merged tree of an image: merge rules, the on-disk SQLite index, and a View over it.

The merge rules (layerfs.index.merge) load on first use: mounting an image
whose index exists needs only the index and the view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfs.catalog import ImageRecord
from layerfs.index.build import ensure_index, index_path
from layerfs.index.view import ImageView
from layerfs.store.chunks import ChunkStore

if TYPE_CHECKING:
    from layerfs.index.merge import MergeError, merge_layers

__all__ = [
    "ImageView",
    "MergeError",
    "ensure_index",
    "index_path",
    "merge_layers",
    "open_image_view",
]


def open_image_view(store: ChunkStore, image: ImageRecord) -> ImageView:
    """An ImageView of ``image``, building its index first if needed."""
    return ImageView(store, ensure_index(store, image))


def __getattr__(name: str):
    if name in ("MergeError", "merge_layers"):
        from layerfs.index import merge

        return getattr(merge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
