"""containerd's list filters over snapshots, the part of the syntax snapshots use.

A filter is selectors joined by ``,`` (all must hold); a snapshot is listed if
any filter holds (none given: all). A selector is ``FIELD``
(present and not empty), ``FIELD==VALUE``, ``FIELD!=VALUE`` or
``FIELD~=REGEXP``; FIELD is ``name``, ``parent``, ``kind`` or
``labels.KEY``, where KEY and VALUE may be double-quoted (containerd's
quoting, with backslash escapes), e.g. ``labels."containerd.io/gc.root"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from layerfs.snapshotter.metadata import InvalidArgument, Snapshot


def _unquote(text: str) -> str:
    if text.startswith('"'):
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _field(snap: Snapshot, path: list[str]) -> str | None:
    if path == ["name"]:
        return snap.key
    if path == ["parent"]:
        return snap.parent
    if path == ["kind"]:
        return snap.kind.value
    if len(path) == 2 and path[0] == "labels":
        return snap.labels.get(path[1])
    return None


def _scan(text: str) -> list[tuple[int, str]]:
    """Positions and characters of ``text`` outside double quotes."""
    out, quoted, escaped = [], False, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted:
            out.append((i, ch))
    return out


def _selector(text: str) -> Callable[[Snapshot], bool]:
    op, value, field_text = None, None, text
    for i, _ch in _scan(text):
        if text[i : i + 2] in ("==", "!=", "~="):
            op, field_text, value = (
                text[i : i + 2],
                text[:i].strip(),
                _unquote(text[i + 2 :].strip()),
            )
            break
    head, dot, rest = field_text.partition(".")
    path = [head, _unquote(rest)] if dot else [head]
    if path[0] not in ("name", "parent", "kind", "labels") or (path[0] == "labels") != bool(dot):
        raise InvalidArgument(f"unknown field {field_text!r} in filter {text!r}")
    if op == "~=":
        try:
            pattern = re.compile(value or "")
        except re.error as exc:
            raise InvalidArgument(f"bad regular expression in filter {text!r}: {exc}") from None

    def check(snap: Snapshot) -> bool:
        found = _field(snap, path)
        if op is None:
            return bool(found)
        if op == "==":
            return found == value
        if op == "!=":
            return found != value
        return found is not None and pattern.search(found) is not None

    return check


def _split(text: str) -> list[str]:
    cuts = [i for i, ch in _scan(text) if ch == ","]
    parts = [text[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(text)], strict=True)]
    return [p.strip() for p in parts if p.strip()]


def parse_filters(filters: list[str]) -> Callable[[Snapshot], bool]:
    """A predicate: does a snapshot match any of ``filters`` (all when none)?"""
    parsed = [[_selector(s) for s in _split(f)] for f in filters if f.strip()]
    if not parsed:
        return lambda snap: True
    return lambda snap: any(all(sel(snap) for sel in conj) for conj in parsed)
