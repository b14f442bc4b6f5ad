"""The backup operations, shared by the command line and the plugin's HTTP endpoints.

Each function takes an open ChunkStore and plain arguments, and returns records
that both front ends print or serialise.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.errors import StoreError
from layerfs.maintenance import CheckReport, GcReport, backup_roots, check_store
from layerfs.maintenance.gc import DEFAULT_GRACE_SECONDS, sweep_locked
from layerfs.maintenance.roots import all_roots
from layerfs.records import decode_tree_docs, encode_tree_docs, get_tree
from layerfs.store.chunks import ChunkStore
from volplugin.backup.diff import Change, diff_entries
from volplugin.backup.docs import (
    BackupRecord,
    delete_backup,
    get_backup,
    list_backups,
    put_backup,
)
from volplugin.backup.restore import Restorer, RestoreResult, check_target, select_entries
from volplugin.backup.retention import Decision, Policy, apply_per_volume
from volplugin.backup.snapshot import META_STAT, ParentIndex, Scanner

log = logging.getLogger("volplugin.backup")

BACKUP_LEVEL = 3  # zstd level of backed-up chunks: smaller buckets than imports' level 1
WRITE_WORKERS = 2  # threads compressing and storing new chunks while the scan reads on


def _parent_index(store: ChunkStore, parent: BackupRecord | None) -> ParentIndex:
    if parent is None:
        return ParentIndex()
    try:
        docs, meta = decode_tree_docs(store.get_record(parent.tree))
        return ParentIndex.from_docs(docs, meta)
    except (StoreError, ValueError, KeyError, TypeError) as exc:
        log.warning("parent backup %s unreadable (%s): reading every file", parent.id, exc)
        return ParentIndex()


def create_backup(
    store: ChunkStore,
    volume: str,
    path: Path,
    tags: list[str] | None = None,
    *,
    host: str | None = None,
    after_snapshot: Callable[[], list[dict]] | None = None,
) -> BackupRecord:
    """Snapshot ``path`` as a backup of ``volume``; incremental against its last backup.

    ``after_snapshot`` runs once the data is in the store and before the record is
    written; what it returns is kept in the record's ``hooks`` (see backup/hooks.py).
    """
    backend = store.backend
    writer = ChunkStore(backend, cache_bytes=0, level=BACKUP_LEVEL)
    started = time.monotonic()
    when = time.time()
    with backend.lock(exclusive=False):
        previous = list_backups(backend, volume)
        parent = previous[-1] if previous else None
        with writer.background_writes(WRITE_WORKERS):
            scan = Scanner(writer, path, _parent_index(store, parent)).scan()
            meta = {"type": "backup", "volume": volume, META_STAT: scan.stat}
            tree = writer.put_record(encode_tree_docs(scan.docs, meta))
            writer.flush()
        hooks = after_snapshot() if after_snapshot is not None else []
        record = BackupRecord(
            id=secrets.token_hex(16),
            volume=volume,
            host=host or socket.gethostname(),
            time=when,
            tree=tree,
            parent=parent.id if parent else None,
            tags=sorted(set(tags or [])),
            files=scan.files,
            size=scan.size,
            files_read=scan.files_read,
            bytes_read=scan.bytes_read,
            bytes_new=scan.writes.bytes_new,
            bytes_stored=scan.writes.bytes_stored,
            duration=round(time.monotonic() - started, 3),
            hooks=hooks,
        )
        put_backup(backend, record)
    return record


def restore_backup(
    store: ChunkStore,
    ref: str,
    target: Path,
    *,
    subpath: str | None = None,
    force: bool = False,
) -> tuple[BackupRecord, RestoreResult]:
    """Restore a backup (or the part under ``subpath``) into ``target``."""
    record = get_backup(store.backend, ref)
    entries, _meta = get_tree(store, record.tree)
    chosen = select_entries(entries, subpath)
    check_target(target, force)
    fresh = not target.exists() or not any(target.iterdir())
    return record, Restorer(store, target, entries, fresh=fresh).run(chosen)


def diff_backups(store: ChunkStore, ref_a: str, ref_b: str) -> list[Change]:
    a = get_backup(store.backend, ref_a)
    b = get_backup(store.backend, ref_b)
    return diff_entries(get_tree(store, a.tree)[0], get_tree(store, b.tree)[0])


@dataclass
class PruneReport:
    """Which backups a prune kept and removed, and what the sweep freed."""

    decisions: list[Decision] = field(default_factory=list)
    gc: GcReport | None = None
    dry_run: bool = False

    @property
    def removed(self) -> list[BackupRecord]:
        return [d.backup for d in self.decisions if not d.keep]

    def to_json(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "keep": [
                {"id": d.backup.id, "volume": d.backup.volume, "reasons": d.reasons}
                for d in self.decisions
                if d.keep
            ],
            "remove": [{"id": b.id, "volume": b.volume} for b in self.removed],
            "objects_removed": self.gc.removed if self.gc else 0,
            "bytes_freed": self.gc.freed_bytes if self.gc else 0,
        }


def prune_backups(
    store: ChunkStore,
    policy: Policy,
    *,
    volume: str | None = None,
    dry_run: bool = False,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
) -> PruneReport:
    """Forget backups the policy does not keep, then remove data nothing references."""
    backend = store.backend
    report = PruneReport(dry_run=dry_run)
    with backend.lock(exclusive=True):
        report.decisions = apply_per_volume(list_backups(backend, volume), policy)
        gone = {b.id for b in report.removed}
        if not dry_run:
            for backup_id in sorted(gone):
                delete_backup(backend, backup_id)
        roots = (
            r
            for r in all_roots(backend)
            if not any(r.owner.startswith(f"backup {i} ") for i in gone)
        )
        report.gc = sweep_locked(store, roots, grace_seconds=grace_seconds, dry_run=dry_run)
    return report


def verify_backups(
    store: ChunkStore,
    *,
    read_data: bool = False,
    subset_percent: float = 100.0,
    volume: str | None = None,
) -> CheckReport:
    """Check every backup's trees and chunks exist; with ``read_data`` re-hash them."""
    backend = store.backend
    with backend.lock(exclusive=False):
        return check_store(
            store,
            lambda: backup_roots(backend, volume),
            read_data=read_data,
            subset_percent=subset_percent,
        )
