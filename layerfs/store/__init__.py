"""The content-addressed store: raw backends, chunking, and opening a store from a URL."""

from layerfs.store.backend import Backend
from layerfs.store.chunks import ChunkRef, ChunkStore
from layerfs.store.location import default_store_url, open_backend, open_store

__all__ = [
    "Backend",
    "ChunkRef",
    "ChunkStore",
    "default_store_url",
    "open_backend",
    "open_store",
]
