"""What a sidekick socket lets through: a WSGI guard in front of the plugin's app, for one volume.

A scoped socket serves only these requests, and only for its volume V (of this host):

    /Plugin.Activate                 the handshake (a health probe); it changes nothing
    /Backup.Create {Volume: V}       back V up
    /Backup.List   {Volume: V?}      V's backups taken by this host (Volume may be left out)
    /Backup.Restore {Backup, Volume: V, Path?, Force?}
                                     Backup must be a backup of V by this host, looked up
                                     in the store's backup records (id or unique prefix;
                                     passed on as the full id, so the app restores that one)
    /Jobs.List {Volume: V?}          V's jobs
    /Jobs.Get {ID}, /Jobs.Cancel {ID}
                                     only a job whose Volume is V, as the app's own
                                     /Jobs.Get answers it

Everything else (VolumeDriver.*, Prune, Diff, Verify, other volumes, other hosts'
backups) is refused with {"Err": ...} naming the scope. The guard reads the request
body itself, checks it against the store and the app, and hands the app the body it
checked. `ScopeGuard.checks` is the allow-list: an endpoint and its check.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from typing import Any

from layerfs.errors import LayerfsError
from volplugin.backup.docs import BackupRecord, get_backup
from volplugin.errors import VolpluginError
from volplugin.hostid import host_id
from volplugin.protocol.accesslog import ERROR_KEY, SCOPE_KEY, AccessLog, Observer
from volplugin.protocol.app import CONTENT_TYPE, MAX_BODY
from volplugin.sidekick.paths import OPTION, wants_socket
from volplugin.volumes.service import VolumeService

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]


class Refused(VolpluginError):
    """A request a scoped socket does not serve."""


class ScopeGuard:
    """WSGI middleware that lets only volume `volume`'s own requests reach `app`."""

    def __init__(
        self,
        app: WSGIApp,
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
            "/Backup.List": self._own_volume_or_default,
            "/Backup.Restore": self._restore,
            "/Jobs.List": self._own_volume_or_default,
            "/Jobs.Get": self._own_job,
            "/Jobs.Cancel": self._own_job,
        }
        self.answers: dict[str, Callable[[dict], dict]] = {"/Backup.List": self._this_host}

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
        rewrite = self.answers.get(endpoint)
        if rewrite is None:
            return self.app(environ, start_response)
        return self._rewritten(environ, start_response, rewrite)

    def _refuse(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = json.dumps({"Err": environ[ERROR_KEY]}).encode()
        start_response(
            "500 Internal Server Error",
            [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))],
        )
        return [body]

    def _rewritten(
        self, environ: dict, start_response: Callable[..., Any], rewrite: Callable[[dict], dict]
    ) -> Iterable[bytes]:
        """Call the app and pass its JSON answer through `rewrite` (if it succeeded)."""
        seen: list[tuple[str, list]] = []

        def capture(status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
            seen[:] = [(status, headers)]
            return lambda data: None

        answer = self.app(environ, capture)
        try:
            body = b"".join(answer)
        finally:
            close = getattr(answer, "close", None)
            if close is not None:
                close()
        status, headers = seen[0]
        if status.startswith("200"):
            body = json.dumps(rewrite(json.loads(body))).encode()
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
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
        try:
            doc = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):
            raise Refused("request body is not valid JSON: send a JSON object") from None
        if not isinstance(doc, dict):
            raise Refused("request body must be a JSON object")
        return check(doc)

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
        """Let a job request through if the app's /Jobs.Get says the job is this volume's."""
        job_id = doc.get("ID")
        if not isinstance(job_id, str) or not job_id:
            raise Refused("request is missing the string field 'ID'")
        status, answer = self._ask_app("/Jobs.Get", {"ID": job_id})
        if status != 200:
            raise Refused(f"{self._scope()}: job {job_id!r}: {answer.get('Err') or status}")
        volume = (answer.get("Job") or {}).get("Volume")
        if volume != self.volume:
            raise Refused(f"{self._scope()}: job {job_id!r} is not a job of that volume")
        return doc

    def _ask_app(self, endpoint: str, doc: dict) -> tuple[int, dict]:
        """POST `doc` to the app in-process; (HTTP status, JSON answer)."""
        from werkzeug.test import EnvironBuilder, run_wsgi_app

        environ = EnvironBuilder(
            path=endpoint, method="POST", data=json.dumps(doc), content_type=CONTENT_TYPE
        ).get_environ()
        environ[SCOPE_KEY] = self.volume
        answer, status, _headers = run_wsgi_app(self.app, environ, buffered=True)
        try:
            body = b"".join(answer)
        finally:
            close = getattr(answer, "close", None)
            if close is not None:
                close()
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {}
        return int(status[:3]), parsed if isinstance(parsed, dict) else {}

    def _this_host(self, answer: dict) -> dict:
        """A /Backup.List answer cut to this host's backups."""
        mine = host_id()
        backups = [b for b in answer.get("Backups") or [] if b.get("host") == mine]
        return {**answer, "Backups": backups}
