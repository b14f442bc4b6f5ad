"""What a backup confirms right before it publishes its record: that the store
lease is still good for a third of its period (S3 stores; see
layerfs.store.leases), so no prune can have run since the backup took the lock
and looked its reused chunks up (volplugin.backup.snapshot.ParentTree).
"""

from __future__ import annotations

from layerfs.store.backend import Backend
from layerfs.store.leases import LeaseLapsed
from volplugin.backup.errors import BackupError


def check_lease(backend: Backend, volume: str) -> None:
    """Raise BackupError unless the store lease (if the store has one) is sure to last."""
    try:
        backend.check_lease()
    except LeaseLapsed as exc:
        raise not_published(volume, exc) from None


def not_published(volume: str, exc: Exception) -> BackupError:
    """The error of a backup whose lease lapsed before it could publish."""
    return BackupError(f"backup of volume {volume!r} not published: {exc}")
