"""Finding a volume's directory through the plugin's state, and recording backup outcomes."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from volplugin.backup import status
from volplugin.backup.docs import BackupRecord
from volplugin.backup.restore import RestoreResult
from volplugin.backup.service import RestorePlan
from volplugin.errors import VolpluginError
from volplugin.times import now_iso
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import BackupInfo, State


def open_service(root: Path, driver: str) -> VolumeService:
    """The plugin's volumes under ``root``, read through its state database."""
    volumes = VolumeService(root, driver, State.under(root, create=False), size_budget=None)
    return status.attach(volumes)


def volume_dir(service: VolumeService, volume: str) -> Path:
    """The directory of an existing volume (raises VolumeNotFound)."""
    return service.path_of(service.get(volume).name)


def restore_into_volume(
    service: VolumeService,
    volume: str,
    plan: RestorePlan,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, RestoreResult]:
    """Restore ``plan`` into ``volume``: (the volume's directory, what was written).

    An existing volume is restored into in place (``force`` to overwrite a non-empty
    one). A new volume is first restored into a private directory in the plugin's
    trash, and becomes a volume (that directory renamed into place, then adopted by
    Create) only once the restore is complete and synced: a restore killed midway
    leaves no volume behind, and its directory goes with the trash at the next start.
    ``progress`` is handed to the restorer (backup/restore.py).
    """
    if service.state.get(volume) is not None:
        path = volume_dir(service, volume)
        return path, plan.run(path, force=force, progress=progress)[1]
    path = service.path_of(volume)  # validates the name
    service.trash_dir.mkdir(exist_ok=True)
    staging = service.trash_dir / f"restoring-{uuid.uuid4().hex}"
    try:
        result = plan.run(staging, progress=progress)[1]
        try:
            os.rename(staging, path)
        except OSError as exc:
            raise VolpluginError(
                f"volume {volume!r} appeared while it was being restored ({exc}): "
                "restore into it with --force, or pick another name"
            ) from exc
        service.create(volume, {}, adopt=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path, result


def record_outcome(
    service: VolumeService,
    volume: str,
    backup_id: str | None,
    error: str | None = None,
    *,
    detail: str | None = None,
    trigger: str | None = None,
    hooks: list[str] | None = None,
    retention: str | None = None,
    backup: BackupRecord | None = None,
) -> None:
    """Note the last backup's outcome in the volume's state (shown by `inspect`).

    ``error`` marks a failed backup; ``detail`` is a note on a successful one, whose
    record ``backup`` gives its duration and bytes. A failure keeps the last success's
    time and figures and counts one more failure (what metrics report).
    """
    now = now_iso()

    def change(old: BackupInfo | None) -> BackupInfo:
        old = old or BackupInfo()
        outcome = {
            "last_id": backup_id,
            "last_time": now,
            "outcome": "failed" if error else "ok",
            "detail": error or detail,
            "trigger": trigger,
            "hooks": hooks or None,
            "retention": retention,
        }
        if error:
            return replace(
                old, **outcome, last_success_time=old.success_time(), failures=old.failures + 1
            )
        return replace(
            old,
            **outcome,
            last_success_id=backup_id,
            last_success_time=now,
            duration=backup.duration if backup else None,
            bytes_read=backup.bytes_read if backup else None,
            bytes_stored=backup.bytes_stored if backup else None,
        )

    with contextlib.suppress(VolpluginError):  # the backup itself is what matters
        service.state.update_backup(volume, change)
