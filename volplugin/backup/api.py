"""Backup endpoints served on the plugin socket, as a Flask blueprint.

JSON POSTs like the volume protocol: /Backup.Create {Volume, Tags}, /Backup.List
{Volume?}, /Backup.Restore {Backup, Volume, Path?, Force?}, /Backup.Diff {A, B},
/Backup.Prune {KeepLast, KeepHourly, KeepDaily, KeepWeekly, KeepMonthly,
KeepYearly, Volume?, DryRun?, Grace?, AllHosts?} and /Backup.Verify {ReadData?, Subset?,
Volume?}. Failures answer HTTP 500 with {"Err": message}; so does a verify that
finds damage (with its report under "Verify"). The views find the
plugin's VolumeService at ``current_app.config["VOLPLUGIN"]`` and the store URL
at ``current_app.config["LAYERFS_STORE"]`` (default: as for layerfs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from flask import Blueprint, Response, current_app

from layerfs.errors import LayerfsError
from layerfs.maintenance.gc import DEFAULT_GRACE_SECONDS
from layerfs.store.chunks import ChunkStore
from layerfs.store.location import open_store
from volplugin.backup import service, volumes
from volplugin.backup.errors import BackupError
from volplugin.backup.retention import Policy
from volplugin.backup.runner import run_backup
from volplugin.errors import BadRequest, VolpluginError
from volplugin.protocol.app import body, field, reply
from volplugin.volumes.service import VolumeService

blueprint = Blueprint("backup", __name__)


def _store() -> ChunkStore:
    return open_store(current_app.config.get("LAYERFS_STORE"))


def _volumes() -> VolumeService:
    return current_app.config["VOLPLUGIN"]


def _int(doc: dict, key: str, default: int = 0) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"field {key!r} must be an integer")
    return value


def _number(doc: dict, key: str, default: float) -> float:
    value = doc.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadRequest(f"field {key!r} must be a number")
    return float(value)


def _optional_str(doc: dict, key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string")
    return value or None


def endpoint(path: str) -> Callable[[Callable[[dict], dict]], Callable[[], Response]]:
    """Register a JSON POST view; store errors become {"Err": ...} like plugin errors."""

    def register(fn: Callable[[dict], dict]) -> Callable[[], Response]:
        @functools.wraps(fn)
        def view() -> Response:
            try:
                doc = fn(body())
            except VolpluginError:
                raise
            except LayerfsError as exc:
                raise BackupError(str(exc)) from exc
            err = doc.pop("Err", "")
            return reply({**doc, "Err": err}, 500 if err else 200)

        blueprint.add_url_rule(path, endpoint=fn.__name__, view_func=view, methods=["POST"])
        return view

    return register


@endpoint("/Backup.Create")
def create(doc: dict) -> dict:
    name = field(doc, "Volume")
    tags = doc.get("Tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadRequest("field 'Tags' must be a list of strings")
    svc = _volumes()
    svc.get(name)  # an unknown volume is an error of its own, not a failed backup
    try:
        store = _store()
    except LayerfsError as exc:  # before any hook: nothing was stopped; inspect shows it
        volumes.record_outcome(svc, name, None, str(exc), trigger="api", hooks=[])
        raise
    try:
        record = run_backup(svc, store, name, tags, trigger="api")
    finally:
        store.backend.close()
    return {"Backup": record.to_json()}


@endpoint("/Backup.List")
def list_(doc: dict) -> dict:
    records = service.list_backups(_store().backend, _optional_str(doc, "Volume"))
    return {"Backups": [r.summary() for r in records]}


@endpoint("/Backup.Restore")
def restore(doc: dict) -> dict:
    store = _store()
    with service.open_restore(
        store, field(doc, "Backup"), subpath=_optional_str(doc, "Path")
    ) as plan:  # the backup is found and checked before a volume is created
        target, result = volumes.restore_into_volume(
            _volumes(), field(doc, "Volume"), plan, force=bool(doc.get("Force", False))
        )
        record = plan.record
    return {
        "Restore": {
            "id": record.id,
            "target": str(target),
            "entries": result.entries,
            "files": result.files,
            "bytes": result.bytes,
        }
    }


@endpoint("/Backup.Diff")
def diff(doc: dict) -> dict:
    changes = service.diff_backups(_store(), field(doc, "A"), field(doc, "B"))
    return {"Changes": [c.to_json() for c in changes]}


@endpoint("/Backup.Prune")
def prune(doc: dict) -> dict:
    policy = Policy(
        last=_int(doc, "KeepLast"),
        hourly=_int(doc, "KeepHourly"),
        daily=_int(doc, "KeepDaily"),
        weekly=_int(doc, "KeepWeekly"),
        monthly=_int(doc, "KeepMonthly"),
        yearly=_int(doc, "KeepYearly"),
    )
    report = service.prune_backups(
        _store(),
        policy,
        volume=_optional_str(doc, "Volume"),
        dry_run=bool(doc.get("DryRun", False)),
        grace_seconds=_number(doc, "Grace", DEFAULT_GRACE_SECONDS),
        all_hosts=bool(doc.get("AllHosts", False)),
    )
    return {"Prune": report.to_json()}


@endpoint("/Backup.Verify")
def verify(doc: dict) -> dict:
    subset = _number(doc, "Subset", 100.0)
    if not 0 < subset <= 100:
        raise BadRequest("field 'Subset' must be a percentage in (0, 100]")
    report = service.verify_backups(
        _store(),
        read_data=bool(doc.get("ReadData", False)),
        subset_percent=subset,
        volume=_optional_str(doc, "Volume"),
    )
    if not report.ok:
        owners = ", ".join(report.damaged_owners()) or "unreferenced objects"
        return {"Verify": report.to_json(), "Err": f"damage found in {owners}"}
    return {"Verify": report.to_json()}
