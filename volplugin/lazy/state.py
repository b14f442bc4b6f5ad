"""The state of lazy volumes: one row per volume in the plugin's SQLite database.

A lazy volume moves through phases: ``filling`` (the FUSE mount serves it while the
background fill materializes the backup), ``filled`` (everything is local; the switch
waits until no container holds the mount), ``switching`` (the FUSE mount is gone and
the changes made through it are being merged; redone at start after a crash) and
``done`` (an ordinary volume; the row stays for Status). The table lives in the same
state.db as the volumes, in its own table, written through its own connection.

A row also keeps the id of the store pin (layerfs.maintenance.pins) that protects the
backup's tree from prune until the switch is over, and the fill's journal: the paths
known to be on disk (synced before they were recorded, in ``lazy_filled``) and the
boot during which the fill last wrote (see volplugin.lazy.fill).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from layerfs.sqlitetx import immediate
from volplugin.errors import StateError

PHASES = ("filling", "filled", "switching", "done")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lazy_volumes (
    name TEXT PRIMARY KEY,
    backup TEXT NOT NULL,
    tree TEXT NOT NULL,
    phase TEXT NOT NULL,
    files_done INTEGER NOT NULL DEFAULT 0,
    files_total INTEGER NOT NULL DEFAULT 0,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated REAL NOT NULL,
    pin TEXT,
    boot TEXT
);
CREATE TABLE IF NOT EXISTS lazy_filled (
    name TEXT NOT NULL,
    path BLOB NOT NULL,  -- file names need not be UTF-8: the bytes, as os.fsencode gives them
    PRIMARY KEY (name, path)
) WITHOUT ROWID;
"""
_ADDED_COLUMNS = {"pin": "TEXT", "boot": "TEXT"}  # absent from databases of older versions


@dataclass(frozen=True)
class LazyRecord:
    """One lazy volume: its backup, the backup's tree record, phase and fill progress."""

    name: str
    backup: str
    tree: str
    phase: str
    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    error: str | None = None
    updated: float = 0.0
    pin: str | None = None  # the store pin on ``tree``, until the switch is over
    boot: str | None = None  # the boot during which the fill last wrote

    @property
    def percent(self) -> float:
        if self.phase in ("switching", "done"):
            return 100.0
        if self.bytes_total:
            return round(100.0 * self.bytes_done / self.bytes_total, 1)
        return 100.0 if self.phase == "filled" else 0.0

    def to_status(self) -> dict:
        return {
            "Phase": self.phase,
            "Backup": self.backup,
            "Progress": f"{self.percent:.1f}%",
            "FilesDone": self.files_done,
            "FilesTotal": self.files_total,
            "BytesDone": self.bytes_done,
            "BytesTotal": self.bytes_total,
            "Error": self.error,
        }


_COLUMNS = ", ".join(f.name for f in fields(LazyRecord))


class LazyState:
    """The lazy_volumes table; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(
                path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(lazy_volumes)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE lazy_volumes ADD COLUMN {column} {kind}")
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the lazy volume table in {path}: {exc}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (the connection is in autocommit mode); call with the lock held."""
        with immediate(self._db):
            yield

    def get(self, name: str) -> LazyRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM lazy_volumes WHERE name = ?", (name,)
            ).fetchone()
        return LazyRecord(*row) if row else None

    def list(self) -> list[LazyRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM lazy_volumes ORDER BY name")
            return [LazyRecord(*row) for row in rows.fetchall()]

    def add(self, name: str, backup: str, tree: str, pin: str | None = None) -> LazyRecord:
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM lazy_filled WHERE name = ?", (name,))
            self._db.execute(
                "INSERT OR REPLACE INTO lazy_volumes (name, backup, tree, phase, updated, pin) "
                "VALUES (?, ?, ?, 'filling', ?, ?)",
                (name, backup, tree, time.time(), pin),
            )
        record = self.get(name)
        assert record is not None
        return record

    def set_phase(self, name: str, phase: str, error: str | None = None) -> None:
        assert phase in PHASES, phase
        with self._lock:
            self._db.execute(
                "UPDATE lazy_volumes SET phase = ?, error = ?, updated = ? WHERE name = ?",
                (phase, error, time.time(), name),
            )

    def set_error(self, name: str, error: str | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE lazy_volumes SET error = ?, updated = ? WHERE name = ?",
                (error, time.time(), name),
            )

    def set_progress(
        self, name: str, files_done: int, files_total: int, bytes_done: int, bytes_total: int
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE lazy_volumes SET files_done = ?, files_total = ?, bytes_done = ?, "
                "bytes_total = ?, updated = ? WHERE name = ?",
                (files_done, files_total, bytes_done, bytes_total, time.time(), name),
            )

    def set_pin(self, name: str, pin: str | None) -> None:
        with self._lock:
            self._db.execute("UPDATE lazy_volumes SET pin = ? WHERE name = ?", (pin, name))

    def journal(self, name: str) -> StateJournal:
        """The fill journal of ``name`` (see volplugin.lazy.fill.Journal)."""
        return StateJournal(self, name)

    def is_filled(self, name: str, path: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM lazy_filled WHERE name = ? AND path = ?", (name, os.fsencode(path))
            ).fetchone()
            return row is not None

    def add_filled(self, name: str, paths: list[str], boot: str) -> None:
        """Record ``paths`` as on disk (the caller synced them first), in one transaction."""
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO lazy_filled (name, path) VALUES (?, ?)",
                [(name, os.fsencode(path)) for path in paths],
            )
            self._db.execute("UPDATE lazy_volumes SET boot = ? WHERE name = ?", (boot, name))

    def forget_filled(self, name: str) -> None:
        """Drop the journal once the volume is an ordinary one."""
        with self._lock:
            self._db.execute("DELETE FROM lazy_filled WHERE name = ?", (name,))

    def delete(self, name: str) -> None:
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM lazy_filled WHERE name = ?", (name,))
            self._db.execute("DELETE FROM lazy_volumes WHERE name = ?", (name,))


@dataclass
class StateJournal:
    """A fill journal kept in the lazy tables: the durable paths and the last boot."""

    state: LazyState
    name: str

    def done(self, path: str) -> bool:
        return self.state.is_filled(self.name, path)

    def last_boot(self) -> str | None:
        record = self.state.get(self.name)
        return record.boot if record is not None else None

    def record(self, paths: list[str], boot: str) -> None:
        self.state.add_filled(self.name, paths, boot)
