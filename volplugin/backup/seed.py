"""`-o from=BACKUP`: a new volume starts as a restore of a backup, on any host sharing the store.

The restore runs as a VolumeService on_create hook, before Create answers; if it fails,
Create fails and the volume is not left behind (see VolumeService.create).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from layerfs.errors import LayerfsError
from layerfs.store.location import open_store
from volplugin.backup import service
from volplugin.backup.errors import BackupError
from volplugin.state import VolumeRecord
from volplugin.volumes import Hook


def restore_from_option(store_url: str | None) -> Hook:
    """An on_create hook restoring the backup named by the volume's `from` option."""

    def hook(record: VolumeRecord, path: Path) -> None:
        ref = record.options.get("from")
        if not ref or record.options.get("lazy") == "true":  # volplugin.lazy serves those
            return
        store = open_store(store_url)
        try:
            backup = service.get_backup(store.backend, ref)
            service.restore_backup(store, backup.id, path)
        except LayerfsError as exc:
            raise BackupError(
                f"volume {record.name!r}: cannot restore from backup {ref!r}: {exc}"
            ) from exc
        finally:
            with contextlib.suppress(LayerfsError):
                store.backend.close()

    return hook
