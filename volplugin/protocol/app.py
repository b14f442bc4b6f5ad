"""The Docker volume plugin protocol (v1) as a Flask app.

Every endpoint takes a JSON POST and answers JSON; any failure is HTTP 500 with
{"Err": "..."}, which the daemon shows to the user. Each request is logged as one JSON
line (endpoint, volume, duration, outcome, process) by volplugin.protocol.accesslog.AccessLog,
which wraps the app (kept at ``app.extensions[ACCESS_EXTENSION]``, where metrics add
observers). The blueprints of the backup feature, of jobs and of roaming volumes are
registered here too; their views find the VolumeService at `current_app.config["VOLPLUGIN"]`,
the job runner at `current_app.config["VOLPLUGIN_JOBS"]` and the roaming volumes at
`current_app.config["VOLPLUGIN_ROAMING"]` (set by the server).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from volplugin.errors import BadRequest, VolpluginError
from volplugin.protocol.accesslog import ERROR_KEY, VOLUME_KEY, AccessLog
from volplugin.volumes.service import VolumeService

MAX_BODY = 64 * 1024
MAX_ID = 1024
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
ACCESS_EXTENSION = "volplugin.access"  # app.extensions key of the app's AccessLog

log = logging.getLogger("volplugin.protocol.app")


def reply(doc: dict, status: int = 200) -> Response:
    return Response(json.dumps(doc), status=status, content_type=CONTENT_TYPE)


def body() -> dict:
    """The request's JSON object; an empty body or `null` is an empty object."""
    doc = parse_object(request.get_data(cache=True))
    if isinstance(doc.get("Name"), str):
        request.environ[VOLUME_KEY] = doc["Name"]
    return doc


def parse_object(raw: bytes) -> dict:
    """A request body as a JSON object (empty or `null`: {}); BadRequest otherwise."""
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON ({exc}): send a JSON object") from None
    except RecursionError:
        raise BadRequest(
            "request body is nested too deeply to read: send a flat JSON object"
        ) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(doc).__name__}")
    return doc


def field(doc: dict, key: str, limit: int | None = None) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"request is missing the string field {key!r}")
    if limit is not None and len(value) > limit:
        raise BadRequest(f"field {key!r} is longer than {limit} characters")
    return value


def create_app(service: VolumeService) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["VOLPLUGIN"] = service
    access = AccessLog(app.wsgi_app)
    app.wsgi_app = access  # type: ignore[method-assign]
    app.extensions[ACCESS_EXTENSION] = access  # its observers: e.g. the latency metric
    _install_errors(app)
    _install_routes(app, service)
    from volplugin.backup.api import blueprint
    from volplugin.jobs.api import blueprint as jobs_blueprint
    from volplugin.roaming.api import blueprint as roaming_blueprint

    app.register_blueprint(blueprint)
    app.register_blueprint(jobs_blueprint)
    app.register_blueprint(roaming_blueprint)
    return app


def _install_routes(app: Flask, svc: VolumeService) -> None:
    def route(path: str) -> Callable[[Callable[[dict], dict]], None]:
        def register(fn: Callable[[dict], dict]) -> None:
            def view() -> Response:
                return reply(fn(body()))

            app.add_url_rule(path, endpoint=path, view_func=view, methods=["POST"])

        return register

    @route("/Plugin.Activate")
    def activate(doc: dict) -> dict:
        return {"Implements": ["VolumeDriver"]}

    @route("/VolumeDriver.Capabilities")
    def capabilities(doc: dict) -> dict:
        return {"Capabilities": {"Scope": svc.scope}}

    @route("/VolumeDriver.Create")
    def create(doc: dict) -> dict:
        svc.create(field(doc, "Name"), doc.get("Opts"))
        return {"Err": ""}

    @route("/VolumeDriver.Remove")
    def remove(doc: dict) -> dict:
        svc.remove(field(doc, "Name"))
        return {"Err": ""}

    @route("/VolumeDriver.Mount")
    def mount(doc: dict) -> dict:
        path = svc.mount(field(doc, "Name"), field(doc, "ID", MAX_ID))
        return {"Mountpoint": str(path), "Err": ""}

    @route("/VolumeDriver.Unmount")
    def unmount(doc: dict) -> dict:
        svc.unmount(field(doc, "Name"), field(doc, "ID", MAX_ID))
        return {"Err": ""}

    @route("/VolumeDriver.Path")
    def path(doc: dict) -> dict:
        record = svc.get(field(doc, "Name"))
        return {"Mountpoint": str(svc.path_of(record.name)), "Err": ""}

    @route("/VolumeDriver.Get")
    def get(doc: dict) -> dict:
        record = svc.get(field(doc, "Name"))
        return {"Volume": svc.describe(record), "Err": ""}

    @route("/VolumeDriver.List")
    def list_(doc: dict) -> dict:
        return {"Volumes": svc.listing(), "Err": ""}


def _install_errors(app: Flask) -> None:
    @app.errorhandler(VolpluginError)
    def volplugin_error(exc: VolpluginError) -> Response:
        return failed(str(exc))

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge) -> Response:
        return failed(f"request body is larger than {MAX_BODY} bytes: send a smaller request")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return failed(
            f"{request.method} {request.path}: {exc.name}; "
            "the plugin serves POST /Plugin.* and /VolumeDriver.*"
        )

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error in %s", request.path)
        return failed(f"internal error in volplugin ({type(exc).__name__}: {exc}); see its log")


def failed(message: str, doc: dict | None = None) -> Response:
    """The protocol's error answer (HTTP 500, `doc` with Err = `message`); the access log
    records `message` as the outcome."""
    request.environ[ERROR_KEY] = message
    return reply({**(doc or {}), "Err": message}, 500)
