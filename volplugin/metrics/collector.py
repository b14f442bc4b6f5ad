"""The metrics computed at scrape time from the state database, so a restart resets none.

Per volume (label `volume`), from its backup information (volplugin.volumes.state):

    volplugin_backup_last_success_timestamp_seconds   Unix time of the last successful
                                                      backup; 0 if it never had one
    volplugin_backup_last_duration_seconds            how long that backup took
    volplugin_backup_last_read_bytes                  bytes of files it read
    volplugin_backup_last_stored_bytes                stored bytes of new chunks it wrote
    volplugin_backup_failures_total                   failed backups since the volume's
                                                      creation

and, when the state database has a `jobs` table (volplugin.jobs.table; read on a
read-only connection of its own, so a scrape waits for no writer),
`volplugin_jobs{kind, state}`: how many jobs it holds in each state.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from volplugin.jobs.table import ACTIVE, ENDED, KINDS
from volplugin.times import parse_time
from volplugin.volumes.service import VolumeService

log = logging.getLogger("volplugin.metrics")

JOB_STATES = ACTIVE + ENDED


class StateCollector(Collector):
    """Backup figures per volume, and job counts, read from the state at each scrape."""

    def __init__(self, service: VolumeService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        success = GaugeMetricFamily(
            "volplugin_backup_last_success_timestamp_seconds",
            "Unix time of the volume's last successful backup (0: never).",
            labels=["volume"],
        )
        duration = GaugeMetricFamily(
            "volplugin_backup_last_duration_seconds",
            "Seconds the volume's last successful backup took.",
            labels=["volume"],
        )
        read = GaugeMetricFamily(
            "volplugin_backup_last_read_bytes",
            "Bytes of files the volume's last successful backup read.",
            labels=["volume"],
        )
        stored = GaugeMetricFamily(
            "volplugin_backup_last_stored_bytes",
            "Stored (compressed) bytes of new chunks the volume's last successful backup wrote.",
            labels=["volume"],
        )
        failures = CounterMetricFamily(
            "volplugin_backup_failures",
            "Failed backups of the volume since it was created.",
            labels=["volume"],
        )
        for record in self.service.list():
            info = record.backup
            when = parse_time(info.success_time()) if info else None
            success.add_metric([record.name], when.timestamp() if when else 0.0)
            failures.add_metric([record.name], float(info.failures if info else 0))
            if info is None:
                continue
            if info.duration is not None:
                duration.add_metric([record.name], float(info.duration))
            if info.bytes_read is not None:
                read.add_metric([record.name], float(info.bytes_read))
            if info.bytes_stored is not None:
                stored.add_metric([record.name], float(info.bytes_stored))
        yield from (success, duration, read, stored, failures)
        jobs = self._jobs()
        if jobs is not None:
            yield jobs

    def _jobs(self) -> GaugeMetricFamily | None:
        """Job counts by kind and state, if the state has a jobs table; else None."""
        counts = job_counts(self.service.state.path)
        if counts is None:
            return None
        family = GaugeMetricFamily(
            "volplugin_jobs",
            "Jobs in the state database, by kind and state.",
            labels=["kind", "state"],
        )
        kinds = sorted(set(KINDS) | {k for k, _ in counts})
        states = sorted(set(JOB_STATES) | {s for _, s in counts})
        for kind in kinds:
            for state in states:
                family.add_metric([kind, state], float(counts.get((kind, state), 0)))
        return family


def job_counts(database: Path) -> dict[tuple[str, str], int] | None:
    """{(kind, state): count} of the `jobs` table, read-only; None without such a table."""
    try:
        db = sqlite3.connect(f"{Path(database).absolute().as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        if not {"kind", "state"} <= columns:
            return None
        rows = db.execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state")
        return {(str(kind), str(state)): int(n) for kind, state, n in rows}
    except sqlite3.Error as exc:
        log.debug("cannot count jobs in %s: %s", database, exc)
        return None
    finally:
        db.close()
