"""The content cache filled by an import, from the bytes the import reads anyway.

An image imported into a store is usually mounted next. Its files' bytes pass
through the importer once, decompressed; written to the content cache then, a
first read after the import is a kernel read of the cache (as after
`docker load`), not a read through the image view that decodes chunks from the
store. ``CacheKeeper`` is the layer parser's ContentKeeper for that.
"""

from __future__ import annotations

from layerfs.content.cache import ContentBatch, TempContent, content_id
from layerfs.index.build import pack_chunks
from layerfs.records import Entry


class _Sink:
    """One file's bytes on their way into the cache."""

    def __init__(self, batch: ContentBatch, temp: TempContent) -> None:
        self.batch = batch
        self.temp = temp

    def write(self, data: bytes | memoryview) -> None:
        self.temp.write(data)

    def done(self, entry: Entry) -> None:
        packed = pack_chunks(entry.chunks) if entry.inline is None else None
        self.batch.add(self.temp, content_id(packed, entry.inline))

    def abort(self) -> None:
        self.temp.discard()


class CacheKeeper:
    """Writes every file an import reads into ``batch`` (named when the batch finishes)."""

    def __init__(self, batch: ContentBatch) -> None:
        self.batch = batch

    def begin(self) -> _Sink:
        return _Sink(self.batch, self.batch.begin())
