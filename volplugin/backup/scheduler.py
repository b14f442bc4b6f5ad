"""Scheduled backups: a background thread of `volplugin serve` for `-o backup-schedule=CRON`.

Every `tick` seconds it reads the volumes from the state; a volume is due when the next
time its cron expression fires after its last backup attempt (or its creation) has come.
Due volumes are backed up one after another with their consistency hooks, and
`backup-keep` is applied to the volume's backups after each one (backup/runner.py). Since
the schedule counts from the last attempt in the state, a server that was down runs a
missed backup once when it comes back, not once per missed time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from layerfs.errors import LayerfsError
from layerfs.store.location import open_store
from volplugin.backup import runner
from volplugin.backup.schedule import next_run, parse_keep
from volplugin.backup.status import schedule_base
from volplugin.backup.volumes import record_outcome
from volplugin.defaults import DEFAULT_TICK
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import VolumeRecord

log = logging.getLogger("volplugin.backup.scheduler")


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
    ) -> None:
        self.service = service
        self.store_url = store_url
        self.tick = tick
        self.clock = clock
        self.backup = backup
        self._thread: threading.Thread | None = None

    def due(self, now: datetime) -> list[VolumeRecord]:
        """The volumes whose next scheduled time is not after `now`."""
        out = []
        for record in self.service.list():
            schedule = record.options.get("backup-schedule")
            if schedule and next_run(schedule, schedule_base(record)) <= now:
                out.append(record)
        return out

    def run_due(self) -> int:
        """Back up every due volume once; return how many were attempted."""
        records = self.due(self.clock())
        for record in records:
            self._back_up(record)
        return len(records)

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
