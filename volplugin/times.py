"""The times the plugin records and shows: UTC, whole seconds, ISO 8601 with a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(when: datetime) -> str:
    """`2026-12-03T17:00:00Z` (to the second); a naive datetime is taken as UTC."""
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    """The time now, as the state and the jobs record it."""
    return iso(datetime.now(UTC))


def parse_time(text: object) -> datetime | None:
    """A recorded time (`...Z`) as an aware datetime; None for anything else."""
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def iso_at(seconds: float) -> str:
    """A Unix time as `iso` shows it."""
    return iso(datetime.fromtimestamp(seconds, UTC))
