"""Garbage collection: remove stored objects no root references.

Runs under the store's exclusive lock (writers hold the shared one), and never
deletes objects younger than a grace period (``grace_seconds``), as a second
safety net for writers that do not take the lock. It also removes the leftovers
of killed writers: the local store's temp area, and on S3 the packs no index
names, which are kept for ``S3Backend.unindexed_grace`` (an hour, far above the
lease period) whatever ``grace_seconds`` says, because a writer whose lease is
still valid may be about to index them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from layerfs.errors import StoreError
from layerfs.maintenance.liveset import DigestSets, remove_stale
from layerfs.maintenance.mark import mark_roots
from layerfs.maintenance.roots import Root
from layerfs.store.backend import DEFAULT_GRACE_SECONDS
from layerfs.store.chunks import ChunkStore

_DELETE_BATCH = 1000


@dataclass
class GcReport:
    """What a gc run found and freed."""

    referenced: int = 0
    stored: int = 0
    removed: int = 0
    freed_bytes: int = 0
    kept_fresh: int = 0
    tmp_cleaned: int = 0
    dry_run: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def sweep_locked(
    store: ChunkStore,
    roots: Iterable[Root],
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    dry_run: bool = False,
    now: float | None = None,
) -> GcReport:
    """Mark and sweep; the caller must hold the backend's exclusive lock."""
    backend = store.backend
    backend.flush()
    report = GcReport(dry_run=dry_run)
    cutoff = (time.time() if now is None else now) - grace_seconds
    work_dir = backend.cache_dir() / "maintenance"
    if not dry_run:
        remove_stale(work_dir)
    with DigestSets(work_dir) as sets:
        unreadable = mark_roots(store, roots, sets)
        if unreadable:
            first = unreadable[0]
            raise StoreError(
                f"gc stopped before deleting anything: tree record {first.digest} of "
                f"{first.owner} cannot be read ({first.reason}); run `layerfs fsck` and repair "
                f"or remove the damaged owners ({len(unreadable)} unreadable tree(s))"
            )
        report.referenced = sets.live_count()
        batch: list[str] = []
        sets.add_present(backend.iter_blob_times())
        for digest, size, mtime in sets.garbage():
            if mtime is not None and mtime > cutoff:
                report.kept_fresh += 1
                continue
            report.removed += 1
            if dry_run:
                report.freed_bytes += size
                continue
            batch.append(digest)
            if len(batch) >= _DELETE_BATCH:
                report.freed_bytes += backend.delete_blobs(batch)
                batch.clear()
        if batch and not dry_run:
            report.freed_bytes += backend.delete_blobs(batch)
        report.stored = sets.db.execute("SELECT count(*) FROM present").fetchone()[0]
    clean_tmp = getattr(backend, "clean_tmp", None)
    if clean_tmp is not None and not dry_run:
        report.tmp_cleaned = clean_tmp()
    return report


def collect_garbage(
    store: ChunkStore,
    roots_factory: Callable[[], Iterable[Root]],
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    dry_run: bool = False,
) -> GcReport:
    """Take the exclusive lock, then mark and sweep (see sweep_locked)."""
    with store.backend.lock(exclusive=True):
        return sweep_locked(store, roots_factory(), grace_seconds=grace_seconds, dry_run=dry_run)
