"""What a sidekick socket lets through: a WSGI guard in front of the plugin's app, for one volume.

A scoped socket serves only these requests, and only for its volume V (of this host):

    /Plugin.Activate                 the handshake (a health probe); it changes nothing
    /Backup.Create {Volume: V}       back V up
    /Backup.List   {Volume: V?}      V's backups taken by this host (Volume may be left out;
                                     Host is set to this host)
    /Backup.Restore {Backup, Volume: V, Path?, Force?}
                                     Backup must be a backup of V by this host, looked up
                                     in the store's backup records (id or unique prefix;
                                     passed on as the full id, so the app restores that one)
    /Jobs.List {Volume: V?}          V's jobs
    /Jobs.Get {ID}, /Jobs.Cancel {ID}
                                     only a job whose Volume is V, as the jobs table says

Everything else (VolumeDriver.*, Prune, Diff, Verify, other volumes, other hosts'
backups) is refused with {"Err": ...} naming the scope. The guard reads the request
body itself, checks it against the store and the jobs table, and hands the app the body
it checked. `ScopeGuard.checks` is the allow-list: an endpoint and its check.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from layerfs.errors import LayerfsError
from volplugin.backup.docs import BackupRecord, get_backup
from volplugin.errors import VolpluginError
from volplugin.hostid import host_id
from volplugin.jobs.table import NoSuchJob
from volplugin.protocol.accesslog import ERROR_KEY, SCOPE_KEY, AccessLog, Observer
from volplugin.protocol.app import CONTENT_TYPE, MAX_BODY, parse_object
from volplugin.sidekick.paths import OPTION, wants_socket
from volplugin.volumes.service import VolumeService

if TYPE_CHECKING:
    from flask import Flask


class Refused(VolpluginError):
    """A request a scoped socket does not serve."""


class ScopeGuard:
    """WSGI middleware that lets only volume `volume`'s own requests reach `app`."""

    def __init__(
        self,
        app: Flask,
        volume: str,
        service: VolumeService,
        store: str | None,
        observers: list[Observer] | None = None,
    ) -> None:
        self.app = app
        self.volume = volume
        self.service = service
        self.store = store
        self.refusals = AccessLog(self._refuse, observers)  # logged like the app's requests
        self.checks: dict[str, Callable[[dict], dict]] = {
            "/Plugin.Activate": lambda doc: doc,
            "/Backup.Create": self._own_volume,
            "/Backup.List": self._own_backups,
            "/Backup.Restore": self._restore,
            "/Jobs.List": self._own_volume_or_default,
            "/Jobs.Get": self._own_job,
            "/Jobs.Cancel": self._own_job,
        }

    # -- WSGI ----------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ[SCOPE_KEY] = self.volume
        endpoint = environ.get("PATH_INFO", "")
        try:
            raw = environ["wsgi.input"].read(MAX_BODY + 1)
            doc = self._check(environ.get("REQUEST_METHOD", ""), endpoint, raw)
        except VolpluginError as exc:
            environ[ERROR_KEY] = str(exc)
            return self.refusals(environ, start_response)
        except LayerfsError as exc:  # the store could not be asked
            environ[ERROR_KEY] = f"{self._scope()}: cannot check the request ({exc})"
            return self.refusals(environ, start_response)
        checked = json.dumps(doc).encode()
        environ["wsgi.input"] = io.BytesIO(checked)
        environ["CONTENT_LENGTH"] = str(len(checked))
        return self.app(environ, start_response)

    def _refuse(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = json.dumps({"Err": environ[ERROR_KEY]}).encode()
        start_response(
            "500 Internal Server Error",
            [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))],
        )
        return [body]

    # -- checks --------------------------------------------------------------------------

    def _scope(self) -> str:
        return f"this socket is scoped to volume {self.volume!r} ({OPTION})"

    def _check(self, method: str, endpoint: str, raw: bytes) -> dict:
        check = self.checks.get(endpoint)
        if check is None or method != "POST":
            raise Refused(
                f"{self._scope()}: {method} {endpoint} is not allowed; it serves POST "
                f"{', '.join(self.checks)} for that volume only"
            )
        options = self.service.state.options(self.volume)
        if options is None or not wants_socket(options):
            raise Refused(f"{self._scope()}: that volume is gone")
        if len(raw) > MAX_BODY:
            raise Refused(f"request body is larger than {MAX_BODY} bytes: send a smaller request")
        return check(parse_object(raw))

    def _own_volume(self, doc: dict) -> dict:
        volume = doc.get("Volume")
        if volume != self.volume:
            what = f"volume {volume!r}" if volume else "a request without a Volume"
            raise Refused(f"{self._scope()}: it cannot act on {what}")
        return doc

    def _own_volume_or_default(self, doc: dict) -> dict:
        if doc.get("Volume") is None:
            return {**doc, "Volume": self.volume}
        return self._own_volume(doc)

    def _own_backups(self, doc: dict) -> dict:
        return {**self._own_volume_or_default(doc), "Host": host_id()}

    def _restore(self, doc: dict) -> dict:
        self._own_volume(doc)
        ref = doc.get("Backup")
        if not isinstance(ref, str) or not ref:
            raise Refused("request is missing the string field 'Backup'")
        return {**doc, "Backup": self._own_backup(ref).id}

    def _own_backup(self, ref: str) -> BackupRecord:
        """The backup `ref` names, if it is one of this volume's by this host."""
        from layerfs.store.location import open_store

        store = open_store(self.store)
        try:
            try:
                record = get_backup(store.backend, ref)
            except LayerfsError as exc:
                raise Refused(f"{self._scope()}: {exc}") from None
        finally:
            store.backend.close()
        if record.volume != self.volume:
            raise Refused(
                f"{self._scope()}: backup {record.id} is a backup of volume {record.volume!r}"
            )
        if record.host != host_id():
            raise Refused(
                f"{self._scope()}: backup {record.id} was taken on host {record.host!r}, "
                f"not on this host {host_id()!r}"
            )
        return record

    def _own_job(self, doc: dict) -> dict:
        """Let a job request through if the jobs table says the job is this volume's."""
        job_id = doc.get("ID")
        if not isinstance(job_id, str) or not job_id:
            raise Refused("request is missing the string field 'ID'")
        jobs = self.app.config.get("VOLPLUGIN_JOBS")
        if jobs is None:
            raise Refused(f"{self._scope()}: this plugin runs no jobs")
        try:
            job = jobs.table.get(job_id)
        except NoSuchJob as exc:
            raise Refused(f"{self._scope()}: job {job_id!r}: {exc}") from None
        if job.volume != self.volume:
            raise Refused(f"{self._scope()}: job {job_id!r} is not a job of that volume")
        return doc
