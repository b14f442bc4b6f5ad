"""Blobs in pack files named by index objects, over any ObjectStore: the one repository layer.

Layout of the objects (see docs/repository.md)::

    packs/ab/<id>    pack files of many blobs (see layerfs.store.packs)
    index/<id>       index objects: digest -> (pack, offset, length) for some packs
    docs/<name>      named documents, one object each (names and bodies encrypted
                     in an encrypted repository: layerfs.repo.repository)

Blobs are appended to an in-memory pack, one per kind (file data, and tree
records apart from it, as restic keeps them, so reading a tree reads few ranges
and its read-ahead brings records, not file data); a full pack is written by a pool of
threads, and ``flush`` writes the open pack, waits for every pack write and only
then writes the index object naming them: a blob is visible only when its pack
and an index are both durable. Pack and index names are random, so writers in
several processes or on several hosts never overwrite each other.

Reads fetch a blob's byte range. A store whose reads are slow (a bucket) has a
bounded local cache (``cache_dir()/blobs``) and a read-ahead: one range read
also brings the uncached blobs that follow in the pack, up to ``readahead``,
and index objects are copied into the cache as they never change. A local
directory needs neither (the page cache serves it). One-pass readers (restore)
use ``read_blobs`` instead: large range reads on a thread pool, nothing cached
(see s3read), the blobs handed out on the caller's thread.

``delete_blobs`` repacks: a pack holding only dead blobs is deleted, a pack
holding live and dead blobs has its live blobs copied into a new pack; the new
packs and a new index (also carrying the entries of untouched packs that shared
an index with a rewritten one) are written before the old indexes are deleted,
then the old packs, so a crash at any point loses nothing live. Every live blob
it copies is re-hashed first; a pack holding one whose bytes do not match its
name is left as it is (and logged) for fsck to report. Under the exclusive lock
it also removes packs no index names (from crashed writers) once they are older
than ``unindexed_grace`` (an hour), and merges many small indexes into one.
``rebuild_index`` re-creates index entries from the pack trailers.

Writes are fenced by the store's lock (``ObjectStore.check_lease``: a bucket's
lease must be sure to last, see layerfs.store.leases): every index object and
document is written, and repack's deletions made, only after that check.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

from layerfs.errors import ObjectMissing, StoreError
from layerfs.store import packs, s3read
from layerfs.store.backend import (
    DATA,
    Backend,
    DocVersion,
    Sealer,
    check_digest,
    check_doc_name,
)
from layerfs.store.cache import BlobCache
from layerfs.store.objects import ObjectStats, ObjectStore
from layerfs.store.ordered import ordered_reads
from layerfs.store.packs import BlobPlace, PackWriter

log = logging.getLogger(__name__)

_INDEX_EVERY = 8  # write an index after this many written packs even without flush
_COMPACT_AT = 32  # delete_blobs under the exclusive lock merges this many indexes into one
ORDERED_RANGE = 1 << 20  # the most read_blobs_in_order reads at once from one pack
UNINDEXED_GRACE = 3600.0  # packs no index names are kept this long (a writer may index them yet)


class PackedBackend(Backend):
    """Blobs in packs and docs as single objects, over ``objects``; see the module doc."""

    def __init__(
        self,
        objects: ObjectStore,
        *,
        pack_size: int,
        write_threads: int,
        cache: BlobCache | None = None,
        readahead: int = 0,
        unindexed_grace: float = UNINDEXED_GRACE,
    ) -> None:
        """``cache``, for stores slow to read, keeps blobs and copies of the index
        objects in ``cache_dir()``; a read then also brings the uncached blobs that
        follow, up to ``readahead`` bytes in all."""
        self.objects = objects
        self.url = objects.url
        self.pack_size = pack_size
        self.readahead = readahead if cache is not None else 0
        self.unindexed_grace = unindexed_grace
        self.cache = cache
        self._sealer: Sealer = objects.sealer
        self._pool = ThreadPoolExecutor(write_threads, thread_name_prefix="layerfs-pack-write")
        self._slots = threading.BoundedSemaphore(write_threads + 1)
        self._mutex = threading.RLock()
        self._flush_mutex = threading.Lock()
        self._exclusive_depth = 0
        # durable state, from the index objects
        self._loaded = False
        self._index_packs: dict[str, dict[str, list[tuple[str, int, int]]]] = {}
        self._places: dict[str, BlobPlace] = {}
        self._pack_entries: dict[str, list[tuple[str, int, int]]] = {}
        # this process's blobs that are not yet covered by an index
        self._open: dict[str, PackWriter] = {}  # the pack being filled, per kind of blob
        self._pending: dict[str, tuple[PackWriter, BlobPlace]] = {}
        self._uploads: list[tuple[PackWriter, Future]] = []
        self._retry: list[PackWriter] = []
        self._unindexed: dict[str, PackWriter] = {}

    @property
    def sealer(self) -> Sealer:  # type: ignore[override]
        """Seals the index objects, pack trailers and lease bodies this backend writes."""
        return self._sealer

    @sealer.setter
    def sealer(self, sealer: Sealer) -> None:
        self._sealer = sealer
        self.objects.sealer = sealer

    @property
    def stats(self) -> ObjectStats:
        """What this backend moved (requests, bytes, packs and indexes written)."""
        return self.objects.stats

    @staticmethod
    def _pack_rel(pack_id: str) -> str:
        return f"packs/{pack_id[:2]}/{pack_id}"

    def blob_location(self, digest: str) -> tuple[str, int, int]:
        """(object name, offset, length) of a durable blob's stored bytes, for tools that
        read or damage them directly; ObjectMissing if no index names it."""
        place = self._place(check_digest(digest))
        if place is None:
            raise ObjectMissing(f"object {digest} is missing from the store {self.url}")
        return self._pack_rel(place.pack), place.offset, place.length

    # -- indexes ---------------------------------------------------------------------
    def _load_index(self, index_id: str) -> dict[str, list[tuple[str, int, int]]]:
        if self.cache is None:
            return self._decode_index(
                index_id, self.objects.get(f"index/{index_id}", f"index {index_id}")
            )
        local = self.cache_dir() / "index" / index_id
        try:
            return self._decode_index(index_id, local.read_bytes())
        except (OSError, StoreError):
            pass
        data = self.objects.get(f"index/{index_id}", f"index {index_id}")
        doc = self._decode_index(index_id, data)
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{index_id}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_bytes(data)
            os.rename(tmp, local)
        except OSError:
            pass
        return doc

    def _decode_index(self, index_id: str, data: bytes) -> dict[str, list[tuple[str, int, int]]]:
        plain = self.sealer.open("index", index_id, data)
        return packs.decode_index(f"index {index_id}", plain)

    def _seal_pack(self, writer: PackWriter) -> bytearray:
        return writer.seal(lambda trailer: self.sealer.seal("trailer", writer.pack_id, trailer))

    def refresh(self) -> None:
        """Read the index objects written since the last look (and forget deleted ones)."""
        ids = {rel.split("/", 1)[1] for rel in self.objects.list("index/")}
        with self._mutex:
            known = set(self._index_packs)
        new = {}
        for index_id in sorted(ids - known):
            try:
                new[index_id] = self._load_index(index_id)
            except ObjectMissing:
                continue  # deleted by a prune meanwhile
        with self._mutex:
            gone = known - ids
            for index_id in gone:
                del self._index_packs[index_id]
            self._index_packs.update(new)
            if gone:
                self._places = {}
                self._pack_entries = {}
                for doc in self._index_packs.values():
                    self._add_places(doc)
            else:
                for doc in new.values():
                    self._add_places(doc)
            self._loaded = True
        if self.cache is not None:
            for index_id in gone:
                (self.cache_dir() / "index" / index_id).unlink(missing_ok=True)

    def _add_places(self, doc: dict[str, list[tuple[str, int, int]]]) -> None:
        for pack_id, blobs in doc.items():
            self._pack_entries[pack_id] = sorted(blobs, key=lambda e: e[1])
            for digest, offset, length in blobs:
                self._places.setdefault(digest, BlobPlace(pack_id, offset, length))

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.refresh()

    # -- writing blobs -------------------------------------------------------------------
    def put_blob(self, digest: str, data: bytes, kind: str = DATA) -> bool:
        check_digest(digest)
        self._ensure_loaded()
        sealed = None
        with self._mutex:
            if digest in self._places or digest in self._pending:
                return False
            writer = self._open.get(kind)
            if writer is None:
                writer = self._open[kind] = PackWriter()
            place = writer.add(digest, bytes(data))
            self._pending[digest] = (writer, place)
            if writer.size >= self.pack_size:
                sealed = self._open.pop(kind)
        if sealed is not None:
            if self._an_upload_failed():  # the store is failing: stop now rather than at flush
                with self._mutex:
                    self._retry.append(sealed)  # kept in memory; flush uploads it again
                self._wait_uploads()  # raises the upload's error (unless a flush took it)
                return True
            self._submit(sealed)
            with self._mutex:
                many = len(self._unindexed) >= _INDEX_EVERY
            if many:
                self._commit_index()
        return True

    def _submit(self, writer: PackWriter) -> None:
        self._slots.acquire()
        try:
            future = self._pool.submit(self._upload, writer)
        except BaseException:
            self._slots.release()
            raise
        with self._mutex:
            self._uploads.append((writer, future))

    def _upload(self, writer: PackWriter) -> None:
        try:
            pack_id = writer.pack_id
            self.objects.put(self._pack_rel(pack_id), self._seal_pack(writer), f"pack {pack_id}")
            self.stats.count("packs_written")
            writer.uploaded = time.monotonic()
            with self._mutex:
                self._unindexed[writer.pack_id] = writer
            writer.release()  # pending reads now use range GETs of the uploaded pack
        finally:
            self._slots.release()

    def _an_upload_failed(self) -> bool:
        with self._mutex:
            return any(f.done() and f.exception() is not None for _, f in self._uploads)

    def _wait_uploads(self) -> None:
        with self._mutex:
            uploads, self._uploads = self._uploads, []
        errors = []
        for writer, future in uploads:
            try:
                future.result()
            except Exception as exc:
                errors.append(exc)
                with self._mutex:
                    self._retry.append(writer)
        if errors:
            first = errors[0]
            if isinstance(first, StoreError):
                raise first
            raise StoreError(f"writing packs to {self.url} failed: {first}") from first

    def _commit_index(self) -> None:
        """Write one index object for every uploaded pack not yet named by an index."""
        with self._mutex:
            batch, self._unindexed = self._unindexed, {}
        self._forget_stale(batch)
        if not batch:
            return
        doc = {pack_id: w.blobs for pack_id, w in batch.items()}
        try:
            index_id = self._write_index(doc)
        except StoreError:
            with self._mutex:
                self._unindexed.update(batch)
            raise
        self.stats.count("indexes_written")
        with self._mutex:
            self._index_packs[index_id] = doc
            self._add_places(doc)
            for writer in batch.values():
                for digest, _, _ in writer.blobs:
                    if self._pending.get(digest, (None,))[0] is writer:
                        del self._pending[digest]

    def _forget_stale(self, batch: dict[str, PackWriter]) -> None:
        """Drop from ``batch`` the packs uploaded so long ago that gc may have removed them.

        A pack no index names is safe from gc for ``unindexed_grace``; one older
        than half that is not indexed any more (its blobs are forgotten, so they
        are written again if needed) and is left for gc.
        """
        if self.unindexed_grace <= 0:  # no grace at all (tests): nothing is safe anyway
            return
        limit = time.monotonic() - self.unindexed_grace / 2
        stale = [w for w in batch.values() if w.uploaded and w.uploaded < limit]
        if not stale:
            return
        log.warning("not indexing %d pack(s) uploaded too long ago; gc removes them", len(stale))
        with self._mutex:
            for writer in stale:
                del batch[writer.pack_id]
                for digest, _, _ in writer.blobs:
                    if self._pending.get(digest, (None,))[0] is writer:
                        del self._pending[digest]

    def _write_index(self, doc: dict[str, list[tuple[str, int, int]]]) -> str:
        """Publish an index object naming ``doc``'s packs, if the lease is sure to last."""
        index_id = packs.new_id()
        data = self.sealer.seal("index", index_id, packs.encode_index(doc))
        self.objects.check_lease()  # immediately before the publish: see layerfs.store.leases
        self.objects.put(f"index/{index_id}", data, f"index {index_id}")
        return index_id

    def flush(self) -> None:
        with self._flush_mutex:
            self.objects.check_lease()
            with self._mutex:
                sealed, self._open = list(self._open.values()), {}
                retry, self._retry = self._retry, []
            for writer in retry + [w for w in sealed if w.blobs]:
                self._submit(writer)
            self._wait_uploads()
            self._commit_index()

    # -- reading blobs ----------------------------------------------------------------------
    def _place(self, digest: str, stale: BlobPlace | None = None) -> BlobPlace | None:
        self._ensure_loaded()
        with self._mutex:
            place = self._places.get(digest)
        if place is None or place == stale:
            self.refresh()
            with self._mutex:
                place = self._places.get(digest)
        return place

    def get_blob(self, digest: str) -> bytes:
        check_digest(digest)
        with self._mutex:
            pending = self._pending.get(digest)
        if pending is not None:
            data = pending[0].read(pending[1])
            return data if data is not None else self._read_place(digest, pending[1])
        data = self.cache.get(digest) if self.cache is not None else None
        if data is not None:
            return data
        place = self._place(digest)
        if place is None:
            raise ObjectMissing(f"object {digest} is missing from the store {self.url}")
        try:
            data = self._read_place(digest, place)
        except ObjectMissing:
            newer = self._place(digest, stale=place)  # repacked meanwhile?
            if newer is None or newer == place:
                raise
            data = self._read_place(digest, newer)
        if self.cache is not None:
            self.cache.put(digest, data)
        return data

    def read_blobs_in_order(
        self, digests: Iterable[str], ahead: int = 32
    ) -> Generator[bytes | memoryview, None, None]:
        """Like Backend.read_blobs_in_order, but blobs that follow each other in one pack
        (a file's chunks, as they were written) come with one range read of up to
        ORDERED_RANGE bytes, as memoryviews into it; a few ranges are read ahead on
        threads. A blob in the local cache or not in a durable pack, and the blobs of a
        range that comes back short (repacked meanwhile, or damaged), are read one by
        one with get_blob, which says what is wrong."""
        self._ensure_loaded()

        def runs() -> Iterator[list[tuple[str, BlobPlace | None]]]:
            run: list[tuple[str, BlobPlace | None]] = []
            start = end = 0
            pack = ""
            for digest in digests:
                check_digest(digest)
                with self._mutex:
                    place = None if digest in self._pending else self._places.get(digest)
                if place is not None and self.cache is not None and self.cache.contains(digest):
                    place = None  # get_blob takes it from the local cache
                if run and (
                    place is None
                    or place.pack != pack
                    or place.offset != end
                    or place.offset + place.length - start > ORDERED_RANGE
                ):
                    yield run
                    run = []
                if place is None:
                    yield [(digest, None)]
                    continue
                if not run:
                    pack, start = place.pack, place.offset
                run.append((digest, place))
                end = place.offset + place.length
            if run:
                yield run

        def fetch(run: list[tuple[str, BlobPlace | None]]) -> list[bytes | memoryview]:
            first, last = run[0][1], run[-1][1]
            if first is None or last is None or len(run) == 1:
                return [self.get_blob(digest) for digest, _ in run]
            rel = self._pack_rel(first.pack)
            stop = last.offset + last.length
            try:
                data = self.objects.get(rel, f"pack {rel}", first.offset, stop)
            except StoreError:
                data = b""
            if len(data) != stop - first.offset:
                return [self.get_blob(digest) for digest, _ in run]
            view = memoryview(data)
            return [
                view[p.offset - first.offset : p.offset - first.offset + p.length]
                for _, p in run
                if p is not None
            ]

        fetched = ordered_reads(fetch, runs(), ahead=max(1, ahead // 8))
        with closing(fetched):
            for blobs in fetched:
                yield from blobs

    def _extent(self, place: BlobPlace) -> list[tuple[str, int, int]]:
        """The blob at ``place`` and the uncached blobs right after it, up to readahead."""
        with self._mutex:
            entries = self._pack_entries.get(place.pack, [])
        i = bisect.bisect_left(entries, place.offset, key=lambda e: e[1])
        if i >= len(entries) or entries[i][1] != place.offset:
            return [("", place.offset, place.length)]
        out = [entries[i]]
        end = place.offset + place.length
        for digest, offset, length in entries[i + 1 :]:
            if offset != end or offset + length - place.offset > self.readahead:
                break
            if self.cache.contains(digest):  # type: ignore[union-attr]
                break
            out.append((digest, offset, length))
            end = offset + length
        return out

    def _read_place(self, digest: str, place: BlobPlace) -> bytes:
        """Read a blob with one range read; with a cache, that also fetches (and caches)
        the uncached blobs that follow it in the pack, up to ``readahead`` bytes in all."""
        rel = self._pack_rel(place.pack)
        extent = self._extent(place) if self.readahead else []
        end = extent[-1][1] + extent[-1][2] if extent else place.offset + place.length
        try:
            data = self.objects.get(rel, f"pack {rel}", place.offset, end)
        except ObjectMissing:
            raise ObjectMissing(
                f"object {digest} is in the pack {rel}, which is missing from the store {self.url}"
            ) from None
        except StoreError as exc:
            raise StoreError(f"object {digest} in the pack {rel} cannot be read: {exc}") from exc
        if len(data) != end - place.offset:
            raise StoreError(
                f"the pack {rel} in {self.url} is damaged: object {digest} should be "
                f"{place.length} bytes at offset {place.offset}, the pack ends before"
            )
        for other, offset, length in extent[1:]:  # only with a cache
            start = offset - place.offset
            self.cache.put(other, data[start : start + length])  # type: ignore[union-attr]
        return data[: place.length]

    def read_blobs(
        self,
        digests: Iterable[str],
        consume: Callable[[str, bytes], None],
        fail: Callable[[str, Exception], None],
        workers: int = 1,
    ) -> None:
        """Few large range GETs, bypassing the local cache.

        See Backend.read_blobs and layerfs.store.s3read. Up to ``workers``
        ranges are fetched ahead on a thread pool while ``consume`` gets the
        blobs of the ranges before them on the caller's thread, in the planned
        order: the per-blob work of a restore of many small files is Python
        code and syscalls, which threads would only pass the GIL back and forth
        for. ``consume`` gets memoryviews into the range's bytes. Blobs still in
        this process's memory come from there; a failed range is read again blob
        by blob after one look at the indexes (its pack may have been repacked
        meanwhile).
        """
        order = list(dict.fromkeys(check_digest(d) for d in digests))
        self._ensure_loaded()
        located, pending, unknown = self._locate(order)
        if unknown:
            self.refresh()
            located2, pending2, unknown = self._locate(unknown)
            located.update(located2)
            pending += pending2
        for digest in unknown:
            fail(digest, ObjectMissing(f"object {digest} is missing from the store {self.url}"))
        for digest in pending:
            try:
                blob = self.get_blob(digest)
            except StoreError as exc:
                fail(digest, exc)
                continue
            consume(digest, blob)
        ranges = s3read.plan_ranges(order, located)
        fetched = ordered_reads(self._fetch_range, ranges, max(1, workers), max(1, workers))
        with closing(fetched):
            for r, data in zip(ranges, fetched, strict=True):
                self._deliver_range(r, data, consume, fail)

    def _locate(self, digests: list[str]) -> tuple[dict[str, BlobPlace], list[str], list[str]]:
        """Split digests into (places of durable blobs, pending in memory, unknown)."""
        located: dict[str, BlobPlace] = {}
        pending: list[str] = []
        unknown: list[str] = []
        with self._mutex:
            for digest in digests:
                if digest in self._pending:
                    pending.append(digest)
                elif (place := self._places.get(digest)) is not None:
                    located[digest] = place
                else:
                    unknown.append(digest)
        return located, pending, unknown

    def _fetch_range(self, r: s3read.PackRange) -> bytes:
        """The bytes of a range; short or empty if it cannot be read."""
        rel = self._pack_rel(r.pack)
        try:
            return self.objects.get(rel, f"pack {rel}", r.start, r.end)
        except StoreError:
            return b""

    def _deliver_range(
        self,
        r: s3read.PackRange,
        data: bytes,
        consume: Callable[[str, bytes], None],
        fail: Callable[[str, Exception], None],
    ) -> None:
        if len(data) != r.end - r.start:  # missing, cut short, unreachable or repacked
            self._reread(r, consume, fail)
            return
        view = memoryview(data)
        for digest, offset, length in r.blobs:
            consume(digest, view[offset - r.start : offset - r.start + length])

    def _reread(
        self,
        r: s3read.PackRange,
        consume: Callable[[str, bytes], None],
        fail: Callable[[str, Exception], None],
    ) -> None:
        """Read the blobs of a failed range one by one, from where the indexes now say."""
        self.refresh()
        for digest, _, _ in r.blobs:
            with self._mutex:
                place = self._places.get(digest)
            try:
                if place is None:
                    raise ObjectMissing(f"object {digest} is missing from the store {self.url}")
                blob = self._read_place(digest, place)
            except StoreError as exc:
                fail(digest, exc)
                continue
            consume(digest, blob)

    def has_blob(self, digest: str) -> bool:
        self._ensure_loaded()
        with self._mutex:
            return digest in self._pending or digest in self._places

    def iter_blobs(self) -> Iterator[tuple[str, int]]:
        self.refresh()
        with self._mutex:
            items = [(d, p.length) for d, p in self._places.items()]
        yield from items

    def iter_blob_times(self) -> Iterator[tuple[str, int, float | None]]:
        """(digest, size, upload time of its pack): gc spares blobs of fresh packs.

        Blobs whose pack is gone from the store are left out, so fsck and verify
        report them missing. The indexes are read before the packs are listed: a
        pack an index names was uploaded before that index was written.
        """
        self.refresh()
        times = {pack_id: mtime for pack_id, (_, mtime) in self._pack_times()[0].items()}
        with self._mutex:
            items = [
                (d, p.length, times[p.pack]) for d, p in self._places.items() if p.pack in times
            ]
        yield from items

    def _pack_times(self) -> tuple[dict[str, tuple[str, float]], float]:
        """{pack id: (name, time written)} of the stored packs, and the store's time now."""
        listed, now = self.objects.list_times("packs/")
        return {rel.rsplit("/", 1)[-1]: (rel, t) for rel, t in listed.items()}, now

    def clean_tmp(self) -> int:
        """Delete packs that no index names (left by writers that crashed); return how many.

        Only safe under the exclusive lock (no writer is between upload and index).
        """
        self.flush()
        self.refresh()
        with self._mutex:
            indexed = {p for doc in self._index_packs.values() for p in doc}
        return self.objects.clean_tmp() + self._delete_orphan_packs(indexed)

    def pack_names(self) -> list[str]:
        """Names of the stored pack objects."""
        return self.objects.list("packs/")

    # -- deleting blobs (repack) ---------------------------------------------------------------
    def delete_blobs(self, digests: list[str]) -> int:
        """Delete blobs by deleting dead packs and repacking mixed ones; see the module doc.

        Call it under the exclusive lock: then packs no index names (left by
        writers that crashed) are removed as well.
        """
        self.flush()
        self.refresh()
        dead = {check_digest(d) for d in digests}
        with self._mutex:
            index_packs = {i: dict(doc) for i, doc in self._index_packs.items()}
        pack_blobs: dict[str, list[tuple[str, int, int]]] = {}
        for doc in index_packs.values():
            pack_blobs.update(doc)
        affected = {p for p, blobs in pack_blobs.items() if any(d in dead for d, _, _ in blobs)}
        if not affected:
            return 0
        old_indexes = [i for i, doc in index_packs.items() if affected & doc.keys()]
        carried = {
            p: pack_blobs[p] for i in old_indexes for p in index_packs[i] if p not in affected
        }
        elsewhere = {d for p in pack_blobs if p not in affected for d, _, _ in pack_blobs[p]}
        freed = 0
        writer = PackWriter()
        copied: set[str] = set()
        new_doc: dict[str, list[tuple[str, int, int]]] = dict(carried)
        kept: set[str] = set()  # packs with a damaged live blob: left as they are
        for pack_id in sorted(affected):
            blobs = pack_blobs[pack_id]
            live = [(d, o, n) for d, o, n in blobs if d not in dead and d not in elsewhere]
            if live:
                rel = self._pack_rel(pack_id)
                data = self.objects.get(rel, f"pack {rel}")
                bad = [d for d, o, n in live if d not in copied and not self._intact(d, data, o, n)]
                if bad:
                    log.error(
                        "not repacking %s in %s: object %s in it does not match its name "
                        "(%d damaged); run `layerfs fsck`",
                        rel,
                        self.url,
                        bad[0],
                        len(bad),
                    )
                    kept.add(pack_id)
                    new_doc[pack_id] = blobs
                    continue
                for d, o, n in live:
                    if d not in copied:
                        writer.add(d, data[o : o + n])
                        copied.add(d)
            freed += sum(n for d, _, n in blobs if d in dead)
            if writer.size >= self.pack_size:
                self._put_repacked(writer)
                new_doc[writer.pack_id] = writer.blobs
                writer = PackWriter()
        if writer.blobs:
            self._put_repacked(writer)
            new_doc[writer.pack_id] = writer.blobs
        if new_doc:
            self._write_index(new_doc)
        self.objects.check_lease()  # the exclusive lease still keeps writers out
        self.objects.delete([f"index/{i}" for i in old_indexes], "old indexes")
        self.objects.delete([self._pack_rel(p) for p in affected - kept], "old packs")
        if self._holds_exclusive():
            self._delete_orphan_packs(set(pack_blobs) | set(new_doc))
        self.refresh()
        with self._mutex:
            many = len(self._index_packs) >= _COMPACT_AT
        if many and self._holds_exclusive():
            self.compact_indexes()
        return freed

    def _put_repacked(self, writer: PackWriter) -> None:
        self.objects.put(self._pack_rel(writer.pack_id), self._seal_pack(writer), "a repacked pack")

    def _intact(self, digest: str, pack: bytes, offset: int, length: int) -> bool:
        """Whether the blob at ``offset`` of ``pack`` is whole and is the blob ``digest``."""
        if offset + length > len(pack):
            return False
        return self.sealer.blob_intact(digest, memoryview(pack)[offset : offset + length])

    def _holds_exclusive(self) -> bool:
        with self._mutex:
            return self._exclusive_depth > 0

    def _delete_orphan_packs(self, indexed: set[str]) -> int:
        """Delete the packs no index names that are older than ``unindexed_grace``.

        A younger one may belong to a writer that has yet to index it (its lease
        fences that publish, and the grace is far above the lease period).
        """
        listed, now = self._pack_times()
        # the server's Date has whole seconds: with no grace at all, do not compare times
        cutoff = now - self.unindexed_grace if self.unindexed_grace > 0 else float("inf")
        orphans = [rel for p, (rel, t) in listed.items() if p not in indexed and t <= cutoff]
        young = sum(1 for p, (_, t) in listed.items() if p not in indexed and t > cutoff)
        if young:
            log.info(
                "keeping %d unindexed pack(s) younger than %.0f s", young, self.unindexed_grace
            )
        if orphans:
            log.info("removing %d pack(s) that no index names", len(orphans))
            self.objects.check_lease()
            self.objects.delete(orphans, "unindexed packs")
        return len(orphans)

    # -- index maintenance -----------------------------------------------------------------------
    def rebuild_index(self) -> int:
        """Index the packs no index names, from their trailers; return how many were indexed.

        Recovers the blobs of a writer that crashed between uploading packs and
        writing their index, or of indexes that were lost.
        """
        self.flush()
        self.refresh()
        with self._mutex:
            indexed = {p for doc in self._index_packs.values() for p in doc}
        doc: dict[str, list[tuple[str, int, int]]] = {}
        for rel in self.pack_names():
            pack_id = rel.rsplit("/", 1)[-1]
            if pack_id not in indexed:
                doc[pack_id] = self.read_trailer(pack_id)
        if doc:
            self._write_index(doc)
            self.refresh()
        return len(doc)

    def read_trailer(self, pack_id: str) -> list[tuple[str, int, int]]:
        """The blob list a pack carries at its end (two small range GETs)."""
        rel = self._pack_rel(pack_id)
        footer = self.objects.get(rel, f"pack {rel}", -packs.FOOTER_SIZE)
        size = packs.parse_footer(rel, footer)
        tail = self.objects.get(rel, f"pack {rel}", -(size + packs.FOOTER_SIZE))
        if len(tail) != size + packs.FOOTER_SIZE:
            raise StoreError(f"pack {rel} is damaged: its trailer is cut short")
        trailer = self.sealer.open("trailer", pack_id, tail[:size])
        return packs.parse_trailer(f"pack {rel}", trailer)

    def compact_indexes(self) -> int:
        """Merge every index object into one; return how many were merged.

        The merged index is written before the old ones are deleted, so readers
        always find every blob. Run it under the exclusive lock.
        """
        self.flush()
        self.refresh()
        with self._mutex:
            old = dict(self._index_packs)
        if len(old) < 2:
            return 0
        merged: dict[str, list[tuple[str, int, int]]] = {}
        for doc in old.values():
            merged.update(doc)
        self._write_index(merged)
        self.objects.delete([f"index/{i}" for i in old], "merged indexes")
        self.refresh()
        return len(old)

    # -- docs --------------------------------------------------------------------------------
    def put_doc(self, name: str, data: bytes) -> None:
        self.objects.check_lease()  # a document written under a lapsed lease could name pruned data
        self.objects.put(f"docs/{check_doc_name(name)}", data, f"document {name}")

    def create_doc(self, name: str, data: bytes) -> bool:
        return self.objects.create(f"docs/{check_doc_name(name)}", data, f"document {name}")

    def holds_data(self) -> bool:
        return self.objects.holds_any(("packs/", "index/", "docs/"))

    def get_doc(self, name: str) -> bytes:
        return self.objects.get(f"docs/{check_doc_name(name)}", f"document {name}")

    def delete_doc(self, name: str) -> None:
        self.objects.delete([f"docs/{check_doc_name(name)}"], f"document {name}")

    def get_doc_version(self, name: str) -> DocVersion:
        return self.objects.get_version(f"docs/{check_doc_name(name)}", f"document {name}")

    def swap_doc(self, name: str, data: bytes, tag: str | None) -> str | None:
        return self.objects.swap(f"docs/{check_doc_name(name)}", data, tag, f"document {name}")

    def list_docs(self, prefix: str) -> list[str]:
        return sorted(rel[len("docs/") :] for rel in self.objects.list(f"docs/{prefix}"))

    # -- coordination and local state ---------------------------------------------------------
    @contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Hold the store's lock. A view of the indexes loaded before is read again first:
        a gc may have removed blobs meanwhile, which ``has_blob`` must not report (a
        writer would then name a blob it did not store); while the lock is held, none can."""
        with self.objects.lock(exclusive):
            if self._loaded:
                self.refresh()
            with self._mutex:
                self._exclusive_depth += int(exclusive)
            try:
                yield
            finally:
                with self._mutex:
                    self._exclusive_depth -= int(exclusive)

    def check_lease(self) -> None:
        """Raise StoreError unless this writer may still publish (see ObjectStore.check_lease)."""
        self.objects.check_lease()

    def cache_dir(self) -> Path:
        return self.objects.cache_dir()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)
            self.objects.close()
