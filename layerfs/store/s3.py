"""A store backend in an S3 bucket (``s3://BUCKET/PREFIX``), for AWS or S3-compatible servers.

Layout under PREFIX::

    packs/ab/<id>    pack files of many blobs (see layerfs.store.packs), ~32 MB each
    index/<id>       index objects: digest -> (pack, offset, length) for some packs
    docs/<name>      named documents, one object each (names and bodies encrypted
                     in an encrypted repository: layerfs.repo.repository)
    locks/...        leases (see layerfs.store.leases)

Blobs are appended to an in-memory pack; a full pack is uploaded by a pool of
threads (one PUT each, multipart above 64 MB), and ``flush`` uploads the open
pack, waits for every upload and only then writes the index object naming them:
a blob is visible only when its pack and an index are both durable. Pack and
index names are random, so writers on several hosts never overwrite each other.

Reads use Range GETs and keep the bytes in a bounded local cache
(``cache_dir()/blobs``), so each range is fetched once; one GET also brings the
uncached blobs that follow in the pack, up to ``readahead`` (2 MiB), which makes
sequential restores need few requests. Index objects are cached there too, as
they never change. One-pass readers (restore) use ``read_blobs`` instead: large
range GETs on a thread pool, nothing written to the cache (see s3read).
``delete_blobs`` repacks: a pack holding only dead blobs is deleted, a
pack holding live and dead blobs has its live blobs copied into a new pack; the
new packs and a new index (also carrying the entries of untouched packs that
shared an index with a rewritten one) are written before the old indexes are
deleted, then the old packs, so a crash at any point loses nothing live. Every
live blob it copies is re-hashed first; a pack holding one whose bytes do not
match its name is left as it is (and logged) for fsck to report. Under the
exclusive lock it also removes packs no index names (from crashed writers) once
they are older than ``unindexed_grace`` (an hour; far above the lease period),
and merges many small indexes into one. ``rebuild_index`` re-creates index
entries from the pack trailers.

Writes are fenced by the store lease (see layerfs.store.leases): every index
object and document is written, and repack's deletions made, only after
``leases.check`` found the lease sure to last a third of its period more.
The lease calls use a client of their own whose timeouts are well inside the
period. ``LAYERFS_S3_LEASE_TTL`` sets the period (60 s).

Endpoint and credentials come from the usual AWS environment and config files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); addressing is path-style.
``stats`` counts requests by operation (boto3 event hooks) and bytes moved.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import logging
import os
import re
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from layerfs.errors import ObjectMissing, StoreError
from layerfs.store import packs, s3read
from layerfs.store.backend import PLAIN, Backend, Sealer, check_digest, check_doc_name
from layerfs.store.cache import BlobCache
from layerfs.store.leases import LeaseManager, lease_timeouts, server_now
from layerfs.store.packs import BlobPlace, PackWriter

log = logging.getLogger(__name__)

PACK_SIZE = 32 << 20
MULTIPART_THRESHOLD = 64 << 20
CACHE_BYTES = 2 << 30
READAHEAD = 2 << 20
_INDEX_EVERY = 8  # write an index after this many uploaded packs even without flush
_COMPACT_AT = 32  # delete_blobs under the exclusive lock merges this many indexes into one
LEASE_TTL = 60.0
UNINDEXED_GRACE = 3600.0  # packs no index names are kept this long (a writer may index them yet)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass
class S3Stats:
    """Requests (by S3 operation, counted by boto3 event hooks) and bytes moved."""

    requests: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    packs_written: int = 0
    indexes_written: int = 0
    _mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, what: str, n: int = 1) -> None:
        with self._mutex:
            setattr(self, what, getattr(self, what) + n)

    def on_call(self, event_name: str, **_: object) -> None:
        with self._mutex:
            self.requests[event_name.rsplit(".", 1)[-1]] += 1

    def on_send(self, **_: object) -> None:
        self.count("attempts")

    @property
    def total_requests(self) -> int:
        with self._mutex:
            return sum(self.requests.values())

    def snapshot(self) -> dict[str, object]:
        with self._mutex:
            return {
                "requests": dict(self.requests),
                "total_requests": sum(self.requests.values()),
                "attempts": self.attempts,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "packs_written": self.packs_written,
                "indexes_written": self.indexes_written,
            }


CACHE_DIR_MODE = 0o700  # the cache holds plaintext the bucket has: private to its owner


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def default_cache_root() -> Path:
    """$LAYERFS_CACHE_DIR, else /var/cache/layerfs for root, else ~/.cache/layerfs."""
    env = os.environ.get("LAYERFS_CACHE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/layerfs")
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "layerfs" if xdg else Path.home() / ".cache" / "layerfs"


def env_lease_ttl() -> float:
    """The lease period: $LAYERFS_S3_LEASE_TTL seconds, else 60."""
    raw = os.environ.get("LAYERFS_S3_LEASE_TTL", "")
    if not raw:
        return LEASE_TTL
    try:
        ttl = float(raw)
    except ValueError:
        ttl = float("nan")
    if not ttl > 0 or ttl == float("inf"):
        raise StoreError(f"LAYERFS_S3_LEASE_TTL={raw!r} is not a positive number of seconds")
    return ttl


def make_client(
    max_connections: int = 16,
    *,
    connect_timeout: float = 5,
    read_timeout: float = 60,
    attempts: int = 5,
):
    """An S3 client from the standard AWS environment, path-style, with modest retries.

    A plain botocore client: boto3 would only add start-up time (its transfer
    manager is imported when an object is large enough for a multipart upload).
    """
    session = botocore.session.get_session()
    config = Config(
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": attempts},  # the first one included
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_connections,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = session.get_config_variable("region") or "us-east-1"
    return session.create_client("s3", region_name=region, config=config)


class S3Backend(Backend):
    """Blobs in pack files and docs as plain objects in an S3 bucket; see the module doc."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        pack_size: int = PACK_SIZE,
        upload_threads: int = 4,
        cache_root: Path | None = None,
        cache_bytes: int = CACHE_BYTES,
        lease_ttl: float | None = None,
        lock_timeout: float = 900.0,
        lock_poll: float = 1.0,
        readahead: int = READAHEAD,
        unindexed_grace: float = UNINDEXED_GRACE,
        lease_client=None,
    ) -> None:
        if not _BUCKET_RE.match(bucket):
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.pack_size = pack_size
        self.readahead = readahead
        self.unindexed_grace = unindexed_grace
        self.stats = S3Stats()
        self.client = client or make_client(upload_threads * 2 + 8)
        self.client.meta.events.register("before-call.s3", self.stats.on_call)
        self.client.meta.events.register("before-send.s3", self.stats.on_send)
        self.endpoint = self.client.meta.endpoint_url
        self._cache_root = cache_root
        self._cache_private = False
        self.cache = BlobCache(self.cache_dir() / "blobs", cache_bytes)
        ttl = env_lease_ttl() if lease_ttl is None else lease_ttl
        if lease_client is None:
            # a client of its own: a refresh must not wait minutes behind the data's timeouts
            bounds = lease_timeouts(ttl)
            lease_client = (
                make_client(
                    4,
                    connect_timeout=bounds.connect,
                    read_timeout=bounds.read,
                    attempts=bounds.attempts,
                )
                if client is None
                else client
            )
        self.leases = LeaseManager(
            lease_client,
            bucket,
            self.prefix,
            ttl=ttl,
            poll=lock_poll,
            timeout=lock_timeout,
            wrap=self._error,
        )
        self._sealer: Sealer = PLAIN
        self._pool = ThreadPoolExecutor(upload_threads, thread_name_prefix="layerfs-s3-upload")
        self._slots = threading.BoundedSemaphore(upload_threads + 1)
        self._mutex = threading.RLock()
        self._flush_mutex = threading.Lock()
        self._bucket_checked = False
        self._exclusive_depth = 0
        # durable state, from the index objects
        self._loaded = False
        self._index_packs: dict[str, dict[str, list[tuple[str, int, int]]]] = {}
        self._places: dict[str, BlobPlace] = {}
        self._pack_entries: dict[str, list[tuple[str, int, int]]] = {}
        # this process's blobs that are not yet covered by an index
        self._open: PackWriter | None = None
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
        self.leases.sealer = sealer

    @classmethod
    def from_url(cls, url: str, **kwargs) -> S3Backend:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StoreError(f"invalid S3 store URL {url!r}: use s3://BUCKET/PREFIX")
        return cls(parsed.netloc, parsed.path.strip("/"), **kwargs)

    # -- helpers -------------------------------------------------------------------
    def _key(self, rel: str) -> str:
        return self.prefix + rel

    @staticmethod
    def _pack_rel(pack_id: str) -> str:
        return f"packs/{pack_id[:2]}/{pack_id}"

    def _error(self, what: str, exc: Exception) -> StoreError:
        """A one-line StoreError for a failed S3 call, saying what to check."""
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, NoCredentialsError):
            return StoreError(
                f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "or configure ~/.aws/credentials"
            )
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = err.get("Code", "")
            if code == "NoSuchBucket":
                return StoreError(
                    f"{what}: the bucket {self.bucket} does not exist at {self.endpoint}; "
                    "check the store URL or create the bucket"
                )
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StoreError(f"{what}: S3 refused the credentials ({code}); check AWS_* keys")
            return StoreError(f"{what} in {self.url} failed: {code} {err.get('Message', '')}")
        if isinstance(exc, BotoCoreError):
            return StoreError(
                f"{what}: cannot reach the S3 endpoint {self.endpoint} ({exc}); "
                "check AWS_ENDPOINT_URL and that the server runs"
            )
        return StoreError(f"{what} in {self.url} failed: {exc}")

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise self._error("checking the bucket", exc) from exc
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc2:
                code = exc2.response.get("Error", {}).get("Code")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise self._error(f"creating the bucket {self.bucket}", exc2) from exc2
        except BotoCoreError as exc:
            raise self._error("checking the bucket", exc) from exc
        self._bucket_checked = True

    def _get(self, rel: str, what: str, **kwargs) -> bytes:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(rel), **kwargs)
            data = resp["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
                "NoSuchKey",
                "404",
            ):
                raise ObjectMissing(f"{what} is missing from the store {self.url}") from None
            if isinstance(exc, ClientError) and "Range" in kwargs and _code(exc) == "InvalidRange":
                raise StoreError(
                    f"{what} in {self.url} is damaged: it ends before {kwargs['Range']}"
                ) from None
            raise self._error(f"reading {what}", exc) from exc
        self.stats.count("bytes_down", len(data))
        return data

    def _put(self, rel: str, data: bytes, what: str) -> None:
        try:
            if len(data) >= MULTIPART_THRESHOLD:
                self._upload_multipart(rel, data)
            else:
                self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(f"writing {what}", exc) from exc
        self.stats.count("bytes_up", len(data))

    def _upload_multipart(self, rel: str, data: bytes) -> None:
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=16 << 20, max_concurrency=4
        )
        with create_transfer_manager(self.client, config) as manager:
            manager.upload(io.BytesIO(data), self.bucket, self._key(rel)).result()

    def _delete(self, rels: list[str], what: str) -> None:
        for i in range(0, len(rels), 1000):
            batch = [{"Key": self._key(r)} for r in rels[i : i + 1000]]
            try:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error(f"deleting {what}", exc) from exc

    def _list(self, rel_prefix: str) -> list[str]:
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(rel_prefix)
            )
            for page in pages:
                out.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(f"listing {rel_prefix}", exc) from exc
        return out

    # -- indexes ---------------------------------------------------------------------
    def _load_index(self, index_id: str) -> dict[str, list[tuple[str, int, int]]]:
        local = self.cache_dir() / "index" / index_id
        try:
            return self._decode_index(index_id, local.read_bytes())
        except (OSError, StoreError):
            pass
        data = self._get(f"index/{index_id}", f"index {index_id}")
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

    def _seal_pack(self, writer: PackWriter) -> bytes:
        return writer.seal(lambda trailer: self.sealer.seal("trailer", writer.pack_id, trailer))

    def refresh(self) -> None:
        """Read the index objects written since the last look (and forget deleted ones)."""
        ids = {rel.split("/", 1)[1] for rel in self._list("index/")}
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
    def put_blob(self, digest: str, data: bytes) -> bool:
        check_digest(digest)
        self._ensure_loaded()
        sealed = None
        with self._mutex:
            if digest in self._places or digest in self._pending:
                return False
            if self._open is None:
                self._open = PackWriter()
            place = self._open.add(digest, bytes(data))
            self._pending[digest] = (self._open, place)
            if self._open.size >= self.pack_size:
                sealed, self._open = self._open, None
        if sealed is not None:
            if self._an_upload_failed():  # S3 is failing: stop now rather than at flush
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
        self._ensure_bucket()
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
            self._put(self._pack_rel(pack_id), self._seal_pack(writer), f"pack {pack_id}")
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
            raise self._error("uploading packs", errors[0])

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
        self.leases.check()  # immediately before the publish: see layerfs.store.leases
        self._put(f"index/{index_id}", data, f"index {index_id}")
        return index_id

    def check_lease(self) -> None:
        """Raise StoreError unless the held store lease is sure to last a third of its period."""
        self.leases.check()

    def flush(self) -> None:
        with self._flush_mutex:
            self.leases.check()
            with self._mutex:
                sealed, self._open = self._open, None
                retry, self._retry = self._retry, []
            for writer in retry + ([sealed] if sealed is not None and sealed.blobs else []):
                self._submit(writer)
            self._wait_uploads()
            self._commit_index()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

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
        data = self.cache.get(digest)
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
        self.cache.put(digest, data)
        return data

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
            if self.cache.contains(digest):
                break
            out.append((digest, offset, length))
            end = offset + length
        return out

    def _read_place(self, digest: str, place: BlobPlace) -> bytes:
        """Read a blob with one range GET, which also fetches (and caches) the uncached
        blobs that follow it in the pack, up to ``readahead`` bytes in all."""
        rel = self._pack_rel(place.pack)
        extent = self._extent(place)
        end = extent[-1][1] + extent[-1][2]
        try:
            data = self._get(rel, f"pack {rel}", Range=f"bytes={place.offset}-{end - 1}")
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
        for other, offset, length in extent[1:]:
            start = offset - place.offset
            self.cache.put(other, data[start : start + length])
        return data[: place.length]

    def read_blobs(
        self,
        digests: Iterable[str],
        consume: Callable[[str, bytes], None],
        fail: Callable[[str, Exception], None],
        workers: int = 1,
    ) -> None:
        """Few large range GETs on ``workers`` threads, bypassing the local cache.

        See Backend.read_blobs and layerfs.store.s3read. ``consume`` gets
        memoryviews into the range's bytes. Blobs still in this process's
        memory come from there; a failed range is read again blob by blob after
        one look at the indexes (its pack may have been repacked meanwhile).
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
        s3read.run_all(ranges, lambda r: self._read_range(r, consume, fail), workers)

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

    def _read_range(
        self,
        r: s3read.PackRange,
        consume: Callable[[str, bytes], None],
        fail: Callable[[str, Exception], None],
    ) -> None:
        rel = self._pack_rel(r.pack)
        try:
            data = self._get(rel, f"pack {rel}", Range=f"bytes={r.start}-{r.end - 1}")
        except StoreError:
            data = b""
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

        Blobs whose pack is gone from the bucket are left out, so fsck and verify
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
        """{pack id: (name, upload time)} of the packs in the bucket, and the server's time."""
        out: dict[str, tuple[str, float]] = {}
        now: float | None = None
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key("packs/")
            )
            for page in pages:
                if now is None and (when := server_now(page)) is not None:
                    now = when.timestamp()
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) :]
                    out[rel.rsplit("/", 1)[-1]] = (rel, obj["LastModified"].timestamp())
        except (ClientError, BotoCoreError) as exc:
            raise self._error("listing packs", exc) from exc
        return out, time.time() if now is None else now

    def clean_tmp(self) -> int:
        """Delete packs that no index names (left by writers that crashed); return how many.

        Only safe under the exclusive lock (no writer is between upload and index).
        """
        self.flush()
        self.refresh()
        with self._mutex:
            indexed = {p for doc in self._index_packs.values() for p in doc}
        return self._delete_orphan_packs(indexed)

    def pack_names(self) -> list[str]:
        """Names (relative to the prefix) of the pack objects in the bucket."""
        return self._list("packs/")

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
                data = self._get(rel, f"pack {rel}")
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
        self.leases.check()  # the exclusive lease still keeps writers out
        self._delete([f"index/{i}" for i in old_indexes], "old indexes")
        self._delete([self._pack_rel(p) for p in affected - kept], "old packs")
        if self._holds_exclusive():
            self._delete_orphan_packs(set(pack_blobs) | set(new_doc))
        self.refresh()
        with self._mutex:
            many = len(self._index_packs) >= _COMPACT_AT
        if many and self._holds_exclusive():
            self.compact_indexes()
        return freed

    def _put_repacked(self, writer: PackWriter) -> None:
        self._put(self._pack_rel(writer.pack_id), self._seal_pack(writer), "a repacked pack")

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
            self.leases.check()
            self._delete(orphans, "unindexed packs")
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
        footer = self._get(rel, f"pack {rel}", Range=f"bytes=-{packs.FOOTER_SIZE}")
        size = packs.parse_footer(rel, footer)
        tail = self._get(rel, f"pack {rel}", Range=f"bytes=-{size + packs.FOOTER_SIZE}")
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
        self._delete([f"index/{i}" for i in old], "merged indexes")
        self.refresh()
        return len(old)

    # -- docs --------------------------------------------------------------------------------
    def put_doc(self, name: str, data: bytes) -> None:
        self._ensure_bucket()
        self.leases.check()  # a document written under a lapsed lease could name pruned data
        self._put(f"docs/{check_doc_name(name)}", data, f"document {name}")

    def create_doc(self, name: str, data: bytes) -> bool:
        self._ensure_bucket()
        key = self._key(f"docs/{check_doc_name(name)}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise self._error(f"writing document {name}", exc) from exc
        except BotoCoreError as exc:
            raise self._error(f"writing document {name}", exc) from exc
        self.stats.count("bytes_up", len(data))
        return True

    def holds_data(self) -> bool:
        for rel in ("packs/", "index/", "docs/"):
            try:
                resp = self.client.list_objects_v2(
                    Bucket=self.bucket, Prefix=self._key(rel), MaxKeys=1
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                    return False
                raise self._error(f"listing {rel}", exc) from exc
            except BotoCoreError as exc:
                raise self._error(f"listing {rel}", exc) from exc
            if resp.get("KeyCount", 0) or resp.get("Contents"):
                return True
        return False

    def get_doc(self, name: str) -> bytes:
        return self._get(f"docs/{check_doc_name(name)}", f"document {name}")

    def delete_doc(self, name: str) -> None:
        self._delete([f"docs/{check_doc_name(name)}"], f"document {name}")

    def list_docs(self, prefix: str) -> list[str]:
        return sorted(rel[len("docs/") :] for rel in self._list(f"docs/{prefix}"))

    # -- coordination and local state ---------------------------------------------------------
    @contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        self._ensure_bucket()
        stack = ExitStack()
        try:
            stack.enter_context(self.leases.exclusive() if exclusive else self.leases.shared())
        except (ClientError, BotoCoreError) as exc:
            raise self._error("taking the store lease", exc) from exc
        with stack:
            with self._mutex:
                self._exclusive_depth += int(exclusive)
            try:
                yield
            finally:
                with self._mutex:
                    self._exclusive_depth -= int(exclusive)

    def cache_dir(self) -> Path:
        """This store's local cache (indexes, chunks read): made private (0700) on first use."""
        host = urlparse(self.endpoint).netloc or "s3"
        name = f"{host}-{self.bucket}-{self.prefix.strip('/')}".replace("/", "_").replace(":", "_")
        path = (self._cache_root or default_cache_root()) / "s3" / name.rstrip("-")
        if not self._cache_private:
            path.mkdir(mode=CACHE_DIR_MODE, parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                if stat.S_IMODE(path.stat().st_mode) != CACHE_DIR_MODE:
                    os.chmod(path, CACHE_DIR_MODE)
            self._cache_private = True
        return path
