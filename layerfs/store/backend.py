"""The one small interface every store backend implements.

A backend holds two kinds of things:

* blobs: immutable byte strings named by the hex digest of their content
  (chunks of file data and metadata records). Writers may batch them; a blob
  is only visible under its final name once its bytes are durable (``flush``).
* docs: small named documents that change (image records, backup snapshots,
  leases). A doc write is atomic and durable when ``put_doc`` returns.

Callers never touch paths or buckets directly, so a local directory, an S3
bucket and a cache in front of one are interchangeable.

A backend also says how content is named (``content_id``: unkeyed BLAKE3 here,
keyed in an encrypted repository) and carries a ``Sealer``, which protects the
objects it writes for itself (an S3 store's indexes, pack trailers and
leases); an encrypted repository (layerfs.repo.repository) gives it one that
encrypts them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from layerfs.errors import StoreError

DATA = "data"  # a blob of file content
TREE = "tree"  # a metadata record (tree node, tree root)
DEFAULT_GRACE_SECONDS = 3600.0  # gc never deletes objects younger than this (seconds)

_DIGEST_RE = re.compile(r"^[0-9a-f]{16,128}$")
_DOC_RE = re.compile(r"^[A-Za-z0-9._@:+-]+(/[A-Za-z0-9._@:+-]+)*$")


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a lowercase hex digest, else raise StoreError."""
    if not _DIGEST_RE.match(digest):
        raise StoreError(f"invalid object digest {digest!r}")
    return digest


def check_doc_name(name: str) -> str:
    """Return ``name`` if it is a safe doc name (no '..', no absolute path)."""
    if not _DOC_RE.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise StoreError(f"invalid document name {name!r}")
    return name


def plain_id(data: bytes | memoryview) -> str:
    """The ID of content in an unencrypted repository: BLAKE3 of it, 64 hex digits."""
    from blake3 import blake3

    return blake3(data).hexdigest()


class NoConditionalWrites(StoreError):
    """The store cannot replace a document only if it is unchanged (a local directory)."""


@dataclass(frozen=True)
class DocVersion:
    """A document as read for a conditional replace: its bytes, the store's tag of this
    version (an S3 ETag), and its age in seconds by the store's own clock."""

    data: bytes
    tag: str
    age: float


class Sealer:
    """What a backend does to the objects it writes for itself: nothing, by default.

    ``kind`` and ``name`` say which object it is ("index" and the index id, ...);
    an encrypting sealer binds the bytes to them. ``blob_intact`` tells whether
    stored blob bytes are the blob named ``digest`` (repack checks each blob it
    copies).
    """

    def seal(self, kind: str, name: str, data: bytes) -> bytes:
        return data

    def open(self, kind: str, name: str, data: bytes) -> bytes:
        return data

    def blob_intact(self, digest: str, blob: bytes | memoryview) -> bool:
        """Plain bytes named by their digest, or a stored chunk that decodes to them."""
        from layerfs.store.chunks import blob_matches

        return plain_id(blob) == digest or blob_matches(digest, blob)


PLAIN = Sealer()


class Backend(ABC):
    """Raw storage of blobs and docs; see the module docstring."""

    url: str
    sealer: Sealer = PLAIN
    chunker_seed: int = 0  # pyfastcdc's seed (0: its public gear table)

    def content_id(self, data: bytes | memoryview) -> str:
        """The name of a blob holding ``data`` (see plain_id)."""
        return plain_id(data)

    # -- blobs -------------------------------------------------------------
    @abstractmethod
    def put_blob(self, digest: str, data: bytes, kind: str = DATA) -> bool:
        """Store ``data`` under ``digest``; return False if it was already there.

        ``kind`` (DATA or TREE) lets a backend keep blobs read together side by side.
        """

    @abstractmethod
    def get_blob(self, digest: str) -> bytes:
        """Return the stored bytes of a blob; raise ObjectMissing if absent."""

    def read_blobs(
        self,
        digests: Iterable[str],
        consume: Callable[[str, bytes], None],
        fail: Callable[[str, Exception], None],
        workers: int = 1,
    ) -> None:
        """Hand the stored bytes of each blob to ``consume`` once, in any order.

        For one-pass readers (restore): nothing is cached. A blob that cannot be
        read goes to ``fail`` with its StoreError; an exception ``consume`` raises
        stops the reading and propagates. Both callbacks run on the caller's
        thread; ``workers`` is how many reads a backend may have running ahead of
        them. This default reads one blob at a time; backends with slow round
        trips override it.
        """
        for digest in digests:
            try:
                blob = self.get_blob(digest)
            except StoreError as exc:
                fail(digest, exc)
                continue
            consume(digest, blob)

    def read_blobs_in_order(
        self, digests: Iterable[str], ahead: int = 32
    ) -> Generator[bytes, None, None]:
        """Yield the stored bytes of each blob in the order given, fetched ahead.

        For one-pass readers that need order (layer tars). Up to ``ahead``
        blobs are fetched before the caller asks for them; a blob that cannot
        be read raises its StoreError when its turn comes. This default reads
        with ``get_blob`` on a few threads; backends with a cheaper way
        override it.
        """
        from layerfs.store.ordered import ordered_reads

        return ordered_reads(self.get_blob, digests, ahead)

    @abstractmethod
    def has_blob(self, digest: str) -> bool:
        """Whether a blob is stored (or pending in this process)."""

    @abstractmethod
    def delete_blobs(self, digests: list[str]) -> int:
        """Remove blobs; return the number of stored bytes freed."""

    @abstractmethod
    def iter_blobs(self) -> Iterator[tuple[str, int]]:
        """Yield (digest, stored size) of every durable blob."""

    def iter_blob_times(self) -> Iterator[tuple[str, int, float | None]]:
        """Yield (digest, stored size, modification time or None if unknown).

        gc uses the time to spare fresh blobs; backends that know it override this.
        """
        for digest, size in self.iter_blobs():
            yield digest, size, None

    @abstractmethod
    def flush(self) -> None:
        """Make every blob put so far durable and visible under its name."""

    def refresh(self) -> None:  # noqa: B027 - optional hook
        """See what other writers published since the last look (S3: new and deleted indexes).

        ``has_blob`` answers from that view; a local store always sees the disk.
        """

    def check_lease(self) -> None:  # noqa: B027 - optional hook
        """Raise StoreError unless this writer may still publish (S3: its lease has margin)."""

    def clean_tmp(self) -> int:
        """Remove what crashed writers left (temp files, unindexed packs); return how many.

        Only safe under the exclusive lock. Nothing to do by default.
        """
        return 0

    # -- docs --------------------------------------------------------------
    @abstractmethod
    def put_doc(self, name: str, data: bytes) -> None:
        """Atomically and durably write a named document."""

    @abstractmethod
    def create_doc(self, name: str, data: bytes) -> bool:
        """Write a document only if none has that name; False (nothing written) if one has.

        Atomic across processes and hosts: of two racing creators exactly one wins.
        """

    @abstractmethod
    def holds_data(self) -> bool:
        """Whether anything but locks is stored (blobs, packs, indexes or documents)."""

    @abstractmethod
    def get_doc(self, name: str) -> bytes:
        """Return a document; raise ObjectMissing if absent."""

    @abstractmethod
    def delete_doc(self, name: str) -> None:
        """Remove a document if present."""

    @abstractmethod
    def list_docs(self, prefix: str) -> list[str]:
        """Names of the documents under ``prefix`` (a folder such as 'images/')."""

    def get_doc_version(self, name: str) -> DocVersion:
        """A document with its version tag and age (ObjectMissing if absent), for
        ``swap_doc``. Only stores shared between hosts (S3) have it."""
        raise NoConditionalWrites(f"the store {self.url} cannot replace documents conditionally")

    def swap_doc(self, name: str, data: bytes, tag: str | None) -> str | None:
        """Write a document only if its current version is ``tag`` (None: only if there is
        none); the new version's tag, or None (nothing written) if it changed meanwhile.

        Atomic across hosts: of two writers that read the same version, one wins.
        """
        raise NoConditionalWrites(f"the store {self.url} cannot replace documents conditionally")

    # -- coordination and local state ---------------------------------------
    @abstractmethod
    def lock(self, exclusive: bool) -> AbstractContextManager[None]:
        """Hold the store's lock: shared for writers, exclusive for gc/prune."""

    @abstractmethod
    def cache_dir(self) -> Path:
        """A local directory for derived state (indexes, caches) of this store."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; flushes pending blobs."""
        self.flush()
