"""ROOT/plugin.json: the name and store of the `volplugin serve` that uses a root.

`serve` writes it at start (atomically, mode 0600), so that CLI commands given only
`--root` act with the plugin's driver name and backup store instead of guessing them.
A backup of a plugin volume needs the right name: the containers using the volume are
found by their volumes' driver name, and with a wrong one the consistency hooks would
find no container and the backup would not be consistent.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from volplugin.defaults import DEFAULT_NAME
from volplugin.errors import StateError

RECORD_NAME = "plugin.json"


@dataclass(frozen=True)
class PluginRecord:
    """What `serve` recorded about itself in its root."""

    name: str
    store: str | None  # the backup store URL, None: the layerfs default


def record_path(root: Path) -> Path:
    return Path(root) / RECORD_NAME


def absolute_store(store: str | None) -> str | None:
    """A store URL that means the same from any working directory."""
    if store is None or "://" in store:
        return store
    return str(Path(store).absolute())


def write_record(root: Path, name: str, store: str | None) -> Path:
    """Record `name` and `store` in ROOT/plugin.json (replaced atomically, mode 0600)."""
    import tempfile

    path = record_path(root)
    doc = {"name": name, "store": absolute_store(store), "pid": os.getpid()}
    fd, tmp = tempfile.mkstemp(prefix=".plugin.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600
            json.dump(doc, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_record(root: Path) -> PluginRecord | None:
    """The record in `root`, None if there is none; StateError if it cannot be read."""
    path = record_path(root)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(
            f"cannot read {path}: {exc.strerror}; give --name and --store explicitly"
        ) from None
    try:
        doc = json.loads(text)
        name, store = doc["name"], doc.get("store")
        if not isinstance(name, str) or not name or not isinstance(store, str | None):
            raise ValueError("bad field types")
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(
            f"{path} is damaged ({exc}): restart `volplugin serve` or give --name"
        ) from None
    return PluginRecord(name=name, store=store)


def resolve_name(root: Path, explicit: str | None, *, required: bool = False) -> str:
    """The plugin name for a command on `root`: `explicit`, else the recorded one.

    Without either, the default name, unless `required` (the command needs the real
    name, as a backup's consistency hooks do): then a StateError says what to give.
    """
    if explicit:
        return explicit
    record = read_record(root)
    if record is not None:
        return record.name
    if required:
        raise StateError(
            f"no `volplugin serve` has recorded its name in {root} ({RECORD_NAME}): give "
            "--name NAME, the plugin's driver name, so that the containers using the volume "
            "are found and its consistency hooks run"
        )
    return DEFAULT_NAME


def resolve_store(root: Path | None, explicit: str | None) -> str | None:
    """The store for a command: `explicit`, else the one recorded in `root`, else None."""
    if explicit:
        return explicit
    if root is None:
        return None
    record = read_record(root)
    return record.store if record is not None else None
