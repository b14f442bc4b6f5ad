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

Fencing: the holder counts its lease as valid until ``ttl`` seconds after it
*sent* its last successful write of it (the server's LastModified is later, so
this errs on the safe side whatever the host clocks say). ``check`` must pass
right before every publish (an index object, a backup document): it fails
unless at least ``margin`` (a third) of the period is left. A lease that went
longer than ``ttl`` without a refresh (the process was stopped, S3 hung) is
lost for good: a later refresh does not revive it, since a prune may have
run in between. The S3 client given here should have timeouts well inside
``ttl`` (see ``lease_timeouts``).
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
from layerfs.store.backend import PLAIN, Sealer

log = logging.getLogger(__name__)

EXCLUSIVE = "locks/exclusive"
WRITER_PREFIX = "locks/writer-"
MARGIN = 1 / 3  # the share of the period a lease must still have for a publish


@dataclass(frozen=True)
class LeaseTimeouts:
    """Timeouts and attempts of the S3 calls that take and refresh leases."""

    connect: float
    read: float
    attempts: int


def lease_timeouts(ttl: float) -> LeaseTimeouts:
    """Bounds for lease calls: two attempts of at most ttl/12 + ttl/12 each (2 s at least),
    so a refresh gives up within a third of the period instead of hanging past it."""
    each = max(2.0, ttl / 12)
    return LeaseTimeouts(connect=each, read=each, attempts=2)


class LeaseLapsed(StoreError):
    """A held lease lapsed (or nearly): nothing may be published under it any more."""


@dataclass
class LeaseInfo:
    """A lease object as read back: its key, holder, expiry state and ETag."""

    key: str
    holder: str
    expired: bool
    etag: str


@dataclass
class _Held:
    """A lease this process holds: ``sent`` is when its last successful write was sent."""

    key: str
    body: bytes
    etag: str = ""
    sent: float = field(default_factory=time.monotonic)
    lost: str = ""


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def server_now(response: dict) -> datetime | None:
    """The server's clock at ``response`` (its Date header), if it sent one."""
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
        self.sealer: Sealer = PLAIN  # seals lease bodies in an encrypted repository
        self._held: dict[str, _Held] = {}
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading leases ----------------------------------------------------------
    def _body(self, rel: str) -> bytes:
        doc = {"ttl": self.ttl, "host": socket.gethostname(), "pid": os.getpid()}
        return self.sealer.seal("lease", rel, json.dumps(doc).encode())

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
            doc = json.loads(self.sealer.open("lease", rel, body))
            ttl = float(doc["ttl"])
            holder = f"{doc.get('host', '?')} pid {doc.get('pid', '?')}"
        except (ValueError, KeyError, TypeError, StoreError):
            ttl, holder = self.ttl, "unknown holder (unreadable lease)"
        now = server_now(resp) or datetime.now(resp["LastModified"].tzinfo)
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
                if h.lost or self._lapsed(h):
                    continue  # a lapsed lease stays lost: a prune may have run meanwhile
                try:
                    cond = {"IfMatch": h.etag} if h.key == EXCLUSIVE and h.etag else {}
                    sent = time.monotonic()
                    h.etag = self._put(h.key, h.body, **cond)
                    if not self._lapsed(h):  # it reached the server before it lapsed
                        h.sent = sent
                except ClientError as exc:
                    if _status(exc) == 412:
                        h.lost = "another process took it over"
                    log.warning("could not refresh the lease %s: %s", h.key, exc)
                except Exception as exc:  # connection errors: keep trying
                    log.warning("could not refresh the lease %s: %s", h.key, exc)
            with self._mutex:
                if not self._held:
                    return

    def _lapsed(self, h: _Held) -> bool:
        """Whether ``h`` may have expired (and so is lost for good); records why."""
        if h.lost:
            return True
        age = time.monotonic() - h.sent
        if age >= self.ttl:
            h.lost = (
                f"it lapsed: not renewed for {age:.0f} s, longer than its {self.ttl:.0f} s "
                "(was this process stopped, or S3 unreachable?), so a prune may have run meanwhile"
            )
            log.warning("the store lease %s %s", h.key, h.lost)
            return True
        return False

    def check(self, margin: float = MARGIN) -> None:
        """Raise StoreError unless every held lease is sure to last ``margin`` of its period.

        Call it immediately before each publish (an index, a backup document).
        """
        with self._mutex:
            held = list(self._held.values())
        for h in held:
            if self._lapsed(h):
                raise LeaseLapsed(
                    f"the lease on the store lapsed ({h.key}: {h.lost}); "
                    "nothing more was published: run it again"
                )
            left = self.ttl - (time.monotonic() - h.sent)
            if left < self.ttl * margin:
                raise LeaseLapsed(
                    f"the lease on the store lapsed or nearly so ({h.key}: {left:.1f} s of "
                    f"{self.ttl:.0f} s left, last renewed {self.ttl - left:.0f} s ago; is S3 slow "
                    "or unreachable?); nothing more was published: run it again"
                )

    # -- the two kinds ---------------------------------------------------------------
    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold a writer lease for the duration of the block."""
        key = f"{WRITER_PREFIX}{uuid.uuid4().hex}"
        body = self._body(key)
        deadline = time.monotonic() + self.timeout
        while True:
            ex = self.read(EXCLUSIVE)
            if ex is not None and not ex.expired:
                log.info("waiting for the exclusive lease of %s", ex.holder)
                self._wait(deadline, f"the exclusive lease of {ex.holder} (a prune)")
                continue
            sent = time.monotonic()
            etag = self._put(key, body)
            ex = self.read(EXCLUSIVE)
            if ex is None or ex.expired:
                break
            self._delete(key)
        self._hold(_Held(key, body, etag, sent))
        try:
            yield
        finally:
            self._release(key)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the exclusive lease and wait until no unexpired writer lease is left."""
        body = self._body(EXCLUSIVE)
        deadline = time.monotonic() + self.timeout
        etag, sent = self._take_exclusive(body, deadline)
        self._hold(_Held(EXCLUSIVE, body, etag, sent))
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

    def _take_exclusive(self, body: bytes, deadline: float) -> tuple[str, float]:
        """Create (or take over an expired) exclusive lease: its ETag and when it was sent."""
        while True:
            try:
                sent = time.monotonic()
                return self._put(EXCLUSIVE, body, IfNoneMatch="*"), sent
            except ClientError as exc:
                if _status(exc) not in (409, 412):
                    raise
            ex = self.read(EXCLUSIVE)
            if ex is not None and ex.expired:
                try:
                    sent = time.monotonic()
                    return self._put(EXCLUSIVE, body, IfMatch=ex.etag), sent
                except ClientError as exc:
                    if _status(exc) not in (409, 412):
                        raise
                continue
            if ex is not None:
                self._wait(deadline, f"the exclusive lease of {ex.holder}")
