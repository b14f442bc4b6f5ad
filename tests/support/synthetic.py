"""Synthetic images made directly from tree records, for tests that need no importer."""

from __future__ import annotations

import hashlib

from layerfs.catalog import Catalog, ImageRecord, LayerRecord
from layerfs.records import Entry, Kind, put_tree
from layerfs.store.chunks import ChunkStore

MTIME = 1_700_000_000_123_456_789


def d(path: str, mode: int = 0o755, **kw) -> Entry:
    return Entry(path, Kind.DIR, mode=mode, mtime_ns=kw.pop("mtime_ns", MTIME), **kw)


def f(store: ChunkStore, path: str, data: bytes, mode: int = 0o644, **kw) -> Entry:
    """A regular file; content inline when tiny, else chunked into the store."""
    e = Entry(path, Kind.FILE, mode=mode, size=len(data), mtime_ns=kw.pop("mtime_ns", MTIME), **kw)
    if len(data) <= 64:
        e.inline = data
    else:
        e.chunks = store.write_bytes(data)
    return e


def link(path: str, target: str) -> Entry:
    return Entry(path, Kind.HARDLINK, target=target, mtime_ns=MTIME)


def sym(path: str, target: str) -> Entry:
    return Entry(path, Kind.SYMLINK, mode=0o777, target=target, mtime_ns=MTIME)


def wh(path: str) -> Entry:
    return Entry(path, Kind.WHITEOUT)


def opq(path: str) -> Entry:
    return Entry(path, Kind.OPAQUE)


def make_image(store: ChunkStore, name: str, layers: list[list[Entry]]) -> ImageRecord:
    """Store each layer's tree record and record an image made of them (bottom first)."""
    catalog = Catalog(store.backend)
    records = []
    for entries in layers:
        tree = put_tree(store, entries)
        layer = LayerRecord(
            diff_id="sha256:" + hashlib.sha256(tree.encode()).hexdigest(),
            tree=tree,
            entries=len(entries),
            apparent_size=sum(e.size for e in entries if e.kind is Kind.FILE),
        )
        catalog.put_layer(layer)
        records.append(layer)
    chain = hashlib.sha256(" ".join(r.diff_id for r in records).encode()).hexdigest()
    image = ImageRecord(name=name, id="sha256:" + chain, config={}, layers=records)
    store.flush()
    catalog.put_image(image)
    return image
