"""The access log: one JSON line per request, written in batches off the request path.

Writing each line as its request ends costs that request a system call and, under
load, a hand-off of the interpreter lock between request threads, which cost more
than the request itself. So, like nginx's `access_log ... buffer= flush=`, the lines
wait in memory and one thread writes them together, at most `interval` seconds later
and whenever the server stops (logging's shutdown flushes every handler).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

ACCESS_LOGGER = "volplugin.access"
FLUSH_SECONDS = 0.2
VOLUME_KEY = "volplugin.volume"  # WSGI environ keys the app fills in for its log line
ERROR_KEY = "volplugin.error"


class AccessLog:
    """WSGI middleware: one JSON line per request (endpoint, volume, duration, outcome).

    It wraps the app from outside, so a line costs no hooks or context lookups of the
    framework: the app leaves the volume's name and any error in the WSGI environ.
    `pid` says which serving process answered (volplugin.workers).
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.logger = logging.getLogger(ACCESS_LOGGER)

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        start = time.perf_counter()
        statuses: list[str] = []

        def recording(status: str, headers: list, exc_info: Any = None) -> Any:
            statuses.append(status)
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, recording)
        finally:
            if self.logger.isEnabledFor(logging.INFO):
                self._log(environ, statuses, (time.perf_counter() - start) * 1000)

    def _log(self, environ: dict, statuses: list[str], elapsed: float) -> None:
        error = environ.get(ERROR_KEY)
        line = {
            "endpoint": environ.get("PATH_INFO", ""),
            "volume": environ.get(VOLUME_KEY),
            "duration_ms": round(elapsed, 2),
            "status": int(statuses[-1][:3]) if statuses else 500,
            "outcome": "error" if error or not statuses else "ok",
            "pid": os.getpid(),
        }
        if error:
            line["error"] = error
        # makeRecord, not info(): info() walks the stack to find its caller.
        record = self.logger.makeRecord(
            ACCESS_LOGGER, logging.INFO, __file__, 0, json.dumps(line), None, None
        )
        self.logger.handle(record)


class BatchedStreamHandler(logging.StreamHandler):
    """A stream handler whose records are written by `flush`, many per write."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._pending: collections.deque[logging.LogRecord] = collections.deque()

    def emit(self, record: logging.LogRecord) -> None:
        self._pending.append(record)  # deque.append is atomic: no lock, no system call

    def handle(self, record: logging.LogRecord) -> bool:
        # logging.Handler.handle takes the handler's lock around emit; not needed here.
        if self.filter(record):
            self.emit(record)
        return True

    def flush(self) -> None:
        batch = []
        with contextlib.suppress(IndexError):
            while True:
                batch.append(self._pending.popleft())
        if not batch:
            return
        text = "".join(self.format(record) + self.terminator for record in batch)
        with self.lock:
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                self.handleError(batch[-1])


@contextlib.contextmanager
def batched_access_log(interval: float = FLUSH_SECONDS) -> Iterator[BatchedStreamHandler]:
    """Send the access log to stderr in batches while the block runs; flush at its end.

    The lines keep the format of the root logger's first handler, if it has one.
    """
    logger = logging.getLogger(ACCESS_LOGGER)
    handler = BatchedStreamHandler(sys.stderr)
    root_handlers = logging.getLogger().handlers
    if root_handlers and root_handlers[0].formatter is not None:
        handler.setFormatter(root_handlers[0].formatter)
    stop = threading.Event()

    def flusher() -> None:
        while not stop.wait(interval):
            handler.flush()

    thread = threading.Thread(target=flusher, name="access-log", daemon=True)
    logger.addHandler(handler)
    logger.propagate = False
    thread.start()
    try:
        yield handler
    finally:
        stop.set()
        thread.join()
        handler.flush()
        logger.removeHandler(handler)
        logger.propagate = True
