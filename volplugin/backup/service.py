"""The backup operations, shared by the command line and the plugin's HTTP endpoints.

Each function takes an open ChunkStore and plain arguments, and returns records
that both front ends print or serialise.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.errors import StoreError
from layerfs.maintenance import CheckReport, GcReport, backup_roots, check_store, pins
from layerfs.maintenance.gc import DEFAULT_GRACE_SECONDS, sweep_locked
from layerfs.maintenance.roots import all_roots
from layerfs.records import BadTree, DirTreeWriter, Entry, Kind, iter_tree
from layerfs.store.chunks import ChunkStore
from layerfs.store.leases import LeaseLapsed
from volplugin.backup import publish
from volplugin.backup.diff import Change, diff_trees
from volplugin.backup.docs import (
    BackupRecord,
    delete_backup,
    get_backup,
    list_backups,
    put_backup,
)
from volplugin.backup.errors import BackupError, RestoreError
from volplugin.backup.restore import (
    Restorer,
    RestoreResult,
    check_target,
    select_entries,
    synced,
)
from volplugin.backup.retention import Decision, Policy, apply_per_volume
from volplugin.backup.snapshot import ParentTree, Scanner
from volplugin.hostid import host_id

log = logging.getLogger("volplugin.backup")

BACKUP_LEVEL = 3  # zstd level of backed-up chunks: smaller buckets than imports' level 1
WRITE_WORKERS = 2  # threads compressing and storing new chunks while the scan reads on


def _parent_tree(store: ChunkStore, parent: BackupRecord | None, host: str) -> ParentTree:
    if parent is None:
        return ParentTree()
    try:
        return ParentTree.of(store, parent.tree, identity=parent.host == host)
    except (StoreError, ValueError, KeyError, TypeError) as exc:
        log.warning("parent backup %s unreadable (%s): reading every file", parent.id, exc)
        return ParentTree()


def create_backup(
    store: ChunkStore,
    volume: str,
    path: Path,
    tags: list[str] | None = None,
    *,
    host: str | None = None,
    after_snapshot: Callable[[], list[dict]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    before_publish: Callable[[], None] | None = None,
    fence: Callable[[], None] | None = None,
    parent_id: str | None = None,
) -> BackupRecord:
    """Snapshot ``path`` as a backup of ``volume``; incremental against its last backup.

    ``after_snapshot`` runs once the data is in the store and before the record is
    written; what it returns is kept in the record's ``hooks`` (see backup/hooks.py).
    The parent is the last backup of ``volume`` by this host (``host``, by default
    the configured host id). An unchanged file is taken from the parent only if
    the store (its index as of taking the lock) still has its chunks; else it is
    read again. Before the record is written the store lease is confirmed to be
    good (see backup/publish.py), so no prune can have run meanwhile; else
    nothing is published. ``progress`` gets (files, bytes) as the scan goes (see
    Scanner); it and ``before_publish`` (run once the data is stored, before the
    hooks' end) may raise to stop the backup with nothing published; so may ``fence``,
    run immediately before the record is written (a roaming volume's lease).
    ``parent_id`` names the parent instead (a roaming volume's head, maybe taken on
    another host: then files are compared without their inodes and ctimes).
    """
    backend = store.backend
    host = host or host_id()
    writer = ChunkStore(backend, cache_bytes=0, level=BACKUP_LEVEL)
    started = time.monotonic()
    when = time.time()
    with backend.lock(exclusive=False):
        # by default this host's last backup: another host's inodes say nothing here
        parent = None
        if parent_id is not None:
            try:
                parent = get_backup(backend, parent_id)
            except BackupError as exc:
                log.warning("parent backup of %s unusable (%s): this host's last", volume, exc)
        if parent is None:
            previous = [b for b in list_backups(backend, volume) if b.host == host]
            parent = previous[-1] if previous else None
        parent_tree = _parent_tree(store, parent, host)
        try:
            with writer.background_writes(WRITE_WORKERS):
                nodes = DirTreeWriter(writer, {"type": "backup", "volume": volume})
                scan = Scanner(writer, path, parent_tree, emit=nodes.add, progress=progress).scan()
                tree = nodes.finish()
                writer.flush()
            if parent is not None and parent_tree.gone:
                log.warning(
                    "%d unchanged file(s) of %s were read again: backup %s names chunks of "
                    "theirs that are no longer in the store (damaged, or pruned meanwhile)",
                    parent_tree.gone,
                    volume,
                    parent.id,
                )
            if before_publish is not None:
                before_publish()
            hooks = after_snapshot() if after_snapshot is not None else []
            record = BackupRecord(
                id=secrets.token_hex(16),
                volume=volume,
                host=host,
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
                skipped=scan.skipped,
            )
            publish.check_lease(backend, volume)  # immediately before the publish
            if fence is not None:
                fence()
            put_backup(backend, record)
        except LeaseLapsed as exc:
            raise publish.not_published(volume, exc) from None
    return record


@dataclass
class RestorePlan:
    """A backup found, pinned and checked, ready to restore (see ``open_restore``)."""

    store: ChunkStore
    record: BackupRecord
    subpath: str | None = None
    link_sources: dict[str, Entry] = field(default_factory=dict)

    def entries(self) -> Iterator[Entry]:
        """The entries to restore, read from the store as they are needed."""
        return select_entries(iter_tree(self.store, self.record.tree), self.subpath)

    def run(
        self,
        target: Path,
        *,
        force: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[BackupRecord, RestoreResult]:
        """Restore into ``target``; returns once the restored files are synced to disk."""
        fresh = check_target(target, force)
        try:
            with synced(target):
                result = Restorer(
                    self.store, target, self.link_sources, fresh=fresh, progress=progress
                ).run(self.entries())
        except BadTree as exc:  # checked before; changed in the store since
            raise RestoreError(f"backup {self.record.id} cannot be restored: {exc}") from None
        return self.record, result


def _check_tree(store: ChunkStore, record: BackupRecord, subpath: str | None) -> RestorePlan:
    """Read the whole tree once, entry by entry: refuse a bad entry or a missing subpath
    before anything is written, and keep the files that hard links name."""
    targets: set[str] = set()
    found = not subpath
    sub = (subpath or "").strip("/")
    for entry in iter_tree(store, record.tree):
        if entry.kind is Kind.HARDLINK:
            targets.add(entry.target)
        found = found or entry.path == sub
    if not found:
        raise RestoreError(
            f"the backup has no path {subpath!r}: see `volplugin diff` or restore all"
        )
    sources: dict[str, Entry] = {}
    if targets:
        for entry in iter_tree(store, record.tree):
            if entry.path in targets and entry.kind is Kind.FILE:
                sources[entry.path] = entry
    return RestorePlan(store, record, subpath, sources)


@contextmanager
def open_restore(
    store: ChunkStore,
    ref: str,
    *,
    subpath: str | None = None,
    holder: str | None = None,
) -> Iterator[RestorePlan]:
    """Find backup ``ref``, pin its tree and check every entry, before any target exists.

    The tree is pinned (``holder`` says who for; found under the store's shared
    lock, in the same hold) until the ``with`` ends, so a prune meanwhile keeps
    its data. A tree with a bad entry raises RestoreError naming the backup and
    the path, before anything is created or written. The entries are read one
    directory node at a time, never held all at once.
    """
    backend = store.backend
    with backend.lock(exclusive=False):
        record = get_backup(backend, ref)
        pin = pins.pin(backend, record.tree, holder or f"restore of backup {record.id}")
    try:
        try:
            plan = _check_tree(store, record, subpath)
        except BadTree as exc:
            raise RestoreError(
                f"backup {record.id} (volume {record.volume!r}) cannot be restored, nothing "
                f"was written: {exc}"
            ) from None
        yield plan
    finally:
        pins.unpin(backend, pin.id)


def restore_backup(
    store: ChunkStore,
    ref: str,
    target: Path,
    *,
    subpath: str | None = None,
    force: bool = False,
    holder: str | None = None,
) -> tuple[BackupRecord, RestoreResult]:
    """Restore a backup (or the part under ``subpath``) into ``target``, durably."""
    holder = holder or f"restore of backup {ref} into {target}"
    with open_restore(store, ref, subpath=subpath, holder=holder) as plan:
        return plan.run(target, force=force)


def diff_backups(store: ChunkStore, ref_a: str, ref_b: str) -> list[Change]:
    a = get_backup(store.backend, ref_a)
    b = get_backup(store.backend, ref_b)
    return diff_trees(store, a.tree, b.tree)


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
            "keep": [{**_brief(d.backup), "reasons": d.reasons} for d in self.decisions if d.keep],
            "remove": [_brief(b) for b in self.removed],
            "objects_removed": self.gc.removed if self.gc else 0,
            "bytes_freed": self.gc.freed_bytes if self.gc else 0,
        }


def _brief(record: BackupRecord) -> dict:
    return {"id": record.id, "volume": record.volume, "time": record.time_iso, "host": record.host}


def check_grace(grace_seconds: float) -> None:
    """Refuse a grace period that is not a finite number of seconds, 0 or more."""
    if not isinstance(grace_seconds, int | float) or not 0 <= grace_seconds < math.inf:
        raise BackupError(
            f"the grace period (--grace, Grace) is {grace_seconds!r}: "
            "give a finite number of seconds, 0 or more"
        )


def prune_backups(
    store: ChunkStore,
    policy: Policy,
    *,
    volume: str | None = None,
    dry_run: bool = False,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    host: str | None = None,
    all_hosts: bool = False,
    before_forget: Callable[[int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PruneReport:
    """Forget backups the policy does not keep, then remove data nothing references.

    The policy applies to each (host, volume) group; only the backups of ``host`` (default:
    this host's id, volplugin.hostid) are looked at, those of every host with ``all_hosts``.
    ``before_forget`` gets the number of backups to forget before the first goes (it may
    raise to stop the prune with nothing changed); ``progress`` gets (forgotten, 0) after
    each one.
    """
    check_grace(grace_seconds)
    backend = store.backend
    report = PruneReport(dry_run=dry_run)
    mine = None if all_hosts else host or host_id()
    with backend.lock(exclusive=True):
        backups = [b for b in list_backups(backend, volume) if mine is None or b.host == mine]
        report.decisions = apply_per_volume(backups, policy)
        gone = {b.id for b in report.removed}
        if before_forget is not None:
            before_forget(len(gone))
        if not dry_run:
            for done, backup_id in enumerate(sorted(gone), 1):
                delete_backup(backend, backup_id)
                if progress is not None:
                    progress(done, 0)
        roots = (r for r in all_roots(backend) if not (r.kind == "backup" and r.id in gone))
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
