"""The one table of volume options (`docker volume create -o KEY=VALUE`) and their validation.

Each option has a parser that turns the user's string into its normal form, so that
Create can compare options of an existing volume. Add new options to OPTIONS only once
the feature behind them works.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from volplugin.backup import schedule
from volplugin.errors import BadOption

MAX_ID = 2**32 - 2


@dataclass(frozen=True)
class Option:
    """A documented option: its name, what it does, and how to normalise a value."""

    name: str
    help: str
    parse: Callable[[str], str]


def _parse_id(kind: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if not re.fullmatch(r"[0-9]+", value) or int(value) > MAX_ID:
            raise ValueError(f"a numeric {kind} between 0 and {MAX_ID}")
        return str(int(value))

    return parse


def _parse_mode(value: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3,4}", value) or int(value, 8) > 0o7777:
        raise ValueError("an octal permission mode such as 0755 or 1777")
    return f"{int(value, 8):04o}"


def _parse_bool(value: str) -> str:
    lowered = value.lower()
    if lowered in ("true", "yes", "on", "1"):
        return "true"
    if lowered in ("false", "no", "off", "0"):
        return "false"
    raise ValueError("true or false")


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def _parse_duration(value: str) -> str:
    """A duration such as 90, 90s, 5m or 1h, in normal form: whole seconds."""
    found = re.fullmatch(r"([0-9]{1,6})([smh]?)", value)
    if not found:
        raise ValueError("a duration such as 90s, 5m or 1h")
    return str(int(found.group(1)) * _UNITS[found.group(2)])


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(" or ".join(choices))
        return value

    return parse


MAX_WAIT = 90  # seconds: the daemon gives up on a Mount after two minutes

OPTIONS: dict[str, Option] = {
    opt.name: opt
    for opt in (
        Option("uid", "numeric owner of the volume's root directory (default 0)", _parse_id("uid")),
        Option("gid", "numeric group of the volume's root directory (default 0)", _parse_id("gid")),
        Option(
            "mode", "octal permissions of the volume's root directory (default 0755)", _parse_mode
        ),
        Option("from", "restore the new volume from this backup", schedule.parse_backup_ref),
        Option("backup-schedule", "back the volume up at these times (cron)", schedule.parse_cron),
        Option("backup-keep", "retention after each scheduled backup", schedule.normal_keep),
        Option("lazy", "with from: usable at once, filled in the background", _parse_bool),
        Option(
            "roaming",
            "the volume follows its containers between hosts sharing the store (S3)",
            _parse_bool,
        ),
        Option(
            "wait",
            "roaming: how long a Mount waits for another host to hand the volume over",
            _parse_duration,
        ),
        Option(
            "on-lease-loss",
            "roaming: when this host loses the volume, stop its containers or make it read-only",
            _parse_choice("stop", "readonly"),
        ),
        Option(
            "checkpoint-interval",
            "roaming: back the mounted volume up this often, bounding what a dead host loses",
            _parse_duration,
        ),
        Option(
            "sidekick-socket",
            "serve a plugin socket scoped to this volume, for sidekick containers",
            _parse_bool,
        ),
    )
}


def accepted() -> str:
    """The accepted option names, for error messages."""
    return ", ".join(sorted(OPTIONS))


def normalize(opts: Mapping[str, object] | None) -> dict[str, str]:
    """Validate options and return them in normal form; raise BadOption naming the bad one."""
    if opts is None:
        return {}
    if not isinstance(opts, Mapping):
        raise BadOption(
            f"Opts must be an object of KEY: VALUE strings; accepted keys: {accepted()}"
        )
    result: dict[str, str] = {}
    for key, value in opts.items():
        option = OPTIONS.get(key)
        if option is None:
            raise BadOption(f"unknown option {key!r}: accepted options are {accepted()}")
        if not isinstance(value, str):
            raise BadOption(f"option {key!r} must be a string, got {type(value).__name__}")
        try:
            result[key] = option.parse(value.strip())
        except ValueError as exc:
            raise BadOption(f"bad value {value!r} for option {key!r}: expected {exc}") from None
    if "backup-keep" in result and "backup-schedule" not in result:
        raise BadOption(
            "option 'backup-keep' applies after scheduled backups: "
            "give 'backup-schedule' too, or prune with `volplugin prune`"
        )
    roaming_only = sorted(
        k for k in ("wait", "on-lease-loss", "checkpoint-interval") if k in result
    )
    if roaming_only and result.get("roaming") != "true":
        raise BadOption(f"option {roaming_only[0]!r} applies to roaming volumes: give roaming=true")
    if result.get("roaming") == "true" and "from" in result:
        raise BadOption(
            "a roaming volume starts empty or from its own head: create it without "
            "'from', then restore a backup into it with `volplugin restore`"
        )
    if int(result.get("wait", "0")) > MAX_WAIT:
        raise BadOption(
            f"option 'wait' is at most {MAX_WAIT}s: the Docker daemon gives up on a Mount "
            "after two minutes"
        )
    if result.get("checkpoint-interval") == "0":
        raise BadOption("option 'checkpoint-interval' must be at least 1s")
    if result.get("lazy") == "true" and "from" not in result:
        raise BadOption("option 'lazy' restores lazily from a backup: give 'from' too")
    return dict(sorted(result.items()))
