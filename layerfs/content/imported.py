"""The content cache filled by an import, from the bytes the import reads anyway.

An image imported into a store is usually mounted next. Its files' bytes pass
through the importer once, decompressed; written to the content cache then, a
first read after the import is a kernel read of the cache (as after
`docker load`), not a read through the image view that decodes chunks from the
store. ``CacheKeeper`` is the layer parser's ContentKeeper for that. The cache
is only a cache: if it cannot be written (a full disk), the keeper logs it once
and stops keeping, and the import goes on; the first mount fills the cache.
"""

from __future__ import annotations

import logging

from layerfs.content.cache import ContentBatch, TempContent, content_id
from layerfs.index.build import pack_chunks
from layerfs.records import Entry

log = logging.getLogger(__name__)


class _Sink:
    """One file's bytes on their way into the cache (nowhere once the keeper gave up)."""

    def __init__(self, keeper: CacheKeeper, temp: TempContent | None) -> None:
        self.keeper = keeper
        self.temp = temp

    def write(self, data: bytes | memoryview) -> None:
        if self.temp is None:
            return
        try:
            self.temp.write(data)
        except OSError as exc:
            self.abort()
            self.keeper.give_up(exc)

    def done(self, entry: Entry) -> None:
        if self.temp is None:
            return
        packed = pack_chunks(entry.chunks) if entry.inline is None else None
        try:
            self.keeper.batch.add(self.temp, content_id(packed, entry.inline))
        except OSError as exc:
            self.abort()
            self.keeper.give_up(exc)

    def abort(self) -> None:
        if self.temp is not None:
            self.temp.discard()
            self.temp = None


class CacheKeeper:
    """Writes every file an import reads into ``batch`` (named when the batch finishes)."""

    def __init__(self, batch: ContentBatch) -> None:
        self.batch = batch
        self.failed = False

    def begin(self) -> _Sink:
        if self.failed:
            return _Sink(self, None)
        try:
            return _Sink(self, self.batch.begin())
        except OSError as exc:
            self.give_up(exc)
            return _Sink(self, None)

    def give_up(self, exc: OSError) -> None:
        """Keep nothing more (the import goes on without the cache)."""
        if not self.failed:
            self.failed = True
            log.warning(
                "the content cache cannot be written (%s): the import goes on "
                "without it, and the first mount fills it",
                exc,
            )
