"""Scheduled backups: a background thread of `volplugin serve` for `-o backup-schedule=CRON`.

Every `tick` seconds it reads the volumes from the state; a volume is due when the next
time its cron expression fires after its last backup attempt (or its creation) has come.
With a job runner (as `serve` has), each due volume gets a backup job (Kind backup,
shown by Jobs.List) and the jobs run in the runner's pool; a volume busy with another
job is skipped until its next time, and logged. Without one, due volumes are backed up
one after another in the calling thread. Either way the consistency hooks run and
`backup-keep` is applied to the volume's backups after each one (backup/runner.py).
Since the schedule counts from the last attempt in the state, a server that was down
runs a missed backup once when it comes back, not once per missed time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from layerfs.errors import LayerfsError
from layerfs.store.location import open_store
from volplugin.backup import runner, tasks
from volplugin.backup.schedule import next_run, parse_keep
from volplugin.backup.status import schedule_base
from volplugin.backup.volumes import record_outcome
from volplugin.defaults import DEFAULT_TICK
from volplugin.errors import VolpluginError
from volplugin.jobs.runner import JobContext, JobRunner
from volplugin.jobs.table import JobBusy
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import VolumeRecord

log = logging.getLogger("volplugin.backup.scheduler")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Scheduler:
    """Finds due volumes and backs them up; `start` runs it in a thread."""

    def __init__(
        self,
        service: VolumeService,
        store_url: str | None,
        *,
        tick: float = DEFAULT_TICK,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        backup: Callable[..., object] = runner.run_backup,
        jobs: JobRunner | None = None,
    ) -> None:
        self.service = service
        self.store_url = store_url
        self.tick = tick
        self.clock = clock
        self.backup = backup
        self.jobs = jobs
        self._thread: threading.Thread | None = None
        self._mine: dict[str, str] = {}  # volume -> the ID of the scheduled job it last got
        self._skipped: dict[str, datetime] = {}  # volume -> when a busy volume was skipped

    def due(self, now: datetime) -> list[VolumeRecord]:
        """The volumes whose next scheduled time is not after `now`."""
        out = []
        for record in self.service.list():
            schedule = record.options.get("backup-schedule")
            if not schedule:
                continue
            base = max(schedule_base(record), self._skipped.get(record.name, _EPOCH))
            if next_run(schedule, base) <= now:
                out.append(record)
        return out

    def run_due(self) -> int:
        """Back up (or with a job runner, start a job for) every due volume once; return
        how many were attempted."""
        now = self.clock()
        records = self.due(now)
        attempted = 0
        for record in records:
            if self.jobs is None:
                self._back_up(record)
                attempted += 1
            elif self._submit(record, now):
                attempted += 1
        return attempted

    def _submit(self, record: VolumeRecord, now: datetime) -> bool:
        """Start a backup job for a due volume; False if its last one still runs or it is busy."""
        assert self.jobs is not None
        mine = self._mine.get(record.name)
        if mine is not None and any(j.id == mine for j in self.jobs.table.active(record.name)):
            return False  # still due because its scheduled backup is under way
        try:  # a roaming volume is backed up by the host that holds it: not due here
            for check in self.service.hooks.before_publish:
                check(record.name)
        except VolpluginError as exc:
            log.info("volume %s: scheduled backup skipped: %s", record.name, exc)
            self._skipped[record.name] = now
            return False
        keep = record.options.get("backup-keep")
        body = tasks.backup_job(
            self.service,
            self.store_url,
            record.name,
            ["scheduled"],
            trigger="schedule",
            keep=parse_keep(keep) if keep else None,
            run=self.backup,
        )

        def scheduled(ctx: JobContext) -> dict:
            try:
                result = body(ctx)
            except LayerfsError as exc:
                log.error("volume %s: scheduled backup failed: %s", record.name, exc)
                self._note_failure(record, exc)
                raise
            except Exception:
                self._note_failure(record, None)
                raise
            log.info("volume %s: scheduled backup done", record.name)
            return result

        try:
            job = self.jobs.submit("backup", record.name, scheduled, {"Trigger": "schedule"})
        except JobBusy as exc:
            log.warning("volume %s: scheduled backup skipped: %s", record.name, exc)
            self._skipped[record.name] = now
            return False
        except VolpluginError as exc:  # the server is stopping
            log.warning("volume %s: scheduled backup not started: %s", record.name, exc)
            return False
        self._mine[record.name] = job.id
        return True

    def _back_up(self, record: VolumeRecord) -> None:
        keep = record.options.get("backup-keep")
        try:
            store = open_store(self.store_url)
            try:
                self.backup(
                    self.service,
                    store,
                    record.name,
                    ["scheduled"],
                    trigger="schedule",
                    keep=parse_keep(keep) if keep else None,
                )
            finally:
                store.backend.close()
            log.info("volume %s: scheduled backup done", record.name)
        except LayerfsError as exc:
            # run_backup has recorded the failure (shown by inspect); try again next time.
            log.error("volume %s: scheduled backup failed: %s", record.name, exc)
            self._note_failure(record, exc)
        except Exception:
            log.exception("volume %s: scheduled backup failed unexpectedly", record.name)
            self._note_failure(record, None)

    def _note_failure(self, record: VolumeRecord, exc: Exception | None) -> None:
        """Make sure a failure moves the schedule on, even one before run_backup recorded it."""
        current = self.service.state.get(record.name)
        if current is not None and current.backup == record.backup:
            message = str(exc) if exc else "internal error in the scheduler; see the plugin log"
            record_outcome(self.service, record.name, None, message, trigger="schedule")

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run until `stop` is set, checking every `tick` seconds."""

        def loop() -> None:
            log.info("backup scheduler running, every %.1f s", self.tick)
            while not stop.wait(self.tick):
                try:
                    self.run_due()
                except Exception:
                    log.exception("backup scheduler: cannot read the volumes; will retry")

        self._thread = threading.Thread(target=loop, name="volplugin-scheduler", daemon=True)
        self._thread.start()
        return self._thread
