"""Which backups a retention policy keeps, with the buckets of restic's `forget`.

Backups are taken newest first. keep-last N keeps the N newest. keep-hourly N
keeps the newest backup of each of the N newest hours that have backups, and
so on for days, ISO weeks, months and years (all in UTC). When a rule has
counts left after the walk, the oldest backup is kept too. A backup kept by
any rule is kept; the policy applies to each (host, volume) group separately, as
restic groups by host and paths: volumes of the same name on two hosts sharing a
store (compose names such as `app_db`) are two groups, so one host's newer backups
never count against the other's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from volplugin.backup.docs import BackupRecord
from volplugin.backup.errors import BackupError


def _bucket(fmt: str) -> Callable[[datetime], str]:
    return lambda t: t.strftime(fmt)


def _week(t: datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year}-{week:02d}"


BUCKETS: tuple[tuple[str, Callable[[datetime], str]], ...] = (
    ("hourly", _bucket("%Y-%m-%d-%H")),
    ("daily", _bucket("%Y-%m-%d")),
    ("weekly", _week),
    ("monthly", _bucket("%Y-%m")),
    ("yearly", _bucket("%Y")),
)


@dataclass(frozen=True)
class Policy:
    """How many backups to keep in each bucket (0: that rule keeps none)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly))


@dataclass
class Decision:
    """A backup and the rules that keep it (empty: it goes)."""

    backup: BackupRecord
    reasons: list[str]

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def apply_policy(backups: list[BackupRecord], policy: Policy) -> list[Decision]:
    """Decisions for the backups of one volume, newest first."""
    if policy.empty():
        raise BackupError(
            "no retention policy given: pass at least one of --keep-last, --keep-hourly, "
            "--keep-daily, --keep-weekly, --keep-monthly, --keep-yearly"
        )
    for name, value in vars(policy).items():
        if value < 0:
            raise BackupError(f"--keep-{name} must not be negative")
    ordered = sorted(backups, key=lambda b: (b.time, b.id), reverse=True)
    decisions = []
    left = {name: getattr(policy, name) for name, _ in BUCKETS}
    last_key: dict[str, str | None] = {name: None for name, _ in BUCKETS}
    for index, backup in enumerate(ordered):
        reasons = []
        if index < policy.last:
            reasons.append("last")
        when = datetime.fromtimestamp(backup.time, UTC)
        for name, key_of in BUCKETS:
            key = key_of(when)
            oldest = index == len(ordered) - 1
            if left[name] > 0 and (key != last_key[name] or oldest):
                reasons.append(name if key != last_key[name] else f"oldest {name}")
                left[name] -= 1
                last_key[name] = key
        decisions.append(Decision(backup, reasons))
    return decisions


def apply_per_volume(backups: list[BackupRecord], policy: Policy) -> list[Decision]:
    """apply_policy for each (host, volume) group's backups separately."""
    apply_policy([], policy)  # refuses an empty or negative policy even with no backups
    groups: dict[tuple[str, str], list[BackupRecord]] = {}
    for backup in backups:
        groups.setdefault((backup.host, backup.volume), []).append(backup)
    out = []
    for key in sorted(groups):
        out.extend(apply_policy(groups[key], policy))
    return out
