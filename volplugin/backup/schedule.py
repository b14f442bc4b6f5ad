"""The values of the backup options: `from`, `backup-schedule` (cron) and `backup-keep`.

Each parser returns the value's normal form or raises ValueError whose text completes
"expected ...", as volplugin.volumes.options wants. Schedules are cron expressions read in UTC by
croniter: five fields (minute hour day-of-month month day-of-week), or one of the @-names
(@hourly, @daily, ...); at most one backup a minute. croniter's sixth field of seconds is
refused (`* * * * * *` would stop a volume's containers every second), unless the server
runs with VOLPLUGIN_CRON_SECONDS=1, which tests use to see schedules fire within seconds.
`backup-keep` is a list of KEY=COUNT pairs such as `last=7,daily=7,weekly=4`, the buckets
of `volplugin prune`.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime

from croniter import croniter

from volplugin.backup.retention import Policy

KEEP_KEYS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
MAX_KEEP = 100_000
ALIASES = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
SECONDS_ENV = "VOLPLUGIN_CRON_SECONDS"  # "1": a 6th field of seconds is allowed (tests)
_CRON_HELP = (
    "a cron expression in UTC with 5 fields (minute hour day month weekday, e.g. '0 3 * * *'), "
    "or one of " + ", ".join(sorted(ALIASES))
)
_KEEP_HELP = (
    "KEY=COUNT pairs separated by commas, such as last=7,daily=7,weekly=4, with KEY one of "
    + ", ".join(KEEP_KEYS)
    + " and at least one COUNT above 0"
)


def parse_backup_ref(value: str) -> str:
    """A backup id or a prefix of at least 4 hex digits, lower case."""
    if not re.fullmatch(r"[0-9a-fA-F]{4,64}", value):
        raise ValueError(
            "a backup id (or a unique prefix of at least 4 hex digits) as listed by "
            "`volplugin backups`"
        )
    return value.lower()


def parse_cron(value: str) -> str:
    """A cron expression croniter accepts, with its fields separated by single spaces."""
    text = " ".join(value.split())
    if text.lower() in ALIASES:
        return text.lower()
    fields = text.split(" ")
    allowed = (5, 6) if os.environ.get(SECONDS_ENV) == "1" else (5,)
    if len(fields) == 6 and 6 not in allowed:
        raise ValueError(
            f"{_CRON_HELP}; {text!r} has a 6th field (seconds): backups run at most once a minute"
        )
    if len(fields) not in allowed or any(f.upper().startswith("H") for f in fields):
        raise ValueError(_CRON_HELP)
    try:
        croniter(text, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{_CRON_HELP} ({exc})") from None
    return text


def next_run(expr: str, after: datetime) -> datetime:
    """The first time after `after` (aware, UTC) at which `expr` fires."""
    return croniter(expr, after.astimezone(UTC)).get_next(datetime).astimezone(UTC)


def parse_keep(value: str) -> Policy:
    """A retention policy from `last=7,daily=7,weekly=4`."""
    counts: dict[str, int] = {}
    for part in value.split(","):
        key, sep, count = part.strip().partition("=")
        key, count = key.strip().lower(), count.strip()
        if not sep or key not in KEEP_KEYS:
            raise ValueError(f"{_KEEP_HELP}; {part.strip()!r} is not KEY=COUNT with a known KEY")
        if key in counts:
            raise ValueError(f"{_KEEP_HELP}; {key!r} is given twice")
        if not count.isdigit() or int(count) > MAX_KEEP:
            raise ValueError(f"{_KEEP_HELP}; the count of {key!r} must be 0..{MAX_KEEP}")
        counts[key] = int(count)
    policy = Policy(**counts)
    if policy.empty():
        raise ValueError(f"{_KEEP_HELP}; every count is 0")
    return policy


def format_keep(policy: Policy) -> str:
    """The normal form of a policy: non-zero counts in KEEP_KEYS order."""
    return ",".join(f"{k}={getattr(policy, k)}" for k in KEEP_KEYS if getattr(policy, k))


def normal_keep(value: str) -> str:
    """The normal form of a `backup-keep` value."""
    return format_keep(parse_keep(value))
