"""The snapshotter's record of every snapshot: one SQLite file, so a restart knows them all.

A snapshot has a numeric id (its directory under ``ROOT/snapshots/``), a key
(a committed snapshot's key is its name), a parent (the key of a committed
snapshot, or ""), a kind, labels, created and updated times, and for a
committed snapshot the layer of the store that holds its changes and the pin
that keeps that layer's tree alive. The rules are containerd's: keys are
unique, a parent must exist and be committed, only an active snapshot is
committed, a snapshot with children is not removed. Every change is one
SQLite transaction (synchronous=FULL).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from layerfs.catalog import LayerRecord
from layerfs.errors import LayerfsError
from layerfs.sqlitetx import immediate


class SnapshotError(LayerfsError):
    """A request containerd made cannot be done; the subclass says which gRPC code."""


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidArgument(SnapshotError):
    pass


class Kind(Enum):
    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass
class Snapshot:
    """One snapshot as recorded."""

    id: int
    key: str
    parent: str
    kind: Kind
    labels: dict[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    layer: LayerRecord | None = None  # committed: its layer in the store
    pin: str = ""  # committed: the store pin keeping the layer's tree
    chain_id: str = ""  # committed by an unpack: the layer's chain ID ("sha256:..."), else ""


SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL,
    kind TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    layer TEXT,
    pin TEXT NOT NULL DEFAULT '',
    chain_id TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""
_COLUMNS = "id, key, parent, kind, labels, created_ns, updated_ns, layer, pin, chain_id"


def _row(row: tuple) -> Snapshot:
    layer = json.loads(row[7]) if row[7] else None
    return Snapshot(
        id=row[0],
        key=row[1],
        parent=row[2],
        kind=Kind(row[3]),
        labels=json.loads(row[4]),
        created_ns=row[5],
        updated_ns=row[6],
        layer=LayerRecord(**layer) if layer else None,
        pin=row[8],
        chain_id=row[9],
    )


class Metadata:
    """The snapshots of one snapshotter root; safe to use from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(snapshots)")}
        if "chain_id" not in columns:  # a root made before chain IDs were recorded
            self._db.execute("ALTER TABLE snapshots ADD COLUMN chain_id TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, immediate(self._db) as db:
            yield db

    def find(self, key: str) -> Snapshot | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)
            ).fetchone()
        return _row(row) if row else None

    def get(self, key: str) -> Snapshot:
        found = self.find(key)
        if found is None:
            raise NotFound(f"snapshot {key} does not exist")
        return found

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id").fetchall()
        return [_row(r) for r in rows]

    def children(self, key: str) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT count(*) FROM snapshots WHERE parent = ?", (key,)
            ).fetchone()[0]

    def chain(self, key: str) -> list[Snapshot]:
        """The committed snapshot ``key`` and its ancestors, bottom first."""
        out: list[Snapshot] = []
        while key:
            snap = self.get(key)
            out.append(snap)
            key = snap.parent
        return out[::-1]

    def create(self, key: str, parent: str, kind: Kind, labels: dict[str, str]) -> Snapshot:
        """A new view or active snapshot (containerd's Prepare and View)."""
        if not key:
            raise InvalidArgument("a snapshot key must not be empty")
        now = time.time_ns()
        with self._transaction() as db:
            _check_new(db, key, parent)
            cur = db.execute(
                "INSERT INTO snapshots(key, parent, kind, labels, created_ns, updated_ns) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, parent, kind.value, json.dumps(labels), now, now),
            )
            snap_id = cur.lastrowid
        return Snapshot(snap_id, key, parent, kind, dict(labels), now, now)

    def add_committed(
        self,
        key: str,
        parent: str,
        labels: dict[str, str],
        layer: LayerRecord,
        pin: str,
        chain_id: str,
    ) -> Snapshot:
        """A committed snapshot made straight from a layer the store holds (no upper)."""
        now = time.time_ns()
        with self._transaction() as db:
            _check_new(db, key, parent)
            cur = db.execute(
                "INSERT INTO snapshots(key, parent, kind, labels, created_ns, updated_ns, layer, "
                "pin, chain_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    parent,
                    Kind.COMMITTED.value,
                    json.dumps(labels),
                    now,
                    now,
                    json.dumps(layer.__dict__),
                    pin,
                    chain_id,
                ),
            )
            snap_id = cur.lastrowid
        return Snapshot(
            snap_id, key, parent, Kind.COMMITTED, dict(labels), now, now, layer, pin, chain_id
        )

    def check_committable(self, key: str, name: str) -> Snapshot:
        """The active snapshot ``key``, if it can be committed as ``name``."""
        snap = self.get(key)
        if snap.kind is not Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key} is not active ({snap.kind.value})")
        if not name:
            raise InvalidArgument("a committed snapshot needs a name")
        if self.find(name) is not None:
            raise AlreadyExists(f"snapshot {name} already exists")
        return snap

    def commit(
        self,
        snap: Snapshot,
        name: str,
        labels: dict[str, str],
        layer: LayerRecord,
        pin: str,
        chain_id: str = "",
    ) -> Snapshot:
        """Record the active ``snap`` as the committed snapshot ``name`` holding ``layer``."""
        now = time.time_ns()
        new_labels = labels if labels else snap.labels
        with self._transaction() as db:
            row = db.execute("SELECT id, kind FROM snapshots WHERE key = ?", (snap.key,)).fetchone()
            if row is None or row[0] != snap.id:
                raise NotFound(f"snapshot {snap.key} does not exist")
            if row[1] != Kind.ACTIVE.value:
                raise FailedPrecondition(f"snapshot {snap.key} is not active ({row[1]})")
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise AlreadyExists(f"snapshot {name} already exists")
            layer_doc = json.dumps(layer.__dict__)
            db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated_ns = ?, layer = ?, "
                "pin = ?, chain_id = ? WHERE id = ?",
                (
                    name,
                    Kind.COMMITTED.value,
                    json.dumps(new_labels),
                    now,
                    layer_doc,
                    pin,
                    chain_id,
                    snap.id,
                ),
            )
        return Snapshot(
            snap.id,
            name,
            snap.parent,
            Kind.COMMITTED,
            new_labels,
            snap.created_ns,
            now,
            layer,
            pin,
            chain_id,
        )

    def remove(self, key: str) -> Snapshot:
        """Forget ``key``; refused while a snapshot names it as its parent."""
        with self._transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {key} does not exist")
            if db.execute("SELECT 1 FROM snapshots WHERE parent = ?", (key,)).fetchone():
                raise FailedPrecondition(f"cannot remove snapshot {key}: it has children")
            db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
        return _row(row)

    def update_labels(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """Set labels as containerd's Update does: ``paths`` empty or "labels" replaces
        them all; "labels.K" sets K (or removes it when ``labels`` lacks K)."""
        with self._transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {key} does not exist")
            snap = _row(row)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    name = path.removeprefix("labels.")
                    if name in labels:
                        new[name] = labels[name]
                    else:
                        new.pop(name, None)
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of snapshot {key}")
            snap.labels, snap.updated_ns = new, time.time_ns()
            db.execute(
                "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                (json.dumps(new), snap.updated_ns, snap.id),
            )
        return snap


def _check_new(db: sqlite3.Connection, key: str, parent: str) -> None:
    """Refuse a new snapshot whose key is taken or whose parent is not committed."""
    if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
        raise AlreadyExists(f"snapshot {key} already exists")
    if parent:
        row = db.execute("SELECT kind FROM snapshots WHERE key = ?", (parent,)).fetchone()
        if row is None:
            raise NotFound(f"parent snapshot {parent} does not exist")
        if row[0] != Kind.COMMITTED.value:
            raise InvalidArgument(f"parent {parent} is not a committed snapshot")
