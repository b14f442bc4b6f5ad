"""What a backup confirms right before it publishes its record.

* The chunks it reuses from its parent (the entries of unchanged files, taken
  without reading them) are still in the store: looked up cheaply, in the S3
  store's loaded pack indexes (read again first, so indexes a prune removed are
  forgotten) or with ``has_blob`` on a local store. Files whose chunks are gone
  are read again (``ParentTree.without``), so the backup is whole and the store mended.
* The store lease is still good for a third of its period (S3 stores; see
  layerfs.store.leases), so no prune can have run since the data was checked.
"""

from __future__ import annotations

from layerfs.store.backend import Backend
from layerfs.store.leases import LeaseLapsed
from volplugin.backup.errors import BackupError


def missing_reused(backend: Backend, reused: dict[str, str]) -> dict[str, str]:
    """{digest: path} of the reused chunks (``ScanResult.reused``) the store no longer has."""
    if not reused:
        return {}
    backend.refresh()  # S3: forget indexes a prune deleted
    return {d: p for d, p in reused.items() if not backend.has_blob(d)}


def check_lease(backend: Backend, volume: str) -> None:
    """Raise BackupError unless the store lease (if the store has one) is sure to last."""
    try:
        backend.check_lease()
    except LeaseLapsed as exc:
        raise not_published(volume, exc) from None


def not_published(volume: str, exc: Exception) -> BackupError:
    """The error of a backup whose lease lapsed before it could publish."""
    return BackupError(f"backup of volume {volume!r} not published: {exc}")


def missing_error(volume: str, parent_id: str, missing: dict[str, str]) -> BackupError:
    """The error of a backup whose reused chunks are still missing after reading again."""
    digest, path = next(iter(missing.items()))
    return BackupError(
        f"backup of volume {volume!r} not published: {len(missing)} chunk(s) it takes from "
        f"backup {parent_id} are missing from the store (first {digest} of {path!r}) even "
        "after reading the files again; run `volplugin verify` and back up again"
    )
