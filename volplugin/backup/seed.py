"""`-o from=BACKUP`: a new volume starts as a restore of a backup, on any host sharing the store.

The restore runs as a VolumeService on_create hook, before Create answers; if it fails,
Create fails and the volume is not left behind (see VolumeService.create).

The volume's record is committed before the hook runs, so a plugin killed during the
restore would leave a record whose directory is half restored. A volume made from a
backup therefore counts as complete only once the table ``seed_restores`` (in the
plugin's state database; its rows go with the volume's) says ``done``, written after
the restore was synced to disk (``service.restore_backup`` ends with syncfs). At
start, before the plugin serves, ``resume_interrupted`` restores every volume that
lacks it again into an emptied directory; if that fails, the volume is removed (its
record and directory) with the error logged, so the next Create of that name
restores it afresh. Either way, a half-restored volume is never served.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from layerfs.errors import LayerfsError
from layerfs.sqlitetx import immediate
from layerfs.store.location import open_store
from volplugin.backup import service
from volplugin.backup.errors import BackupError
from volplugin.errors import StateError, VolpluginError
from volplugin.volumes.service import Hook, VolumeService, apply_root_options
from volplugin.volumes.state import VolumeRecord

log = logging.getLogger("volplugin.seed")

_TABLE = "seed_restores"
_SCHEMA = f"""
CREATE TABLE {_TABLE} (
    name TEXT PRIMARY KEY REFERENCES volumes(name) ON DELETE CASCADE,
    backup TEXT NOT NULL,
    phase TEXT NOT NULL,
    updated REAL NOT NULL
);
"""
RESTORING, DONE = "restoring", "done"


def seeded(options: dict[str, str]) -> bool:
    """Whether a volume with these options is made by restoring a backup at Create."""
    return bool(options.get("from")) and options.get("lazy") != "true"


class SeedState:
    """The ``seed_restores`` table: which `from=` volumes are restored completely."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state database {self.db_path}: {exc}") from exc
        try:
            db.execute("PRAGMA foreign_keys=ON")
            with immediate(db):
                self._ensure(db)
                yield db
        except sqlite3.Error as exc:
            raise StateError(f"state database {self.db_path}: {exc}") from exc
        finally:
            db.close()

    @staticmethod
    def _ensure(db: sqlite3.Connection) -> None:
        """Make the table; volumes made from backups before it existed count as done."""
        found = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_TABLE,)
        ).fetchone()
        if found:
            return
        db.execute(_SCHEMA)
        now = time.time()
        for name, text in db.execute("SELECT name, options FROM volumes").fetchall():
            options = _options(text)
            if seeded(options):
                db.execute(
                    f"INSERT INTO {_TABLE} VALUES (?, ?, ?, ?)", (name, options["from"], DONE, now)
                )

    def set(self, name: str, backup: str, phase: str) -> None:
        with self._write() as db:
            db.execute(
                f"INSERT OR REPLACE INTO {_TABLE} VALUES (?, ?, ?, ?)",
                (name, backup, phase, time.time()),
            )

    def unfinished(self) -> list[tuple[str, dict[str, str]]]:
        """(name, options) of every `from=` volume whose restore is not done."""
        with self._write() as db:
            rows = db.execute(
                f"SELECT v.name, v.options FROM volumes v LEFT JOIN {_TABLE} s"
                " ON s.name = v.name WHERE s.phase IS NOT ? ORDER BY v.name",
                (DONE,),
            ).fetchall()
        return [(name, opts) for name, text in rows if seeded(opts := _options(text))]


def _options(text: str) -> dict[str, str]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _restore(store_url: str | None, name: str, ref: str, path: Path, seeds: SeedState) -> None:
    """Restore backup ``ref`` into the empty ``path`` of volume ``name``, then mark it done."""
    store = open_store(store_url)
    try:
        backup = service.get_backup(store.backend, ref)
        seeds.set(name, backup.id, RESTORING)
        service.restore_backup(
            store, backup.id, path, holder=f"volume {name!r} created from backup {backup.id}"
        )
        seeds.set(name, backup.id, DONE)  # restore_backup synced the files first
    except LayerfsError as exc:
        raise BackupError(f"volume {name!r}: cannot restore from backup {ref!r}: {exc}") from exc
    finally:
        with contextlib.suppress(LayerfsError):
            store.backend.close()


def restore_from_option(store_url: str | None, seeds: SeedState) -> Hook:
    """An on_create hook restoring the backup named by the volume's `from` option."""

    def hook(record: VolumeRecord, path: Path) -> None:
        if not seeded(record.options):  # lazy volumes: volplugin.lazy.volumes serves those
            return
        _restore(store_url, record.name, record.options["from"], path, seeds)

    return hook


def attach(volumes: VolumeService, store_url: str | None) -> SeedState:
    """Restore `-o from=` backups into new volumes of ``volumes`` (an on_create hook)."""
    seeds = SeedState(volumes.state.path)
    volumes.hooks.on_create.append(restore_from_option(store_url, seeds))
    return seeds


def resume_interrupted(volumes: VolumeService, store_url: str | None) -> None:
    """Redo `-o from=` restores that a stop interrupted; remove the volumes that fail.

    Run at start, before the plugin serves (nothing uses those volumes yet).
    """
    seeds = SeedState(volumes.state.path)
    for name, options in seeds.unfinished():
        path = volumes.path_of(name)
        log.warning(
            "volume %s: its restore from backup %s was interrupted; restoring it again",
            name,
            options["from"],
        )
        with volumes.lock:
            if volumes.state.get(name) is None:
                continue  # removed meanwhile
            try:
                shutil.rmtree(volumes.to_trash(name, path), ignore_errors=True)
                path.mkdir(mode=0o755)
                apply_root_options(path, options, True)
                _restore(store_url, name, options["from"], path, seeds)
                apply_root_options(path, options, False)
                log.info("volume %s: restore from backup %s completed", name, options["from"])
                continue
            except (VolpluginError, LayerfsError, OSError) as exc:
                log.error(
                    "volume %s: the interrupted restore from backup %s failed again (%s); "
                    "removing the volume: create it again to retry",
                    name,
                    options["from"],
                    exc,
                )
            volumes.state.delete(name)
            shutil.rmtree(volumes.to_trash(name, path), ignore_errors=True)
