"""What this host knows of its roaming volumes: one row per volume in the plugin's database.

``synced`` is the head backup the local directory holds (restored from it, or published
from it here), so a Mount after this host's own handover restores nothing; ``generation``
the lease generation this host last took; ``notes`` what an operator must know (the
data a takeover lost, a lease this host lost), shown by `volplugin inspect`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.sqlitetx import immediate
from volplugin.errors import StateError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS roaming_volumes (
    name TEXT PRIMARY KEY,
    synced TEXT,
    generation INTEGER,
    notes TEXT NOT NULL DEFAULT '[]',
    updated REAL NOT NULL
);
"""
MAX_NOTES = 10


@dataclass(frozen=True)
class RoamingLocal:
    name: str
    synced: str | None = None
    generation: int | None = None
    notes: list[str] = field(default_factory=list)


class RoamingState:
    """The roaming_volumes table of the plugin's state.db, through its own connection."""

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(
                path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the roaming state in {path}: {exc}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, name: str) -> RoamingLocal:
        with self._lock:
            row = self._db.execute(
                "SELECT synced, generation, notes FROM roaming_volumes WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            return RoamingLocal(name)
        return RoamingLocal(name, row[0], row[1], json.loads(row[2]))

    def _upsert(self, name: str, column: str, value: object) -> None:
        with self._lock, immediate(self._db) as db:
            db.execute(
                f"INSERT INTO roaming_volumes (name, {column}, updated) VALUES (?, ?, ?)"
                f" ON CONFLICT(name) DO UPDATE SET {column} = excluded.{column},"
                " updated = excluded.updated",
                (name, value, time.time()),
            )

    def set_synced(self, name: str, backup: str | None) -> None:
        self._upsert(name, "synced", backup)

    def set_generation(self, name: str, generation: int | None) -> None:
        self._upsert(name, "generation", generation)

    def note(self, name: str, text: str) -> None:
        notes = (self.get(name).notes + [text])[-MAX_NOTES:]
        self._upsert(name, "notes", json.dumps(notes))

    def delete(self, name: str) -> None:
        with self._lock, immediate(self._db) as db:
            db.execute("DELETE FROM roaming_volumes WHERE name = ?", (name,))
