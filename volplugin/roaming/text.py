"""How roaming volumes read on a terminal: the `ls --all-hosts` table, the `inspect` lines.

Every text that came from the plugin or the store passes through `printable`.
"""

from __future__ import annotations

from volplugin.text import printable

COLUMNS = ("NAME", "HOLDER", "SINCE", "GENERATION", "HEAD AGE", "HEAD HOST")


def short_age(seconds: float | None) -> str:
    """`42s`, `3m`, `5h`, `2d` (the largest whole unit); `-` when unknown."""
    if seconds is None:
        return "-"
    s = max(int(seconds), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def holder_cell(volume: dict) -> str:
    """`a`, `a (expired)` (a named holder whose lease ran out: a dead host), or `-`."""
    if volume.get("Holder"):
        return printable(volume["Holder"])
    if volume.get("LeaseExpired") and volume.get("ExpiredHolder"):
        return f"{printable(volume['ExpiredHolder'])} (expired)"
    return "-"


def row(volume: dict) -> tuple[str, ...]:
    """One volume of /Roaming.List as the cells of COLUMNS."""
    head = volume.get("Head") or {}
    named = volume.get("Holder") or volume.get("LeaseExpired")
    return (
        printable(volume.get("Name")),
        holder_cell(volume),
        printable(volume["HolderSince"]) if named and volume.get("HolderSince") else "-",
        printable(volume.get("Generation", "-")),
        short_age(head.get("AgeSeconds")) if head else "-",
        printable(head["Host"]) if head.get("Host") else "-",
    )


def table(volumes: list[dict]) -> list[str]:
    """The lines of the `volplugin ls --all-hosts` table, with a header."""
    rows = [COLUMNS, *(row(v) for v in volumes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def status_lines(roaming: dict) -> list[tuple[str, str]]:
    """The `Roaming` part of a volume's Status as (label, text) lines for `inspect`."""
    p = printable
    lines = [
        ("Roaming:", f"yes; this host is {p(roaming.get('Host'))}"),
        ("Lease here:", p(roaming.get("Lease"))),
    ]
    if roaming.get("Error"):
        lines.append(("", p(roaming["Error"])))
    elif roaming.get("Holder"):
        lines.append(
            (
                "Holder:",
                f"host {p(roaming['Holder'])} since {p(roaming.get('HolderSince'))} "
                f"(generation {p(roaming.get('Generation'))})",
            )
        )
    else:
        lines.append(("Holder:", f"none (generation {p(roaming.get('Generation', '-'))})"))
    if "Head" in roaming:
        head = roaming["Head"]
        lines.append(
            (
                "Head:",
                f"backup {p(head['Backup'])} of {p(head['Time'])} "
                f"({short_age(head.get('AgeSeconds'))} old, by host {p(head['Host'])})"
                if head
                else "none (no backup published yet)",
            )
        )
    notes = roaming.get("Notes") or []
    for i, note in enumerate(notes):
        lines.append(("Notes:" if i == 0 else "", f"- {p(note)}"))
    return lines
