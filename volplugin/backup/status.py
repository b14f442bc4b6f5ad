"""The backup part of a volume's Status: the last backup's age, trigger and hooks, the schedule.

Added to the `Backup` object of `docker volume inspect` next to LastID, LastTime, Outcome
and Detail. Everything here is computed from the state record, so Get stays fast.
"""

from __future__ import annotations

from datetime import UTC, datetime

from volplugin.backup.schedule import next_run
from volplugin.state import VolumeRecord


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 time of the state (`...Z`) as an aware datetime, or None."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


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
        "Age": human_age(age) if age is not None else None,
        "AgeSeconds": int(age) if age is not None else None,
        "Trigger": info.trigger if info else None,
        "Hooks": list(info.hooks or []) if info else [],
        "Retention": info.retention if info else None,
        "Schedule": schedule,
        "Keep": record.options.get("backup-keep"),
        "NextRun": upcoming.isoformat().replace("+00:00", "Z") if upcoming else None,
    }
