"""The `jobs` table of the state database: one row per job, and its state transitions.

A job is queued, then running, then succeeded, failed or cancelled; a queued job may be
cancelled before it runs; a job that was queued or running when the plugin died is
marked interrupted at the next start. At most one queued or running job names a volume,
and a job without a volume (a prune of every volume) excludes every other one: the check
and the insert are one `BEGIN IMMEDIATE` transaction. The table lives in ROOT/state.db
beside the volumes' tables, on a connection of its own.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.sqlitetx import immediate
from volplugin.errors import StateError, VolpluginError
from volplugin.times import now_iso

KINDS = ("backup", "restore", "prune")
ACTIVE = ("queued", "running")
ENDED = ("succeeded", "failed", "cancelled", "interrupted")
FINISHED_SHOWN = 50  # finished jobs Jobs.List shows without All
FINISHED_KEPT = 1000  # finished jobs kept in the table (older ones go at start)

_JOBS = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    volume TEXT,
    state TEXT NOT NULL,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    progress TEXT NOT NULL,
    result TEXT,
    error TEXT,
    request TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (state) WHERE state IN ('queued', 'running');
"""
_COLUMNS = "id, kind, volume, state, created, started, finished, progress, result, error"


class JobBusy(VolpluginError):
    """A job was refused: its volume (or the store, for a prune) has a queued or running job."""


class NoSuchJob(VolpluginError):
    """No job has that ID."""


class JobEnded(VolpluginError):
    """A job that has ended cannot be cancelled."""


def new_id() -> str:
    return f"j-{secrets.token_hex(6)}"


@dataclass
class Progress:
    """How far a job is: files and bytes done, and the totals when known."""

    files: int = 0
    bytes: int = 0
    total_files: int | None = None
    total_bytes: int | None = None

    def to_json(self) -> dict:
        return {
            "Files": self.files,
            "Bytes": self.bytes,
            "TotalFiles": self.total_files,
            "TotalBytes": self.total_bytes,
        }

    @classmethod
    def from_json(cls, doc: dict) -> Progress:
        return cls(doc["Files"], doc["Bytes"], doc.get("TotalFiles"), doc.get("TotalBytes"))


@dataclass
class Job:
    """One job as stored; `to_json` is the JOB document of the API."""

    id: str
    kind: str
    volume: str | None
    state: str
    created: str
    started: str | None = None
    finished: str | None = None
    progress: Progress = field(default_factory=Progress)
    result: dict | None = None
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_json(self) -> dict:
        return {
            "ID": self.id,
            "Kind": self.kind,
            "Volume": self.volume,
            "State": self.state,
            "Created": self.created,
            "Started": self.started,
            "Finished": self.finished,
            "Progress": self.progress.to_json(),
            "Result": self.result,
            "Error": self.error,
        }

    @classmethod
    def from_row(cls, row: tuple) -> Job:
        id_, kind, volume, state, created, started, finished, progress, result, error = row
        return cls(
            id_,
            kind,
            volume,
            state,
            created,
            started,
            finished,
            Progress.from_json(json.loads(progress)),
            json.loads(result) if result else None,
            error,
        )


def busy_message(job: Job) -> str:
    """Why a new job cannot start while `job` is queued or running."""
    what = f"volume {job.volume}" if job.volume else "the backup store (a prune of every volume)"
    return (
        f"{what} is busy with {job.kind} job {job.id}: wait for it (volplugin job {job.id} "
        f"--wait) or cancel it (volplugin job {job.id} --cancel)"
    )


def interrupted_error(state: str) -> str:
    """The Error of a job found `state` (queued or running) at start."""
    return (
        f"the plugin stopped (killed or crashed) while this job was {state}; "
        "it did not finish: start it again"
    )


class JobTable:
    """The jobs table on its own connection to ROOT/state.db; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_JOBS)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the jobs table in {self.path}: {exc}") from exc
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, immediate(self._db) as db:
            yield db

    def _select(self, where: str, args: tuple = (), tail: str = "") -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE {where} ORDER BY seq DESC {tail}", args
            ).fetchall()
        return [Job.from_row(row) for row in rows]

    # -- reading -------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        found = self._select("id = ?", (job_id,))
        if not found:
            raise NoSuchJob(f"no job {job_id}")
        return found[0]

    def active(self, volume: str | None = None) -> list[Job]:
        """Queued and running jobs (of `volume` only, if given), newest first."""
        if volume is None:
            return self._select("state IN ('queued', 'running')")
        return self._select("state IN ('queued', 'running') AND volume = ?", (volume,))

    def listing(self, volume: str | None = None, *, every: bool = False) -> list[Job]:
        """Every active job and the last FINISHED_SHOWN ended ones (all with `every`)."""
        where, args = ("volume = ?", (volume,)) if volume is not None else ("1", ())
        if every:
            return self._select(where, args)
        ended = (
            f"SELECT seq FROM jobs WHERE {where} AND state NOT IN ('queued', 'running')"
            f" ORDER BY seq DESC LIMIT {FINISHED_SHOWN}"
        )
        return self._select(
            f"{where} AND (state IN ('queued', 'running') OR seq IN ({ended}))", args + args
        )

    # -- transitions ---------------------------------------------------------------------

    def add(self, kind: str, volume: str | None, request: dict) -> Job:
        """Queue a new job, unless a job it conflicts with is queued or running (JobBusy)."""
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        job = Job(new_id(), kind, volume, "queued", now_iso())
        with self._write() as db:
            if volume is None:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('queued', 'running')"
                    " ORDER BY seq LIMIT 1"
                ).fetchone()
            else:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('queued', 'running')"
                    " AND (volume = ? OR volume IS NULL) ORDER BY seq LIMIT 1",
                    (volume,),
                ).fetchone()
            if row is not None:
                raise JobBusy(busy_message(Job.from_row(row)))
            db.execute(
                "INSERT INTO jobs (id, kind, volume, state, created, progress, request)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    kind,
                    volume,
                    job.state,
                    job.created,
                    json.dumps(job.progress.to_json()),
                    json.dumps(request),
                ),
            )
        return job

    def start(self, job_id: str) -> bool:
        """queued -> running; False if the job is no longer queued (cancelled meanwhile)."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'running', started = ? WHERE id = ? AND state = 'queued'",
                (now_iso(), job_id),
            )
            return cur.rowcount > 0

    def set_progress(self, job_id: str, progress: Progress) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET progress = ? WHERE id = ? AND state = 'running'",
                (json.dumps(progress.to_json()), job_id),
            )

    def finish(
        self,
        job_id: str,
        state: str,
        *,
        progress: Progress | None = None,
        result: dict | None = None,
        error: str | None = None,
    ) -> bool:
        """An active job -> `state` (an ended one); False if it had ended already."""
        if state not in ENDED:
            raise ValueError(f"{state!r} is not a state a job ends in")
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, finished = ?, result = ?, error = ?,"
                " progress = COALESCE(?, progress)"
                " WHERE id = ? AND state IN ('queued', 'running')",
                (
                    state,
                    now_iso(),
                    json.dumps(result) if result is not None else None,
                    error,
                    json.dumps(progress.to_json()) if progress is not None else None,
                    job_id,
                ),
            )
            return cur.rowcount > 0

    def cancel_queued(self, job_id: str, error: str) -> bool:
        """queued -> cancelled; False if the job is not queued."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ?, error = ?"
                " WHERE id = ? AND state = 'queued'",
                (now_iso(), error, job_id),
            )
            return cur.rowcount > 0

    def interrupt_all(self) -> list[Job]:
        """Mark every queued or running job interrupted (at start: their process died)."""
        with self._write() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('queued', 'running') ORDER BY seq"
            ).fetchall()
            for state in ACTIVE:
                db.execute(
                    "UPDATE jobs SET state = 'interrupted', finished = ?, error = ?"
                    " WHERE state = ?",
                    (now_iso(), interrupted_error(state), state),
                )
        return [Job.from_row(row) for row in rows]

    def forget_old(self, keep: int = FINISHED_KEPT) -> int:
        """Delete ended jobs beyond the newest `keep`; return how many went."""
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM jobs WHERE state NOT IN ('queued', 'running') AND seq NOT IN"
                " (SELECT seq FROM jobs WHERE state NOT IN ('queued', 'running')"
                " ORDER BY seq DESC LIMIT ?)",
                (keep,),
            )
            return cur.rowcount
