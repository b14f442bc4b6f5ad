"""The content-addressed store: raw backends, chunking, and opening a store from a URL.

The names below are loaded when first used (PEP 562), so that importing a submodule
such as layerfs.store.location does not load the chunker and compressor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerfs.store.backend import Backend
    from layerfs.store.chunks import ChunkRef, ChunkStore
    from layerfs.store.location import default_store_url, open_backend, open_store

_WHERE = {
    "Backend": "layerfs.store.backend",
    "ChunkRef": "layerfs.store.chunks",
    "ChunkStore": "layerfs.store.chunks",
    "default_store_url": "layerfs.store.location",
    "open_backend": "layerfs.store.location",
    "open_store": "layerfs.store.location",
}

__all__ = [
    "Backend",
    "ChunkRef",
    "ChunkStore",
    "default_store_url",
    "open_backend",
    "open_store",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
