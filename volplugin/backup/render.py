"""Text for people from the backup commands' JSON answers (plugin or in-process alike).

Every backup command first gets the JSON document the plugin's endpoint answers (or
the same document computed in-process with --root/--store), then prints it here, so
both ways print the same lines. Texts from stores and containers pass through
`printable`.
"""

from __future__ import annotations

from layerfs.clitools import human_bytes
from volplugin.text import printable


def backup_lines(record: dict) -> list[str]:
    """A finished backup (BackupRecord.to_json)."""
    return [
        f"backed up {printable(record['volume'])}: {record['files']} files "
        f"({human_bytes(record['size'])}), read {human_bytes(record['bytes_read'])}, "
        f"new {human_bytes(record['bytes_new'])} (stored {human_bytes(record['bytes_stored'])}) "
        f"in {record['duration']:.1f} s",
        f"backup {printable(record['id'])}",
    ]


def restore_lines(doc: dict) -> list[str]:
    """A finished restore ({id, target, entries, files, bytes})."""
    return [
        f"restored backup {printable(doc['id'])} into {printable(doc['target'])}: "
        f"{doc['entries']} entries, {doc['files']} files, {human_bytes(doc['bytes'])}"
    ]


def prune_lines(doc: dict) -> list[str]:
    """What a prune kept and forgot (PruneReport.to_json), then what it removed."""
    rows = [(True, k) for k in doc.get("keep", [])] + [(False, r) for r in doc.get("remove", [])]
    rows.sort(key=lambda row: row[1].get("time") or "", reverse=True)  # newest first
    rows.sort(key=lambda row: row[1].get("volume", ""))  # stable: by volume, newest first
    lines = []
    for keep, b in rows:
        why = ", ".join(b.get("reasons") or []) if keep else "remove"
        when = " ".join(printable(b[k]) for k in ("time", "host") if b.get(k))
        lines.append(
            f"{'keep  ' if keep else 'forget'} {printable(b['id'][:12])} "
            f"{when + ' ' if when else ''}{printable(b.get('volume', ''))} ({printable(why)})"
        )
    verb = "would remove" if doc.get("dry_run") else "removed"
    lines.append(
        f"{verb} {len(doc.get('remove', []))} backups, {doc.get('objects_removed', 0)} objects "
        f"({human_bytes(doc.get('bytes_freed', 0))})"
    )
    return lines


def backups_lines(summaries: list[dict]) -> list[str]:
    """The `volplugin backups` table (BackupRecord.summary of each)."""
    lines = [
        f"{'ID':<12} {'TIME':<25} {'HOST':<16} {'VOLUME':<20} {'FILES':>7} {'SIZE':>10} "
        f"{'NEW':>10}  TAGS"
    ]
    for r in summaries:
        lines.append(
            f"{printable(r['id'][:12]):<12} {printable(r['time']):<25} {printable(r['host']):<16} "
            f"{printable(r['volume']):<20} {r['files']:>7} {human_bytes(r['size']):>10} "
            f"{human_bytes(r['new_bytes']):>10}  {printable(','.join(r['tags']))}"
        )
    return lines


def diff_lines(changes: list[dict]) -> list[str]:
    """`+ path`, `- path`, `M path  (what)` (Change.to_json of each)."""
    lines = []
    for c in changes:
        suffix = f"  ({', '.join(c['what'])})" if c.get("what") else ""
        lines.append(printable(f"{c['change']} {c['path'] or '/'}{suffix}"))
    return lines


def verify_lines(doc: dict, what: str = "verify") -> list[str]:
    """A check report (CheckReport.to_json), as `layerfs fsck` prints one."""
    lines = [
        f"{what}: {doc['roots']} owners, {doc['referenced']} referenced objects, "
        f"{doc['checked']} re-hashed"
    ]
    if doc["ok"]:
        return [*lines, "no damage found"]
    for d in doc["damage"]:
        lines.append(
            f"damaged object {printable(d['digest'])}: {printable(d['problem'])} "
            f"({printable(d['detail'])})"
        )
    for affected in doc["affected"]:
        lines.append(f"{printable(affected['owner'])}: {len(affected['paths'])} damaged path(s)")
        lines.extend(f"  {printable(path)}" for path in affected["paths"])
    return lines


def result_lines(job: dict) -> list[str]:
    """What a succeeded job did, from its Result; [] when it has none that is known."""
    result = job.get("Result") or {}
    try:
        if "Backup" in result:
            return backup_lines(result["Backup"])
        if "Restore" in result:
            return restore_lines(result["Restore"])
        if "Prune" in result:
            return prune_lines(result["Prune"])[-1:]
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    return [printable(result)] if result else []
