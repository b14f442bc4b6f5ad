"""The metrics computed at scrape time from the state database (and the store's roaming
records), so a restart resets none.

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

Per roaming volume recorded on this host (label `volume`; volplugin.roaming), when the
store can hold them (RoamingCollector):

    volplugin_roaming_lease_held                      1 while this host holds the
                                                      volume's lease, else 0
    volplugin_roaming_lease_lost                      1 once this host lost the volume's
                                                      lease (until it takes it again),
                                                      else 0
    volplugin_roaming_head_age_seconds                age of the volume's head backup,
                                                      from the store's record (read at
                                                      most every HEAD_CACHE seconds);
                                                      absent while it has none, or while
                                                      the store cannot be read
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from layerfs.errors import LayerfsError
from volplugin.jobs.table import ACTIVE, ENDED, KINDS
from volplugin.times import parse_time
from volplugin.volumes.service import VolumeService

if TYPE_CHECKING:
    from volplugin.roaming.volumes import RoamingVolumes

log = logging.getLogger("volplugin.metrics")

JOB_STATES = ACTIVE + ENDED
HEAD_CACHE = 5.0  # seconds the store's roaming records are reused between scrapes


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


class RoamingCollector(Collector):
    """Lease and head figures of the roaming volumes recorded on this host.

    The heads come from the store's records: read once per HEAD_CACHE seconds, so that
    scrapes do not hammer the store. A store that cannot be read leaves the head metric
    out (logged once, until it can be read again).
    """

    def __init__(self, roaming: RoamingVolumes) -> None:
        self.roaming = roaming
        self._lock = threading.Lock()
        self._heads: dict[str, float | None] | None = None  # name -> head time; None: failed
        self._read = -HEAD_CACHE  # monotonic time of the last read
        self._failing = False

    def describe(self) -> Iterator[Metric]:
        """The families without samples: registering reads no store."""
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        from volplugin.roaming.volumes import is_roaming

        held, lost, age = self._families()
        leases = self.roaming.leases
        names = [r.name for r in self.roaming.service.list() if is_roaming(r.options)]
        heads = self._head_times(names) if names else {}
        now = time.time()
        for name in names:
            held.add_metric([name], 1.0 if leases.holds(name) else 0.0)
            lost.add_metric([name], 1.0 if self.roaming.lost_reason(name) else 0.0)
            when = heads.get(name)
            if when is not None:
                age.add_metric([name], max(0.0, now - when))
        yield from (held, lost, age)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        held = GaugeMetricFamily(
            "volplugin_roaming_lease_held",
            "1 while this host holds the roaming volume's lease, else 0.",
            labels=["volume"],
        )
        lost = GaugeMetricFamily(
            "volplugin_roaming_lease_lost",
            "1 while this host's lease of the roaming volume is lost, else 0.",
            labels=["volume"],
        )
        age = GaugeMetricFamily(
            "volplugin_roaming_head_age_seconds",
            "Age of the roaming volume's head backup, by the store's record.",
            labels=["volume"],
        )
        return held, lost, age

    def _head_times(self, names: list[str]) -> dict[str, float | None]:
        """{name: head time (None: no head)}, as read at most HEAD_CACHE seconds ago;
        {} while the store cannot be read."""
        with self._lock:
            fresh = time.monotonic() - self._read < HEAD_CACHE
            if fresh and self._heads is not None and set(names) <= set(self._heads):
                return self._heads
            if fresh and self._heads is None:
                return {}  # it failed a moment ago: not again yet
            self._read = time.monotonic()
            try:
                registry = self.roaming.registry()
                heads: dict[str, float | None] = {}
                for name in names:
                    found = registry.get(name)
                    head = found.record.head if found is not None else None
                    heads[name] = head.time if head is not None else None
            except (LayerfsError, OSError) as exc:  # the store is away, a record damaged
                if not self._failing:
                    log.warning("roaming head ages left out: cannot read the store: %s", exc)
                self._failing = True
                self._heads = None
                return {}
            if self._failing:
                log.info("roaming head ages: the store can be read again")
            self._failing = False
            self._heads = heads
            return heads
