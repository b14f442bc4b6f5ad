"""Backup endpoints served on the plugin socket, as a Flask blueprint.

JSON POSTs like the volume protocol. /Backup.Create {Volume, Tags?, Wait?},
/Backup.Restore {Backup, Volume, Path?, Force?, Wait?} and /Backup.Prune {KeepLast,
KeepHourly, KeepDaily, KeepWeekly, KeepMonthly, KeepYearly, Volume?, DryRun?, Grace?,
AllHosts?, Wait?} check their request, start a job (backup/tasks.py, run by
volplugin/jobs) and answer {"Job": JOB} at once, or with Wait once the job has ended
(HTTP 500 with its Error as Err if it did not succeed); a volume with a queued or running
job refuses another one. /Backup.List {Volume?, Host?}, /Backup.Diff {A, B} and /Backup.Verify
{ReadData?, Subset?, Volume?} answer synchronously. Failures answer HTTP 500 with
{"Err": message}; so does a verify that finds damage (with its report under "Verify").
The views find the plugin's VolumeService at ``current_app.config["VOLPLUGIN"]``, the
job runner at ``current_app.config["VOLPLUGIN_JOBS"]`` and the store URL at
``current_app.config["LAYERFS_STORE"]`` (default: as for layerfs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from flask import Blueprint, Response, current_app

from layerfs.errors import LayerfsError
from layerfs.maintenance.gc import DEFAULT_GRACE_SECONDS
from layerfs.store.chunks import ChunkStore
from layerfs.store.location import open_store
from volplugin.backup import service, tasks
from volplugin.backup.errors import BackupError
from volplugin.backup.retention import Policy, apply_per_volume
from volplugin.errors import BadRequest, VolpluginError
from volplugin.jobs import api as jobs_api
from volplugin.protocol.app import body, failed, field, reply
from volplugin.volumes.service import VolumeService

blueprint = Blueprint("backup", __name__)


def _store_url() -> str | None:
    return current_app.config.get("LAYERFS_STORE")


def _store() -> ChunkStore:
    return open_store(_store_url())


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
            return failed(err, doc) if err else reply({**doc, "Err": ""})

        blueprint.add_url_rule(path, endpoint=fn.__name__, view_func=view, methods=["POST"])
        return view

    return register


@blueprint.route("/Backup.Create", methods=["POST"])
def create() -> Response:
    doc = body()
    wait = jobs_api.wait_flag(doc)
    name = field(doc, "Volume")
    tags = doc.get("Tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadRequest("field 'Tags' must be a list of strings")
    svc = _volumes()
    svc.get(name)  # an unknown volume is an error of its own, not a failed backup
    work = tasks.backup_job(svc, _store_url(), name, tags, trigger="api")
    job = jobs_api.runner().submit("backup", name, work, {"Volume": name, "Tags": tags})
    return jobs_api.started(job, wait)


@endpoint("/Backup.List")
def list_(doc: dict) -> dict:
    records = service.list_backups(_store().backend, _optional_str(doc, "Volume"))
    host = _optional_str(doc, "Host")
    return {"Backups": [r.summary() for r in records if host is None or r.host == host]}


@blueprint.route("/Backup.Restore", methods=["POST"])
def restore() -> Response:
    doc = body()
    wait = jobs_api.wait_flag(doc)
    ref, name = field(doc, "Backup"), field(doc, "Volume")
    subpath, force = _optional_str(doc, "Path"), bool(doc.get("Force", False))
    svc = _volumes()
    svc.path_of(name)  # a bad name is refused now, not by the job
    work = tasks.restore_job(svc, _store_url(), ref, name, subpath=subpath, force=force)
    request = {"Backup": ref, "Volume": name, "Path": subpath, "Force": force}
    job = jobs_api.runner().submit("restore", name, work, request)
    return jobs_api.started(job, wait)


@endpoint("/Backup.Diff")
def diff(doc: dict) -> dict:
    changes = service.diff_backups(_store(), field(doc, "A"), field(doc, "B"))
    return {"Changes": [c.to_json() for c in changes]}


@blueprint.route("/Backup.Prune", methods=["POST"])
def prune() -> Response:
    doc = body()
    wait = jobs_api.wait_flag(doc)
    policy = Policy(
        last=_int(doc, "KeepLast"),
        hourly=_int(doc, "KeepHourly"),
        daily=_int(doc, "KeepDaily"),
        weekly=_int(doc, "KeepWeekly"),
        monthly=_int(doc, "KeepMonthly"),
        yearly=_int(doc, "KeepYearly"),
    )
    apply_per_volume([], policy)  # an empty or negative policy is refused now
    grace = _number(doc, "Grace", DEFAULT_GRACE_SECONDS)
    service.check_grace(grace)
    volume = _optional_str(doc, "Volume")
    dry_run, all_hosts = bool(doc.get("DryRun", False)), bool(doc.get("AllHosts", False))
    work = tasks.prune_job(
        _store_url(),
        policy,
        volume=volume,
        dry_run=dry_run,
        grace_seconds=grace,
        all_hosts=all_hosts,
    )
    request = {**vars(policy), "Volume": volume, "DryRun": dry_run, "Grace": grace}
    job = jobs_api.runner().submit("prune", volume, work, {**request, "AllHosts": all_hosts})
    return jobs_api.started(job, wait)


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
