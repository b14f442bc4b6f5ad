"""Leases in an S3 bucket: the shared/exclusive lock of the S3 store across hosts.

* shared (a writer): the object ``locks/writer-<uuid>``. A writer waits while an
  unexpired ``locks/exclusive`` exists, writes its lease, then looks again; if an
  exclusive lease appeared meanwhile it withdraws and waits (so of two racing
  parties at least one sees the other).
* exclusive (prune/gc): creates ``locks/exclusive`` with ``If-None-Match: *`` (one
  winner), then waits until no unexpired writer lease is left.

A lease body holds its time to live; it expires ``ttl`` seconds after its
LastModified time, judged against the server's Date header so that host clocks
do not matter. A background thread rewrites each held lease every ttl/4. An
expired exclusive lease is taken over with ``If-Match`` on its ETag (RGW wants
the ETag unquoted), so two parties cannot both take it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

from botocore.exceptions import BotoCoreError, ClientError

from layerfs.errors import StoreError

log = logging.getLogger(__name__)

EXCLUSIVE = "locks/exclusive"
WRITER_PREFIX = "locks/writer-"


@dataclass
class LeaseInfo:
    """A lease object as read back: its key, holder, expiry state and ETag."""

    key: str
    holder: str
    expired: bool
    etag: str


@dataclass
class _Held:
    key: str
    body: bytes
    etag: str = ""
    last_ok: float = field(default_factory=time.monotonic)
    lost: str = ""


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _server_now(response: dict) -> datetime | None:
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return parsedate_to_datetime(date) if date else None


class LeaseManager:
    """Takes and keeps leases under ``prefix`` in ``bucket`` with an S3 client."""

    def __init__(
        self,
        client,
        bucket: str,
        prefix: str,
        *,
        ttl: float = 60.0,
        poll: float = 1.0,
        timeout: float = 900.0,
        wrap: Callable[[str, Exception], Exception] | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.ttl = ttl
        self.poll = poll
        self.timeout = timeout
        self._wrap = wrap or (lambda what, exc: StoreError(f"{what}: {exc}"))
        self._held: dict[str, _Held] = {}
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading leases ----------------------------------------------------------
    def _body(self) -> bytes:
        doc = {"ttl": self.ttl, "host": socket.gethostname(), "pid": os.getpid()}
        return json.dumps(doc).encode()

    def read(self, rel: str) -> LeaseInfo | None:
        """The lease at ``rel`` (e.g. EXCLUSIVE), or None if there is none."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + rel)
            body = resp["Body"].read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._wrap(f"reading the lease {rel}", exc) from exc
        try:
            doc = json.loads(body)
            ttl = float(doc["ttl"])
            holder = f"{doc.get('host', '?')} pid {doc.get('pid', '?')}"
        except (ValueError, KeyError, TypeError):
            ttl, holder = self.ttl, "unknown holder (unreadable lease)"
        now = _server_now(resp) or datetime.now(resp["LastModified"].tzinfo)
        expired = resp["LastModified"] + timedelta(seconds=ttl) < now
        return LeaseInfo(rel, holder, expired, resp["ETag"].strip('"'))

    def writers(self) -> list[LeaseInfo]:
        """Every writer lease in the bucket, expired or not."""
        out = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + WRITER_PREFIX
        )
        for page in pages:
            for obj in page.get("Contents", []):
                info = self.read(obj["Key"][len(self.prefix) :])
                if info is not None:
                    out.append(info)
        return out

    # -- holding leases ------------------------------------------------------------
    def _put(self, rel: str, body: bytes, **cond: str) -> str:
        resp = self.client.put_object(Bucket=self.bucket, Key=self.prefix + rel, Body=body, **cond)
        return str(resp.get("ETag", "")).strip('"')

    def _delete(self, rel: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + rel)
        except (ClientError, BotoCoreError) as exc:  # it expires ttl seconds after its refresh
            log.warning("could not remove the lease %s (it expires by itself): %s", rel, exc)

    def _wait(self, deadline: float, what: str) -> None:
        if time.monotonic() >= deadline:
            raise StoreError(
                f"timed out after {self.timeout:.0f} s waiting for {what}; if its holder is gone "
                f"the lease expires {self.ttl:.0f} s after its last refresh"
            )
        time.sleep(self.poll)

    def _hold(self, held: _Held) -> None:
        with self._mutex:
            self._held[held.key] = held
            if self._thread is None or not self._thread.is_alive():
                self._wake.clear()
                self._thread = threading.Thread(
                    target=self._refresh_loop, name="layerfs-s3-leases", daemon=True
                )
                self._thread.start()

    def _release(self, key: str) -> None:
        with self._mutex:
            self._held.pop(key, None)
            if not self._held:
                self._wake.set()
        self._delete(key)

    def _refresh_loop(self) -> None:
        while not self._wake.wait(self.ttl / 4):
            with self._mutex:
                held = list(self._held.values())
            for h in held:
                try:
                    cond = {"IfMatch": h.etag} if h.key == EXCLUSIVE and h.etag else {}
                    h.etag = self._put(h.key, h.body, **cond)
                    h.last_ok = time.monotonic()
                except ClientError as exc:
                    if _status(exc) == 412:
                        h.lost = "another process took it over"
                    log.warning("could not refresh the lease %s: %s", h.key, exc)
                except Exception as exc:  # connection errors: keep trying
                    log.warning("could not refresh the lease %s: %s", h.key, exc)
            with self._mutex:
                if not self._held:
                    return

    def check(self) -> None:
        """Raise StoreError if a held lease was lost or may have expired."""
        with self._mutex:
            held = list(self._held.values())
        for h in held:
            if h.lost:
                raise StoreError(f"lost the store lease {h.key}: {h.lost}")
            if time.monotonic() - h.last_ok > self.ttl * 0.9:
                raise StoreError(
                    f"could not refresh the store lease {h.key} for {self.ttl:.0f} s; it may have "
                    "expired, so a prune may have run: start the backup again"
                )

    # -- the two kinds ---------------------------------------------------------------
    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold a writer lease for the duration of the block."""
        key = f"{WRITER_PREFIX}{uuid.uuid4().hex}"
        body = self._body()
        deadline = time.monotonic() + self.timeout
        while True:
            ex = self.read(EXCLUSIVE)
            if ex is not None and not ex.expired:
                log.info("waiting for the exclusive lease of %s", ex.holder)
                self._wait(deadline, f"the exclusive lease of {ex.holder} (a prune)")
                continue
            etag = self._put(key, body)
            ex = self.read(EXCLUSIVE)
            if ex is None or ex.expired:
                break
            self._delete(key)
        self._hold(_Held(key, body, etag))
        try:
            yield
        finally:
            self._release(key)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the exclusive lease and wait until no unexpired writer lease is left."""
        body = self._body()
        deadline = time.monotonic() + self.timeout
        etag = self._take_exclusive(body, deadline)
        self._hold(_Held(EXCLUSIVE, body, etag))
        try:
            while True:
                live = [w for w in self.writers() if not w.expired]
                if not live:
                    break
                log.info("waiting for %d writer lease(s) to end", len(live))
                self._wait(deadline, f"writer leases to end ({live[0].holder} and others)")
            yield
        finally:
            self._release(EXCLUSIVE)

    def _take_exclusive(self, body: bytes, deadline: float) -> str:
        while True:
            try:
                return self._put(EXCLUSIVE, body, IfNoneMatch="*")
            except ClientError as exc:
                if _status(exc) not in (409, 412):
                    raise
            ex = self.read(EXCLUSIVE)
            if ex is not None and ex.expired:
                try:
                    return self._put(EXCLUSIVE, body, IfMatch=ex.etag)
                except ClientError as exc:
                    if _status(exc) not in (409, 412):
                        raise
                continue
            if ex is not None:
                self._wait(deadline, f"the exclusive lease of {ex.holder}")
