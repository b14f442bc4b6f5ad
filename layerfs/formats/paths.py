"""Archive paths to store paths: relative, '/'-separated, never escaping the root."""

from __future__ import annotations

NAME_MAX = 255


class BadPath(ValueError):
    """A path that is absolute, climbs out with '..', or has an over-long name."""


def normalize(path: str) -> str:
    """Normalise a tar member path: drop './', '.', empty parts and a trailing '/'.

    The root itself ('.', './', '/') becomes ''. Absolute paths, '..' components
    and names longer than 255 bytes raise BadPath.
    """
    if path.startswith("/") and path.strip("/"):
        raise BadPath(f"the path {path!r} is absolute and would escape the root")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise BadPath(f"the path {path!r} climbs out of the root with '..'")
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise BadPath(f"the path {path!r} has a name longer than {NAME_MAX} bytes")
    return "/".join(parts)


def check_stored(path: str) -> str:
    """Check a path read from the store: already normal, so usable beneath a root as it is.

    A stored path is relative and '/'-separated, with no empty, '.' or '..'
    component, no NUL, and no name over 255 bytes; the root itself is ''. Raises
    BadPath naming what is wrong; returns the path unchanged.
    """
    if not isinstance(path, str):
        raise BadPath(f"the path {path!r} is not a string")
    if not path:
        return path
    if "\0" in path:
        raise BadPath(f"the path {path!r} contains a NUL byte")
    if path.startswith("/"):
        raise BadPath(f"the path {path!r} is absolute and would escape the root")
    for part in path.split("/"):
        if part in ("", "."):
            raise BadPath(f"the path {path!r} is not normalised (empty or '.' component)")
        if part == "..":
            raise BadPath(f"the path {path!r} climbs out of the root with '..'")
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise BadPath(f"the path {path!r} has a name longer than {NAME_MAX} bytes")
    return path
