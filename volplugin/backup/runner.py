"""One backup of a plugin volume, as the CLI, the endpoint and the scheduler take it.

The containers using the volume are quieted around the snapshot (backup/hooks.py), the
outcome is recorded in the volume's state for `inspect`, and with a retention policy the
volume's older backups are pruned afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import docker

from layerfs.errors import LayerfsError
from layerfs.store.chunks import ChunkStore
from volplugin.backup import service, volumes
from volplugin.backup.docs import BackupRecord
from volplugin.backup.hooks import Journal, Quiesce, hook_client
from volplugin.backup.retention import Policy
from volplugin.errors import VolpluginError
from volplugin.hostid import host_id
from volplugin.volumes.service import VolumeService

log = logging.getLogger("volplugin.backup.runner")


def run_backup(
    svc: VolumeService,
    store: ChunkStore,
    volume: str,
    tags: Sequence[str] = (),
    *,
    trigger: str,
    keep: Policy | None = None,
    docker_factory: Callable[[], docker.DockerClient] = hook_client,
    journal: Journal | None = None,
    check: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BackupRecord:
    """Back up `volume` with its consistency hooks; record the outcome; apply `keep`.

    A job passes its `journal` (containers quieted, for crash recovery), its cancel
    `check` (run between hook steps and before publishing) and `progress` (the scan's).
    """
    record = svc.get(volume)
    if record.options.get("roaming") == "true" and not svc.hooks.before_publish:
        raise VolpluginError(
            f"volume {volume!r} is a roaming volume: back it up through the running plugin "
            "(`volplugin backup --name ...`), which holds its lease"
        )
    directory = volumes.volume_dir(svc, volume)
    quiesce = Quiesce(
        docker_factory,
        volume,
        svc.driver,
        mounted=record.mount_count > 0,
        journal=journal,
        check=check,
    )
    try:
        with quiesce:
            backup = service.create_backup(
                store,
                volume,
                directory,
                list(tags),
                host=host_id(),
                after_snapshot=quiesce.release,
                progress=progress,
                before_publish=check,
                fence=lambda: _fence(svc, volume),
                parent_id=_parent(svc, volume),
            )
        for published in svc.hooks.published:
            published(volume, backup)
    except LayerfsError as exc:
        volumes.record_outcome(
            svc, volume, None, str(exc), trigger=trigger, hooks=quiesce.summary()
        )
        raise
    notes = [f"hook {p}" for p in quiesce.problems()]
    retention = None
    if keep is not None:
        try:
            report = service.prune_backups(store, keep, volume=volume, host=host_id())
            retention = f"kept {len(report.decisions) - len(report.removed)}, "
            retention += f"removed {len(report.removed)}"
        except LayerfsError as exc:
            log.error("volume %s: retention after backup %s failed: %s", volume, backup.id, exc)
            retention = "failed"
            notes.append(f"retention failed: {exc}")
    volumes.record_outcome(
        svc,
        volume,
        backup.id,
        detail="; ".join(notes) or None,
        trigger=trigger,
        hooks=quiesce.summary(),
        retention=retention,
        backup=backup,
    )
    return backup


def _fence(svc: VolumeService, volume: str) -> None:
    """The features' checks right before a backup of `volume` is published."""
    for check in svc.hooks.before_publish:
        check(volume)


def _parent(svc: VolumeService, volume: str) -> str | None:
    """The backup a feature wants `volume`'s next backup incremental against, if any."""
    for parent in svc.hooks.backup_parent:
        found = parent(volume)
        if found is not None:
            return found
    return None
