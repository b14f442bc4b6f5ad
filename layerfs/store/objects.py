"""The dumb half of a store: named immutable objects in a directory or a bucket.

An ``ObjectStore`` only stores, lists, reads (whole or a byte range) and
deletes objects named by relative paths such as ``packs/ab/<id>``,
``index/<id>`` or ``docs/images/<name>``; it also offers the store's lock (a
flock for a directory, leases for a bucket) and a local directory for derived
state. Everything else (packing, the index, the read cache, encryption,
repacking) is implemented once above it, in layerfs.store.packed.

A ``put`` is atomic and durable when it returns: readers see the old object,
or none, or the whole new one. ``create`` writes only if no object has the
name, atomically across processes and hosts.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.store.backend import PLAIN, DocVersion, NoConditionalWrites, Sealer


@dataclass
class ObjectStats:
    """Counts of what a store moved: requests by operation, bytes, packs and indexes written."""

    requests: Counter = field(default_factory=Counter)
    attempts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    packs_written: int = 0
    indexes_written: int = 0
    _mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, what: str, n: int = 1) -> None:
        with self._mutex:
            setattr(self, what, getattr(self, what) + n)

    def request(self, operation: str) -> None:
        with self._mutex:
            self.requests[operation] += 1

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


class ObjectStore(ABC):
    """Named objects; see the module docstring. ``what`` names the object in errors."""

    url: str
    stats: ObjectStats

    @property
    def sealer(self) -> Sealer:
        """Seals what the store writes for itself (lease bodies); see Backend.sealer."""
        return getattr(self, "_sealer", PLAIN)

    @sealer.setter
    def sealer(self, sealer: Sealer) -> None:
        self._sealer = sealer

    @abstractmethod
    def get(self, rel: str, what: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes, or those in [start, end) (``start`` < 0: the last -start).

        Raises ObjectMissing if there is no such object. A range past the end
        gives fewer bytes (or a StoreError saying the object is damaged).
        """

    @abstractmethod
    def put(self, rel: str, data: bytes, what: str) -> None:
        """Write an object atomically and durably (replacing one of that name)."""

    @abstractmethod
    def create(self, rel: str, data: bytes, what: str) -> bool:
        """Write an object only if none has that name; False (nothing written) if one has."""

    def get_version(self, rel: str, what: str) -> DocVersion:
        """The object with its version tag and age by the store's clock (see Backend.swap_doc)."""
        raise NoConditionalWrites(f"the store {self.url} cannot replace objects conditionally")

    def swap(self, rel: str, data: bytes, tag: str | None, what: str) -> str | None:
        """Write only if the object's version is ``tag`` (None: absent); new tag or None."""
        raise NoConditionalWrites(f"the store {self.url} cannot replace objects conditionally")

    @abstractmethod
    def delete(self, rels: list[str], what: str) -> None:
        """Remove objects; names that do not exist are ignored."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names of the objects under ``prefix`` (a folder such as 'index/')."""

    @abstractmethod
    def list_times(self, prefix: str) -> tuple[dict[str, float], float]:
        """{name: time written} of the objects under ``prefix``, and the store's time now."""

    @abstractmethod
    def holds_any(self, prefixes: tuple[str, ...]) -> bool:
        """Whether any object lies under one of ``prefixes``."""

    @abstractmethod
    def lock(self, exclusive: bool) -> AbstractContextManager[None]:
        """Hold the store's lock: shared for writers, exclusive for gc/prune."""

    def check_lease(self) -> None:  # noqa: B027 - optional hook
        """Raise StoreError unless this writer may still publish (a bucket's lease has margin)."""

    @abstractmethod
    def cache_dir(self) -> Path:
        """A local directory for derived state of this store."""

    def clean_tmp(self) -> int:
        """Remove temp files left by killed writers; return how many. Nothing by default."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (open files, clients)."""
