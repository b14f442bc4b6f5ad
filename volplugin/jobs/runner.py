"""Running jobs in a small fixed pool of background threads of `volplugin serve`.

`submit` records a queued job (refused with JobBusy when its volume has one) and hands
its body to the pool. A body is a function of a JobContext: it reports progress (written
to the job's row at most every PROGRESS_INTERVAL seconds), calls `check()` between
files (which raises JobCancelled once the job was asked to stop), records the containers
it quiets in the journal, and returns the job's Result. `cancel` asks one job to stop;
`request_stop` (from a signal handler: it only sets flags) asks all of them, and
`shutdown` then waits for them, a bounded time, before the process exits.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.errors import LayerfsError
from volplugin.errors import VolpluginError
from volplugin.jobs.journal import JobJournal, Journal, put_back
from volplugin.jobs.table import Job, JobEnded, JobTable, Progress
from volplugin.volumes.state import DB_NAME

log = logging.getLogger("volplugin.jobs")

WORKERS = 2  # jobs that run at once
PROGRESS_INTERVAL = 0.5  # seconds between progress writes of a job
STOP_GRACE = 15.0  # seconds a stopping server waits for its running jobs


class JobCancelled(VolpluginError):
    """A job was asked to stop and did (nothing of a backup is published)."""


@dataclass
class JobContext:
    """What a job's body gets: its ID, progress reporting, the cancel flag, the journal."""

    id: str
    table: JobTable
    journal: JobJournal
    interval: float = PROGRESS_INTERVAL
    _cancel: threading.Event = field(default_factory=threading.Event)
    _reason: str = ""
    _progress: Progress = field(default_factory=Progress)
    _written: float = 0.0

    def cancel(self, reason: str) -> None:
        if not self._cancel.is_set():
            self._reason = reason
            self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise JobCancelled if the job was asked to stop."""
        if self._cancel.is_set():
            raise JobCancelled(self._reason or "cancelled")

    def totals(self, files: int | None, size: int | None) -> None:
        """Set the totals, when the body knows them."""
        self._progress.total_files, self._progress.total_bytes = files, size
        self._write()

    def progress(self, files: int, size: int, *, check: bool = True) -> None:
        """Files and bytes done so far; checks the cancel flag too (unless told not to)."""
        self._progress.files, self._progress.bytes = files, size
        now = time.monotonic()
        if now - self._written >= self.interval:
            self._written = now
            self._write()
        if check:
            self.check()

    @property
    def last_progress(self) -> Progress:
        return self._progress

    def _write(self) -> None:
        try:
            self.table.set_progress(self.id, self._progress)
        except sqlite3.Error as exc:  # progress is a courtesy: the job goes on
            log.warning("job %s: cannot record its progress: %s", self.id, exc)


Body = Callable[[JobContext], dict]


class JobRunner:
    """A pool of WORKERS daemon threads running the jobs of one table."""

    def __init__(self, table: JobTable, journal: Journal, workers: int = WORKERS) -> None:
        self.table = table
        self.journal = journal
        self.workers = workers
        self._queue: queue.Queue[tuple[str, Body] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._ended = threading.Condition()
        self._running: dict[str, JobContext] = {}  # queued or running here, by job ID
        self._threads: list[threading.Thread] = []
        self._stopping = ""  # why every job is being cancelled ("" while serving)
        self._shut = False  # shutdown was called

    @classmethod
    def open(cls, root: Path, workers: int = WORKERS) -> JobRunner:
        """The runner of ROOT/state.db; jobs a dead process left queued or running are
        marked interrupted (their quieted containers stay in the journal for `put_back`)."""
        table = JobTable(Path(root) / DB_NAME)
        journal = Journal(Path(root) / DB_NAME)
        for job in table.interrupt_all():
            log.warning(
                "job %s (%s of %s) was interrupted: the plugin stopped while it was %s",
                job.id,
                job.kind,
                job.volume or "every volume",
                job.state,
            )
        table.forget_old()
        return cls(table, journal, workers)

    def close(self) -> None:
        self.table.close()
        self.journal.close()

    # -- the pool ------------------------------------------------------------------------

    def start(self) -> JobRunner:
        """Start the worker threads (queued jobs wait until then)."""
        if self._stopping or self._threads:
            return self
        for n in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"volplugin-job-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def submit(self, kind: str, volume: str | None, body: Body, request: dict) -> Job:
        """Queue a job (JobBusy if its volume has a queued or running one)."""
        if self._stopping:
            raise VolpluginError(f"the plugin is stopping ({self._stopping}): try again later")
        job = self.table.add(kind, volume, request)
        ctx = JobContext(job.id, self.table, self.journal.for_job(job.id))
        with self._lock:
            self._running[job.id] = ctx
        self._queue.put((job.id, body))
        log.info("job %s: %s of %s queued", job.id, kind, volume or "every volume")
        return job

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job_id, body = item
            with self._lock:
                ctx = self._running.get(job_id)
            if ctx is not None and self._stopping:  # queued as the stop began
                ctx.cancel(f"cancelled: the plugin was stopping ({self._stopping})")
            try:
                if ctx is not None and not ctx.cancelled and self.table.start(job_id):
                    self._run(ctx, body)
                elif ctx is not None:
                    self.table.cancel_queued(job_id, self._cancel_error(ctx))
            except Exception:
                log.exception("job %s: cannot record its state", job_id)
            finally:
                with self._lock:
                    self._running.pop(job_id, None)
                with self._ended:
                    self._ended.notify_all()

    def _run(self, ctx: JobContext, body: Body) -> None:
        log.info("job %s: running", ctx.id)
        try:
            result = body(ctx)
        except JobCancelled as exc:
            log.info("job %s: cancelled: %s", ctx.id, exc)
            self.table.finish(ctx.id, "cancelled", progress=ctx.last_progress, error=str(exc))
        except LayerfsError as exc:
            log.error("job %s: failed: %s", ctx.id, exc)
            self.table.finish(ctx.id, "failed", progress=ctx.last_progress, error=str(exc))
        except Exception as exc:
            log.exception("job %s: failed unexpectedly", ctx.id)
            error = f"internal error in volplugin ({type(exc).__name__}: {exc}); see its log"
            self.table.finish(ctx.id, "failed", progress=ctx.last_progress, error=error)
        else:
            log.info("job %s: succeeded", ctx.id)
            self.table.finish(ctx.id, "succeeded", progress=ctx.last_progress, result=result)

    # -- requests ------------------------------------------------------------------------

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once it has ended, or as it is when `timeout` seconds have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ended:
            while True:
                job = self.table.get(job_id)
                if not job.active:
                    return job
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return job
                self._ended.wait(1.0 if left is None else min(left, 1.0))

    def cancel(self, job_id: str) -> Job:
        """Ask a queued or running job to stop; JobEnded if it has ended."""
        job = self.table.get(job_id)
        if not job.active:
            raise JobEnded(
                f"job {job_id} is {job.state}: only a queued or running job can be cancelled"
            )
        with self._lock:
            ctx = self._running.get(job_id)
        reason = "cancelled by request (Jobs.Cancel)"
        if ctx is not None:
            ctx.cancel(reason)
        if job.state == "queued" and self.table.cancel_queued(job_id, self._cancel_error(ctx)):
            with self._ended:
                self._ended.notify_all()
        return self.table.get(job_id)

    def _cancel_error(self, ctx: JobContext | None) -> str:
        reason = ctx._reason if ctx is not None and ctx._reason else "cancelled by request"
        return f"{reason}; it never ran"

    # -- stopping ------------------------------------------------------------------------

    def request_stop(self, why: str) -> None:
        """Ask every job to stop; only sets flags, so a signal handler may call it."""
        if self._stopping:
            return
        self._stopping = why
        with self._lock:
            running = list(self._running.values())
        for ctx in running:
            ctx.cancel(f"cancelled: the plugin was stopping ({why})")

    def shutdown(self, grace: float = STOP_GRACE) -> None:
        """Cancel every job, wait up to `grace` s; put back what jobs still running quieted.

        Once only: a later call returns at once.
        """
        with self._lock:
            if self._shut:
                return
            self._shut = True
        self.request_stop(self._stopping or "stop")
        with self._lock:
            busy = sorted(self._running)
        if busy:
            log.info("stopping: cancelling %d job(s), waiting up to %.0f s", len(busy), grace)
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        with self._lock:
            left = sorted(self._running)
        never_ran = f"cancelled: the plugin stopped ({self._stopping}) before it ran"
        for job_id in list(left):  # queued while the pool was not running yet
            if self.table.cancel_queued(job_id, never_ran):
                left.remove(job_id)
        if not left:
            return
        log.error("stopping: job(s) %s did not stop within %.0f s", ", ".join(left), grace)
        put_back(self.journal, _docker, set(left))
        error = (
            f"the plugin stopped ({self._stopping}) while this job ran and it did not stop "
            f"within {grace:.0f} s; the containers it had stopped or paused were put back"
        )
        for job_id in left:
            self.table.finish(job_id, "interrupted", error=error)


def _docker():  # noqa: ANN202 - a docker client, imported late
    from volplugin.volumes.containers import docker_client

    return docker_client(timeout=60)
