"""Validation of volume names, so that a name can never reach a path outside the root."""

from __future__ import annotations

import re

from volplugin.errors import BadName

MAX_NAME = 255
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_name(name: object) -> str:
    """Return `name` if it is a valid volume name, else raise BadName saying why."""
    if not isinstance(name, str) or not name:
        raise BadName("volume name is missing: give a non-empty Name")
    if "\0" in name:
        raise BadName("volume name contains a NUL byte: use letters, digits, '_', '.', '-'")
    if len(name) > MAX_NAME:
        raise BadName(f"volume name is {len(name)} characters long: the limit is {MAX_NAME}")
    if "/" in name or "\\" in name:
        raise BadName(f"volume name {name!r} contains a path separator: use a plain name")
    if name in (".", "..") or not _NAME.fullmatch(name):
        raise BadName(
            f"volume name {name!r} is not allowed: start with a letter or digit, "
            "then use only letters, digits, '_', '.', '-'"
        )
    return name
