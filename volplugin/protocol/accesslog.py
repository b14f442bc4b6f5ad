"""The access log: one JSON line per request on the `volplugin.access` logger.

Observers (e.g. the request-latency metric) get the same line as a dict, whether or
not the logger is enabled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

ACCESS_LOGGER = "volplugin.access"
VOLUME_KEY = "volplugin.volume"  # WSGI environ keys the app fills in for its log line
ERROR_KEY = "volplugin.error"
SCOPE_KEY = "volplugin.scope"  # the volume of the scoped (sidekick) socket a request came by

Observer = Callable[[dict], None]  # gets each request's line: endpoint, duration_ms, outcome...


class AccessLog:
    """WSGI middleware: one JSON line per request (endpoint, volume, duration, outcome).

    It wraps the app from outside, so a line costs no hooks or context lookups of the
    framework: the app leaves the volume's name and any error in the WSGI environ.
    `observers` is a list shared with whoever adds to it later (see create_app).
    """

    def __init__(
        self, app: Callable[..., Iterable[bytes]], observers: list[Observer] | None = None
    ) -> None:
        self.app = app
        self.logger = logging.getLogger(ACCESS_LOGGER)
        self.observers: list[Observer] = observers if observers is not None else []

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        start = time.perf_counter()
        statuses: list[str] = []

        def recording(status: str, headers: list, exc_info: Any = None) -> Any:
            statuses.append(status)
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, recording)
        finally:
            logging_on = self.logger.isEnabledFor(logging.INFO)
            if logging_on or self.observers:
                line = self._line(environ, statuses, (time.perf_counter() - start) * 1000)
                for observe in self.observers:
                    try:
                        observe(line)
                    except Exception:  # a metric must never fail the request it measures
                        self.logger.exception("access-log observer %r failed", observe)
                if logging_on:
                    self._log(line)

    def _line(self, environ: dict, statuses: list[str], elapsed: float) -> dict:
        error = environ.get(ERROR_KEY)
        status = int(statuses[-1][:3]) if statuses else 500
        line = {
            "endpoint": environ.get("PATH_INFO", ""),
            "volume": environ.get(VOLUME_KEY),
            "duration_ms": round(elapsed, 2),
            "status": status,
            "outcome": "error" if error or status >= 400 else "ok",
        }
        scope = environ.get(SCOPE_KEY)
        if scope is not None:
            line["scope"] = scope
        if error:
            line["error"] = error
        return line

    def _log(self, line: dict) -> None:
        # makeRecord, not info(): info() walks the stack to find its caller.
        record = self.logger.makeRecord(
            ACCESS_LOGGER, logging.INFO, __file__, 0, json.dumps(line), None, None
        )
        self.logger.handle(record)
