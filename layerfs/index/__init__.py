"""The merged tree of an image: merge rules, the on-disk SQLite index, and a View over it."""

from __future__ import annotations

from layerfs.catalog import ImageRecord
from layerfs.index.build import ensure_index, index_path
from layerfs.index.merge import MergeError, merge_layers
from layerfs.index.view import ImageView
from layerfs.store.chunks import ChunkStore

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
