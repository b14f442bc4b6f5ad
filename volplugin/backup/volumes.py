"""Finding a volume's directory through the plugin's state, and recording backup outcomes."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path

from volplugin.errors import VolpluginError
from volplugin.state import BackupInfo, State
from volplugin.volumes import VolumeService


def open_service(root: Path, driver: str) -> VolumeService:
    """The plugin's volumes under ``root``, read through its state database."""
    return VolumeService(root, driver, State.under(root, create=False), size_budget=None)


def volume_dir(service: VolumeService, volume: str) -> Path:
    """The directory of an existing volume (raises VolumeNotFound)."""
    return service.path_of(service.get(volume).name)


def restore_dir(service: VolumeService, volume: str) -> Path:
    """The directory of a volume to restore into, creating the volume when it is new."""
    if service.state.get(volume) is None:
        service.create(volume, {})
    return volume_dir(service, volume)


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
) -> None:
    """Note the last backup's outcome in the volume's state (shown by `inspect`).

    ``error`` marks a failed backup; ``detail`` is a note on a successful one.
    """
    info = BackupInfo(
        last_id=backup_id,
        last_time=datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        outcome="failed" if error else "ok",
        detail=error or detail,
        trigger=trigger,
        hooks=hooks or None,
        retention=retention,
    )
    with contextlib.suppress(VolpluginError):  # the backup itself is what matters
        service.state.set_backup(volume, info)
