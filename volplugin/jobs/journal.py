"""Containers quieted for a job, recorded durably, and putting them back after a crash.

Before a backup stops or pauses a container (backup/hooks.py) it records the container
here (table `job_quiesced` of ROOT/state.db: job, container, what was done); the record
goes once the container was started or unpaused again. A record left behind means the
plugin died (or its stop ran out of time) while the container was quiet: `put_back`
starts or unpauses it and logs one line naming the container and the job.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker

from volplugin.errors import StateError

log = logging.getLogger("volplugin.jobs.journal")

_TABLE = """
CREATE TABLE IF NOT EXISTS job_quiesced (
    job TEXT NOT NULL,
    container TEXT NOT NULL,
    name TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('stopped', 'paused')),
    volume TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (job, container)
);
"""


@dataclass(frozen=True)
class Quieted:
    """A container a job stopped or paused and has not put back yet."""

    job: str
    container: str  # its ID
    name: str
    action: str  # stopped or paused
    volume: str


class Journal:
    """The job_quiesced table on its own connection; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(
                Path(path), timeout=30, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a record must outlive a host crash
            self._db.executescript(_TABLE)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the quiesce journal in {path}: {exc}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(self, job: str, container: str, name: str, action: str, volume: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO job_quiesced (job, container, name, action, volume, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (job, container, name, action, volume, time.time()),
            )

    def clear(self, job: str, container: str) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM job_quiesced WHERE job = ? AND container = ?", (job, container)
            )

    def entries(self, jobs: set[str] | None = None) -> list[Quieted]:
        """The recorded containers (of `jobs` only, if given), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job, container, name, action, volume FROM job_quiesced ORDER BY at"
            ).fetchall()
        found = [Quieted(*row) for row in rows]
        return [q for q in found if jobs is None or q.job in jobs]

    def for_job(self, job: str) -> JobJournal:
        return JobJournal(self, job)


@dataclass(frozen=True)
class JobJournal:
    """The journal as one job's consistency hooks use it (see backup/hooks.py Quiesce)."""

    journal: Journal
    job: str

    def record(self, container: str, name: str, action: str, volume: str) -> None:
        self.journal.record(self.job, container, name, action, volume)

    def clear(self, container: str) -> None:
        self.journal.clear(self.job, container)


def put_back(
    journal: Journal,
    client_factory: Callable[[], docker.DockerClient],
    jobs: set[str] | None = None,
) -> bool:
    """Start or unpause every recorded container (of `jobs`, if given); clear each record.

    A container that is gone, or already running (or not paused), needs nothing: its record
    goes too. Returns False when the daemon could not be reached (the records stay, for a
    later try).
    """
    left = journal.entries(jobs)
    if not left:
        return True
    try:
        client = client_factory()
    except docker.errors.DockerException as exc:
        log.warning(
            "cannot reach the Docker daemon to put back %d container(s): %s", len(left), exc
        )
        return False
    try:
        for entry in left:
            if not _put_back_one(client.api, entry):
                return False
            journal.clear(entry.job, entry.container)
    finally:
        client.close()
    return True


def _put_back_one(api: docker.APIClient, entry: Quieted) -> bool:
    verb = "started" if entry.action == "stopped" else "unpaused"
    what = f"container {entry.name} ({entry.container[:12]})"
    why = f"{entry.action} by backup job {entry.job} of volume {entry.volume}"
    try:
        if entry.action == "stopped":
            api.start(entry.container)
        else:
            api.unpause(entry.container)
    except docker.errors.NotFound:
        log.warning("%s, %s, is gone: nothing to put back", what, why)
    except docker.errors.APIError as exc:
        if exc.is_server_error():
            log.warning("cannot put back %s, %s (%s); will retry", what, why, exc)
            return False
        log.warning("%s, %s, was not %s: %s", what, why, verb, exc.explanation or exc)
    except docker.errors.DockerException as exc:
        log.warning("cannot put back %s, %s (%s); will retry", what, why, exc)
        return False
    else:
        log.warning("%s, %s when the plugin stopped, was %s again", what, why, verb)
    return True
