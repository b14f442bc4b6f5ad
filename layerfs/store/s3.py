"""The S3 object store (``s3://BUCKET/PREFIX``), for AWS or S3-compatible servers.

``S3Objects`` stores named objects under PREFIX (one PUT each, multipart above
64 MB; reads with Range GETs) and coordinates writers with leases in the bucket
(see layerfs.store.leases); ``S3Backend`` is the packed repository layer
(layerfs.store.packed) over it, with a bounded local read cache
(``cache_dir()/blobs``, 2 GiB) and a 2 MiB read-ahead, as every read is a round
trip. Index objects are cached there too, as they never change.

Every write that publishes (an index, a document, repack's deletions) is
fenced by the store lease: it is made only after ``check_lease`` found the
lease sure to last a third of its period more. The lease calls use a client of
their own whose timeouts are well inside the period. ``LAYERFS_S3_LEASE_TTL``
sets the period (60 s).

Endpoint and credentials come from the usual AWS environment and config files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); addressing is path-style.
``stats`` counts requests by operation (boto3 event hooks) and bytes moved.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from layerfs.errors import ObjectMissing, StoreError
from layerfs.store.backend import DocVersion, Sealer
from layerfs.store.cache import BlobCache
from layerfs.store.leases import LeaseManager, lease_timeouts, server_now
from layerfs.store.objects import ObjectStats, ObjectStore
from layerfs.store.packed import UNINDEXED_GRACE, PackedBackend

PACK_SIZE = 32 << 20
# packs uploading at once; one more waits sealed, so a writer holds at most this + 2 packs.
# bench_backup's first backup (2 GiB) peaked at 195-327 MiB RSS with 4, 204-260 MiB with 2,
# in the same time (Ceph RGW on this machine)
UPLOAD_THREADS = 2
MULTIPART_THRESHOLD = 64 << 20
CACHE_BYTES = 2 << 30
READAHEAD = 2 << 20
LEASE_TTL = 60.0
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MISSING = ("NoSuchKey", "404")


class S3Stats(ObjectStats):
    """ObjectStats whose requests are counted by boto3 event hooks."""

    def on_call(self, event_name: str, **_: object) -> None:
        self.request(event_name.rsplit(".", 1)[-1])

    def on_send(self, **_: object) -> None:
        self.count("attempts")


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


@functools.cache
def _model_loader():  # noqa: ANN202 - a botocore Loader
    """One loader of botocore's (read-only) service models per process: each new client
    would otherwise parse them again, ~0.1 s per client."""
    from botocore.loaders import create_loader

    return create_loader()


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
    session.register_component("data_loader", _model_loader())
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


class S3Objects(ObjectStore):
    """Objects under a prefix of an S3 bucket, and the bucket's leases; see the module doc."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        max_connections: int = 16,
        cache_root: Path | None = None,
        lease_ttl: float | None = None,
        lock_timeout: float = 900.0,
        lock_poll: float = 1.0,
        lease_client=None,
    ) -> None:
        if not _BUCKET_RE.match(bucket):
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.stats = S3Stats()
        self.client = client or make_client(max_connections)
        self.client.meta.events.register("before-call.s3", self.stats.on_call)
        self.client.meta.events.register("before-send.s3", self.stats.on_send)
        self.endpoint = self.client.meta.endpoint_url
        self._cache_root = cache_root
        self._cache_private = False
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
        self._bucket_checked = False

    @property
    def sealer(self) -> Sealer:  # type: ignore[override]
        return self.leases.sealer

    @sealer.setter
    def sealer(self, sealer: Sealer) -> None:
        self.leases.sealer = sealer

    def _key(self, rel: str) -> str:
        return self.prefix + rel

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

    def get(self, rel: str, what: str, start: int | None = None, end: int | None = None) -> bytes:
        kwargs = {}
        if start is not None and start < 0:
            kwargs["Range"] = f"bytes={start}"
        elif start is not None:
            kwargs["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(rel), **kwargs)
            data = resp["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            code = _code(exc) if isinstance(exc, ClientError) else ""
            if code in _MISSING:
                raise ObjectMissing(f"{what} is missing from the store {self.url}") from None
            if kwargs and code == "InvalidRange":
                raise StoreError(
                    f"{what} in {self.url} is damaged: it ends before {kwargs['Range']}"
                ) from None
            raise self._error(f"reading {what}", exc) from exc
        self.stats.count("bytes_down", len(data))
        return data

    def put(self, rel: str, data: bytes, what: str) -> None:
        self._ensure_bucket()
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

    def create(self, rel: str, data: bytes, what: str) -> bool:
        self._ensure_bucket()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(rel), Body=data, IfNoneMatch="*"
            )
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise self._error(f"writing {what}", exc) from exc
        except BotoCoreError as exc:
            raise self._error(f"writing {what}", exc) from exc
        self.stats.count("bytes_up", len(data))
        return True

    def get_version(self, rel: str, what: str) -> DocVersion:
        """The object, its ETag (unquoted, as RGW wants it back in If-Match) and its age
        by the server's clock (its Date header against the object's LastModified)."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            data = resp["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and _code(exc) in _MISSING:
                raise ObjectMissing(f"{what} is missing from the store {self.url}") from None
            raise self._error(f"reading {what}", exc) from exc
        now = server_now(resp) or datetime.now(resp["LastModified"].tzinfo)
        age = (now - resp["LastModified"]).total_seconds()
        return DocVersion(data, str(resp["ETag"]).strip('"'), age)

    def swap(self, rel: str, data: bytes, tag: str | None, what: str) -> str | None:
        """PUT with If-Match on ``tag`` (or If-None-Match: * for None): one winner."""
        self._ensure_bucket()
        cond = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, **cond)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412) or (tag is not None and _code(exc) in _MISSING):
                return None
            raise self._error(f"writing {what}", exc) from exc
        except BotoCoreError as exc:
            raise self._error(f"writing {what}", exc) from exc
        self.stats.count("bytes_up", len(data))
        return str(resp.get("ETag", "")).strip('"')

    def delete(self, rels: list[str], what: str) -> None:
        for i in range(0, len(rels), 1000):
            batch = [{"Key": self._key(r)} for r in rels[i : i + 1000]]
            try:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error(f"deleting {what}", exc) from exc

    def _pages(self, prefix: str) -> Iterator[dict]:
        try:
            yield from self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(f"listing {prefix}", exc) from exc

    def list(self, prefix: str) -> list[str]:
        return [
            obj["Key"][len(self.prefix) :]
            for page in self._pages(prefix)
            for obj in page.get("Contents", [])
        ]

    def list_times(self, prefix: str) -> tuple[dict[str, float], float]:
        out: dict[str, float] = {}
        now: float | None = None
        for page in self._pages(prefix):
            if now is None and (when := server_now(page)) is not None:
                now = when.timestamp()
            for obj in page.get("Contents", []):
                out[obj["Key"][len(self.prefix) :]] = obj["LastModified"].timestamp()
        return out, time.time() if now is None else now

    def holds_any(self, prefixes: tuple[str, ...]) -> bool:
        for rel in prefixes:
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

    @contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        self._ensure_bucket()
        stack = ExitStack()
        try:
            stack.enter_context(self.leases.exclusive() if exclusive else self.leases.shared())
        except (ClientError, BotoCoreError) as exc:
            raise self._error("taking the store lease", exc) from exc
        with stack:
            yield

    def check_lease(self) -> None:
        """Raise StoreError unless the held store lease is sure to last a third of its period."""
        self.leases.check()

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


class S3Backend(PackedBackend):
    """The packed repository layer over S3Objects, with a read cache; see the module doc."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        pack_size: int = PACK_SIZE,
        upload_threads: int = UPLOAD_THREADS,
        cache_root: Path | None = None,
        cache_bytes: int = CACHE_BYTES,
        lease_ttl: float | None = None,
        lock_timeout: float = 900.0,
        lock_poll: float = 1.0,
        readahead: int = READAHEAD,
        unindexed_grace: float = UNINDEXED_GRACE,
        lease_client=None,
    ) -> None:
        objects = S3Objects(
            bucket,
            prefix,
            client=client,
            max_connections=upload_threads * 2 + 8,
            cache_root=cache_root,
            lease_ttl=lease_ttl,
            lock_timeout=lock_timeout,
            lock_poll=lock_poll,
            lease_client=lease_client,
        )
        super().__init__(
            objects,
            pack_size=pack_size,
            write_threads=upload_threads,
            cache=BlobCache(objects.cache_dir() / "blobs", cache_bytes),
            readahead=readahead,
            unindexed_grace=unindexed_grace,
        )
        self.bucket = bucket
        self.prefix = objects.prefix
        self.client = objects.client
        self.leases = objects.leases
        self.endpoint = objects.endpoint

    @classmethod
    def from_url(cls, url: str, **kwargs) -> S3Backend:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StoreError(f"invalid S3 store URL {url!r}: use s3://BUCKET/PREFIX")
        return cls(parsed.netloc, parsed.path.strip("/"), **kwargs)
