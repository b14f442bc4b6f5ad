"""The backup part of a volume's Status: the last backup, its age, trigger and hooks, the schedule.

`attach` adds it to a VolumeService's status hooks, so `docker volume inspect` shows it
as the `Backup` object. Everything here is computed from the state record, so Get
stays fast.
"""

from __future__ import annotations

from datetime import UTC, datetime

from volplugin.backup.schedule import next_run
from volplugin.times import iso, parse_time
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import VolumeRecord


def human_age(seconds: float) -> str:
    """`42s`, `5m03s`, `2h07m`, `3d04h`."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def schedule_base(record: VolumeRecord) -> datetime:
    """The time the next scheduled backup is counted from: the last attempt, or creation."""
    last = parse_time(record.backup.last_time) if record.backup else None
    return last or parse_time(record.created) or datetime.now(UTC)


def backup_status(record: VolumeRecord, now: datetime | None = None) -> dict:
    now = now or datetime.now(UTC)
    info = record.backup
    last = parse_time(info.last_time) if info else None
    age = (now - last).total_seconds() if last else None
    schedule = record.options.get("backup-schedule")
    upcoming = next_run(schedule, schedule_base(record)) if schedule else None
    return {
        "LastID": info.last_id if info else None,
        "LastTime": info.last_time if info else None,
        "Outcome": info.outcome if info else None,
        "LastSuccessTime": info.success_time() if info else None,
        "Failures": info.failures if info else 0,
        "Detail": info.detail if info else None,
        "Age": human_age(age) if age is not None else None,
        "AgeSeconds": int(age) if age is not None else None,
        "Trigger": info.trigger if info else None,
        "Hooks": list(info.hooks or []) if info else [],
        "Retention": info.retention if info else None,
        "Schedule": schedule,
        "Keep": record.options.get("backup-keep"),
        "NextRun": iso(upcoming) if upcoming else None,
    }


def attach(volumes: VolumeService) -> VolumeService:
    """Show the backup status in `volumes`' Status, under `Backup`."""
    volumes.hooks.status.append(lambda record: {"Backup": backup_status(record)})
    return volumes
