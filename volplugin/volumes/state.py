"""Volume state that survives restarts: a small SQLite database (WAL mode) under the root.

It holds each volume's options, creation time, backup information and the set of mount
IDs the daemon gave us. One State object is shared by the server's threads; writes run
in `BEGIN IMMEDIATE` transactions so that other processes (the CLI, backups) can use the
same file safely.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from layerfs.sqlitetx import immediate
from volplugin.errors import StateError

DB_NAME = "state.db"

log = logging.getLogger("volplugin.volumes.state")

PAGE_SIZE = 1024  # bytes; set when the database is made (see State.__init__)

_VOLUMES = """
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    options TEXT NOT NULL,
    created TEXT NOT NULL,
    backup TEXT
);
"""
# WITHOUT ROWID: the key is the table, so a Mount's commit changes one b-tree page,
# not a table page and an index page.
_MOUNTS = """
CREATE TABLE IF NOT EXISTS {table} (
    volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    id TEXT NOT NULL,
    mounted_at REAL NOT NULL,
    adopted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (volume, id)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class BackupInfo:
    """The outcome of a volume's last backup, shown in its Status."""

    last_id: str | None = None
    last_time: str | None = None
    outcome: str | None = None
    detail: str | None = None
    trigger: str | None = None  # what started it: cli, api, schedule
    hooks: list[str] | None = None  # consistency actions, e.g. "stop db: ok"
    retention: str | None = None  # what the volume's backup-keep did afterwards
    # The last successful backup, kept when later attempts fail (what metrics alert on);
    # a record written before these fields has only `last_time` with outcome "ok".
    last_success_id: str | None = None
    last_success_time: str | None = None
    duration: float | None = None  # seconds the last successful backup took
    bytes_read: int | None = None  # bytes of files it read
    bytes_stored: int | None = None  # stored (compressed) bytes of new chunks it wrote
    failures: int = 0  # failed backups of this volume since it was created

    @classmethod
    def from_json(cls, text: str | None) -> BackupInfo | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if data.get(k) is not None})

    def success_time(self) -> str | None:
        """When the volume was last backed up successfully (ISO 8601), None if never."""
        if self.last_success_time:
            return self.last_success_time
        return self.last_time if self.outcome == "ok" else None


@dataclass(frozen=True)
class VolumeRecord:
    """One volume as stored: name, normalised options, creation time (ISO 8601, UTC)."""

    name: str
    options: dict[str, str]
    created: str
    mount_ids: tuple[str, ...] = ()
    backup: BackupInfo | None = None

    @property
    def mount_count(self) -> int:
        return len(self.mount_ids)


class State:
    """Access to the state database; safe to share between threads."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        """Open (or with `create`, make) the database at `path`."""
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StateError(
                f"no volplugin state at {self.path}: check --root, or start `volplugin serve` once"
            )
        try:
            self._db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            # Small pages for small rows: each commit writes its changed pages whole to
            # the log. Only a new database takes the size; an older one keeps its own.
            self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_VOLUMES + _MOUNTS.format(table="mounts"))
            self._rebuild_old_mounts()
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state database {self.path}: {exc}") from exc
        self._lock = threading.RLock()

    def _rebuild_old_mounts(self) -> None:
        """Rebuild the mounts table of a database made before it was WITHOUT ROWID."""

        def old() -> bool:
            (sql,) = self._db.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'mounts'"
            ).fetchone()
            return "WITHOUT ROWID" not in sql.upper()

        if not old():
            return
        with immediate(self._db):
            if old():  # another process may have rebuilt it while we waited
                self._db.execute(_MOUNTS.format(table="mounts_rebuilt"))
                self._db.execute(
                    "INSERT INTO mounts_rebuilt (volume, id, mounted_at, adopted)"
                    " SELECT volume, id, mounted_at, adopted FROM mounts"
                )
                self._db.execute("DROP TABLE mounts")
                self._db.execute("ALTER TABLE mounts_rebuilt RENAME TO mounts")
                log.info("state database %s: rebuilt its mounts table", self.path)

    @classmethod
    def under(cls, root: Path, *, create: bool = True) -> State:
        return cls(Path(root) / DB_NAME, create=create)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, immediate(self._db) as db:
            yield db

    # -- volumes -------------------------------------------------------------------------

    def get(self, name: str) -> VolumeRecord | None:
        with self._lock:
            rows = self._db.execute(
                "SELECT v.name, v.options, v.created, v.backup, m.id FROM volumes v"
                " LEFT JOIN mounts m ON m.volume = v.name WHERE v.name = ?"
                " ORDER BY m.mounted_at",
                (name,),
            ).fetchall()
        if not rows:
            return None
        return self._record(rows[0][:4], [mid for *_row, mid in rows if mid is not None])

    def options(self, name: str) -> dict[str, str] | None:
        """A volume's options alone, None if there is no such volume (what Mount reads)."""
        with self._lock:
            row = self._db.execute("SELECT options FROM volumes WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else None

    def list(self) -> list[VolumeRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, options, created, backup FROM volumes ORDER BY name"
            ).fetchall()
            ids: dict[str, list[str]] = {}
            for volume, mid in self._db.execute(
                "SELECT volume, id FROM mounts ORDER BY mounted_at"
            ):
                ids.setdefault(volume, []).append(mid)
            return [self._record(row, ids.get(row[0], [])) for row in rows]

    def names(self) -> list[tuple[str, str]]:
        """Every volume's name and creation time, by name."""
        with self._lock:
            return self._db.execute("SELECT name, created FROM volumes ORDER BY name").fetchall()

    def add(self, name: str, options: dict[str, str], created: str) -> VolumeRecord:
        """Insert a volume; return the existing record instead if the name is taken."""
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO volumes (name, options, created) VALUES (?, ?, ?)",
                (name, _encode(options), created),
            )
        record = self.get(name)
        assert record is not None
        return record

    def delete(self, name: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM volumes WHERE name = ?", (name,))

    def delete_unmounted(self, name: str) -> bool:
        """Delete a volume unless it has mount IDs (checked in the same statement)."""
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM volumes WHERE name = ?"
                " AND NOT EXISTS (SELECT 1 FROM mounts WHERE volume = ?)",
                (name, name),
            )
            return cur.rowcount > 0

    def set_backup(self, name: str, info: BackupInfo | None) -> None:
        """Record the last backup of a volume (None clears it)."""
        text = json.dumps(asdict(info)) if info is not None else None
        with self._write() as db:
            db.execute("UPDATE volumes SET backup = ? WHERE name = ?", (text, name))

    def update_backup(
        self, name: str, change: Callable[[BackupInfo | None], BackupInfo]
    ) -> BackupInfo | None:
        """Replace a volume's backup information by `change(current)`, in one transaction.

        Return what was written, None if there is no such volume.
        """
        with self._write() as db:
            row = db.execute("SELECT backup FROM volumes WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            info = change(BackupInfo.from_json(row[0]))
            db.execute(
                "UPDATE volumes SET backup = ? WHERE name = ?", (json.dumps(asdict(info)), name)
            )
            return info

    # -- mounts --------------------------------------------------------------------------

    def add_mount(self, name: str, mount_id: str) -> bool:
        """Record a mount ID (a repeated ID counts once); False if the volume is gone.

        One statement, so its own transaction; the foreign key makes it fail when the
        volume was removed meanwhile.
        """
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO mounts (volume, id, mounted_at) VALUES (?, ?, ?)",
                    (name, mount_id, time.time()),
                )
            except sqlite3.IntegrityError:
                return False
        return True

    def add_mount_while(self, name: str, mount_id: str, options: dict[str, str]) -> bool:
        """Record a new mount ID of a volume whose options are still `options`.

        False when nothing was recorded: the ID was there already, or the volume is gone
        or is a new one of the same name with other options. One statement.
        """
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO mounts (volume, id, mounted_at)"
                " SELECT name, ?, ? FROM volumes WHERE name = ? AND options = ?",
                (mount_id, time.time(), name, _encode(options)),
            )
        return cur.rowcount > 0

    def forget_mount_while(self, name: str, mount_id: str, options: dict[str, str]) -> bool:
        """Forget a recorded mount ID of a volume whose options are still `options`.

        False when nothing was forgotten (see `add_mount_while`). One statement.
        """
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM mounts WHERE volume = ? AND id = ? AND EXISTS"
                " (SELECT 1 FROM volumes WHERE name = ? AND options = ?)",
                (name, mount_id, name, _encode(options)),
            )
        return cur.rowcount > 0

    def release_mount(self, name: str, mount_id: str) -> tuple[bool, int] | None:
        """Forget a mount ID; return (whether an ID went, the number left), None if no volume.

        An unknown ID releases one adopted ID (see `adopt`), since adopted IDs only stand
        for a count of running containers; otherwise it changes nothing.
        """
        with self._lock:  # the usual case, a known ID: one statement and a count
            cur = self._db.execute(
                "DELETE FROM mounts WHERE volume = ? AND id = ?", (name, mount_id)
            )
            if cur.rowcount:
                return True, self._count(name)
        with self._write() as db:
            if db.execute("SELECT 1 FROM volumes WHERE name = ?", (name,)).fetchone() is None:
                return None
            cur = db.execute(
                "DELETE FROM mounts WHERE volume = ? AND id = (SELECT id FROM mounts"
                " WHERE volume = ? AND adopted = 1 ORDER BY mounted_at LIMIT 1)",
                (name, name),
            )
            return cur.rowcount > 0, self._count(name)

    def mount_snapshot(self) -> dict[str, list[str]]:
        """The mount IDs of every volume, oldest first."""
        with self._lock:
            snap: dict[str, list[str]] = {}
            for volume, mid in self._db.execute(
                "SELECT volume, id FROM mounts ORDER BY mounted_at"
            ):
                snap.setdefault(volume, []).append(mid)
            return snap

    def adopt(self, name: str, candidates: list[str], keep: int) -> int:
        """Reconcile: of `candidates` (IDs seen in an earlier snapshot) keep only `keep`.

        IDs recorded after the snapshot are left alone. When IDs are dropped, the kept
        ones become adopted: the daemon's later Unmount of any ID releases one of them.
        Return the number of IDs dropped.
        """
        with self._write() as db:
            present = [
                mid
                for (mid,) in db.execute(
                    "SELECT id FROM mounts WHERE volume = ? ORDER BY mounted_at", (name,)
                )
                if mid in set(candidates)
            ]
            keep = max(keep, 0)
            if len(present) <= keep:
                return 0
            drop = present[: len(present) - keep]
            db.executemany(
                "DELETE FROM mounts WHERE volume = ? AND id = ?", [(name, mid) for mid in drop]
            )
            db.execute("UPDATE mounts SET adopted = 1 WHERE volume = ?", (name,))
            return len(drop)

    def clear_mounts(self, name: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM mounts WHERE volume = ?", (name,))

    # -- helpers -------------------------------------------------------------------------

    def _count(self, name: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM mounts WHERE volume = ?", (name,)).fetchone()[
            0
        ]

    @staticmethod
    def _record(row: tuple, mount_ids: list[str]) -> VolumeRecord:
        name, options, created, backup = row
        return VolumeRecord(
            name=name,
            options=json.loads(options),
            created=created,
            mount_ids=tuple(mount_ids),
            backup=BackupInfo.from_json(backup),
        )


def _encode(options: dict[str, str]) -> str:
    """Options as the volumes table stores them."""
    return json.dumps(options, sort_keys=True)
