"""Backup records: the doc ``backups/<id>.json`` that names a snapshot's tree and figures."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from layerfs.errors import ObjectMissing, StoreError
from layerfs.store.backend import Backend
from volplugin.backup.errors import BackupError, BackupNotFound

PREFIX = "backups/"


@dataclass
class BackupRecord:
    """One backup of a volume (times are Unix seconds, UTC)."""

    id: str
    volume: str
    host: str
    time: float
    tree: str
    parent: str | None = None
    tags: list[str] = field(default_factory=list)
    files: int = 0
    size: int = 0  # apparent bytes of regular files
    files_read: int = 0
    bytes_read: int = 0
    bytes_new: int = 0  # plain bytes of chunks the store did not have
    bytes_stored: int = 0  # stored (compressed) bytes of those chunks
    duration: float = 0.0
    hooks: list[dict] = field(default_factory=list)  # consistency actions (backup/hooks.py)
    # paths that changed identity while read (a directory swapped for a symlink...): not in it
    skipped: list[str] = field(default_factory=list)

    @property
    def time_iso(self) -> str:
        return datetime.fromtimestamp(self.time, UTC).isoformat(timespec="seconds")

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """The keys `volplugin backups --json` promises."""
        return {
            "id": self.id,
            "time": self.time_iso,
            "volume": self.volume,
            "host": self.host,
            "files": self.files,
            "size": self.size,
            "new_bytes": self.bytes_new,
            "tags": list(self.tags),
            "skipped": len(self.skipped),
        }


def _doc_name(backup_id: str) -> str:
    return f"{PREFIX}{backup_id}.json"


def put_backup(backend: Backend, record: BackupRecord) -> None:
    backend.put_doc(_doc_name(record.id), json.dumps(record.to_json()).encode())


def delete_backup(backend: Backend, backup_id: str) -> None:
    backend.delete_doc(_doc_name(backup_id))


def _load(backend: Backend, name: str) -> BackupRecord:
    try:
        data = json.loads(backend.get_doc(name))
        known = BackupRecord.__dataclass_fields__
        return BackupRecord(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as exc:
        raise BackupError(f"backup document {name} is damaged ({exc}); remove it") from exc


def list_backups(backend: Backend, volume: str | None = None) -> list[BackupRecord]:
    """Every backup (of one volume), oldest first."""
    out = []
    for name in backend.list_docs(PREFIX):
        if name.endswith(".json"):
            record = _load(backend, name)
            if volume is None or record.volume == volume:
                out.append(record)
    return sorted(out, key=lambda r: (r.time, r.id))


def get_backup(backend: Backend, ref: str) -> BackupRecord:
    """A backup by id or unique id prefix (at least 4 characters)."""
    try:
        return _load(backend, _doc_name(ref))
    except ObjectMissing:
        pass
    except StoreError as exc:  # not a valid doc name, such as '../x'
        raise BackupNotFound(f"no backup with id {ref!r}: {exc}") from exc
    matches = [r for r in list_backups(backend) if len(ref) >= 4 and r.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise BackupNotFound(f"backup id prefix {ref!r} is ambiguous: give more characters")
    raise BackupNotFound(
        f"no backup with id {ref!r} in the store {backend.url}: see `volplugin backups`"
    )
