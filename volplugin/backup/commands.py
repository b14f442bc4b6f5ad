"""The backup subcommands of `volplugin` (backup, backups, restore, diff, prune, verify).

Without --store they use the store `serve` recorded in the root (volplugin.pluginrecord);
`backup` of a plugin volume also needs the plugin's name, recorded or given with --name.
The store and backup modules are imported when a command runs, not for --help.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from layerfs.clitools import human_bytes, store_option
from layerfs.errors import LayerfsError
from layerfs.store.backend import DEFAULT_GRACE_SECONDS
from volplugin.backup.errors import BackupError, DamageFound
from volplugin.errors import VolpluginError
from volplugin.hostid import host_id
from volplugin.pluginrecord import resolve_name, resolve_store
from volplugin.text import printable

if TYPE_CHECKING:
    from layerfs.store.chunks import ChunkStore
    from volplugin.backup.volumes import VolumeService


def _command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --store, and turn store errors into the plugin's one-line errors."""

    @functools.wraps(fn)
    def run(*args: Any, store: str | None, **kwargs: Any) -> Any:
        from layerfs.store.location import open_store

        obj = click.get_current_context().obj
        try:
            store = resolve_store(Path(obj["root"]) if obj else None, store)
            return fn(*args, store=open_store(store), **kwargs)
        except VolpluginError:
            raise
        except LayerfsError as exc:
            raise BackupError(str(exc)) from exc

    return store_option("Store location (default as for layerfs).")(run)


def _check_grace(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0 <= value < math.inf:  # also refuses nan
        raise click.BadParameter(f"{value} is not a finite number of seconds, 0 or more")
    return value


def _service_of(obj: dict | None, *, name_required: bool = False) -> VolumeService:
    """The plugin's volumes; `name_required`: refuse to guess the plugin's name."""
    from volplugin.backup import volumes

    if not obj:
        raise BackupError("no plugin root known: run through `volplugin` or pass --path DIR")
    root = Path(obj["root"])
    return volumes.open_service(root, resolve_name(root, obj["name"], required=name_required))


@click.command("backup")
@click.argument("volume")
@click.option("--tag", "tags", multiple=True, help="Tag the backup (repeatable).")
@click.option(
    "--path",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Back up this directory (as VOLUME) instead of the plugin volume's directory.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_command
@click.pass_obj
def backup_cmd(
    obj: dict | None,
    volume: str,
    tags: tuple[str, ...],
    path: Path | None,
    as_json: bool,
    store: ChunkStore,
) -> None:
    """Snapshot VOLUME into the store (only changed files are read).

    A plugin volume's containers are quieted by its consistency hooks; they are found by
    the plugin's name (--name, else the one `serve` recorded in the root).
    """
    from volplugin.backup import service
    from volplugin.backup.runner import run_backup

    if path is not None:
        record = service.create_backup(store, volume, path, list(tags), host=host_id())
    else:  # a plugin volume: with its consistency hooks, outcome recorded
        svc = _service_of(obj, name_required=True)
        record = run_backup(svc, store, volume, tags, trigger="cli")
    if as_json:
        click.echo(json.dumps(record.to_json()))
        return
    click.echo(
        f"backed up {record.volume}: {record.files} files ({human_bytes(record.size)}), "
        f"read {human_bytes(record.bytes_read)}, new {human_bytes(record.bytes_new)} "
        f"(stored {human_bytes(record.bytes_stored)}) in {record.duration:.1f} s"
    )
    click.echo(f"backup {record.id}")


@click.command("backups")
@click.argument("volume", required=False)
@click.option("--host", help="Only the backups this host id took.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_command
def backups_cmd(volume: str | None, host: str | None, as_json: bool, store: ChunkStore) -> None:
    """List backups (of VOLUME), oldest first, with the host that took each."""
    from volplugin.backup import service

    records = service.list_backups(store.backend, volume)
    if host is not None:
        records = [r for r in records if r.host == host]
    if as_json:
        click.echo(json.dumps([r.summary() for r in records]))
        return
    click.echo(
        f"{'ID':<12} {'TIME':<25} {'HOST':<16} {'VOLUME':<20} {'FILES':>7} {'SIZE':>10} "
        f"{'NEW':>10}  TAGS"
    )
    for r in records:
        click.echo(
            f"{r.id[:12]:<12} {r.time_iso:<25} {printable(r.host):<16} {r.volume:<20} "
            f"{r.files:>7} {human_bytes(r.size):>10} {human_bytes(r.bytes_new):>10}  "
            f"{printable(','.join(r.tags))}"
        )


@click.command("restore")
@click.argument("backup")
@click.option("--to", "to_volume", help="Plugin volume to restore into (created if missing).")
@click.option(
    "--to-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to restore into instead of a volume.",
)
@click.option("--path", "subpath", help="Restore only this path of the backup.")
@click.option("--force", is_flag=True, help="Restore into a non-empty target.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_command
@click.pass_obj
def restore_cmd(
    obj: dict | None,
    backup: str,
    to_volume: str | None,
    to_dir: Path | None,
    subpath: str | None,
    force: bool,
    as_json: bool,
    store: ChunkStore,
) -> None:
    """Restore BACKUP (or its --path) into a volume or directory."""
    from volplugin.backup import service, volumes

    if (to_volume is None) == (to_dir is None):
        raise BackupError("give exactly one of --to VOLUME or --to-dir DIR")
    with service.open_restore(store, backup, subpath=subpath) as plan:  # before a volume exists
        if to_dir is not None:
            target, result = to_dir, plan.run(to_dir, force=force)[1]
        else:
            target, result = volumes.restore_into_volume(
                _service_of(obj), to_volume, plan, force=force
            )
        record = plan.record
    doc = {
        "id": record.id,
        "target": str(target),
        "entries": result.entries,
        "files": result.files,
        "bytes": result.bytes,
    }
    if as_json:
        click.echo(json.dumps(doc))
    else:
        click.echo(
            f"restored backup {record.id} into {target}: {result.entries} entries, "
            f"{result.files} files, {human_bytes(result.bytes)}"
        )


@click.command("diff")
@click.argument("backup_a")
@click.argument("backup_b")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_command
def diff_cmd(backup_a: str, backup_b: str, as_json: bool, store: ChunkStore) -> None:
    """Show what changed from BACKUP_A to BACKUP_B (+ added, - removed, M modified)."""
    from volplugin.backup import service

    changes = service.diff_backups(store, backup_a, backup_b)
    if as_json:
        click.echo(json.dumps([c.to_json() for c in changes]))
        return
    for change in changes:
        click.echo(str(change))


@click.command("prune")
@click.option("--keep-last", type=int, default=0, help="Keep the N newest backups.")
@click.option("--keep-hourly", type=int, default=0, help="Keep the newest of N hours.")
@click.option("--keep-daily", type=int, default=0, help="Keep the newest of N days.")
@click.option("--keep-weekly", type=int, default=0, help="Keep the newest of N weeks.")
@click.option("--keep-monthly", type=int, default=0, help="Keep the newest of N months.")
@click.option("--keep-yearly", type=int, default=0, help="Keep the newest of N years.")
@click.option("--volume", help="Apply the policy to this volume's backups only.")
@click.option(
    "--all-hosts",
    is_flag=True,
    help="Apply the policy to every host's backups (each host's separately), "
    "not only this host's (--host-id).",
)
@click.option("--dry-run", is_flag=True, help="Only show what would go.")
@click.option(
    "--grace",
    type=float,
    callback=_check_grace,
    default=DEFAULT_GRACE_SECONDS,
    show_default=True,
    help="Never delete objects younger than this many seconds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_command
def prune_cmd(
    keep_last: int,
    keep_hourly: int,
    keep_daily: int,
    keep_weekly: int,
    keep_monthly: int,
    keep_yearly: int,
    volume: str | None,
    all_hosts: bool,
    dry_run: bool,
    grace: float,
    as_json: bool,
    store: ChunkStore,
) -> None:
    """Forget backups outside the retention policy, then remove unreferenced data.

    The policy applies to each volume of each host separately, and only to this host's
    backups (its --host-id) unless --all-hosts is given.
    """
    from volplugin.backup import service
    from volplugin.backup.retention import Policy

    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    report = service.prune_backups(
        store,
        policy,
        volume=volume,
        dry_run=dry_run,
        grace_seconds=grace,
        host=host_id(),
        all_hosts=all_hosts,
    )
    if as_json:
        click.echo(json.dumps(report.to_json()))
        return
    verb = "would remove" if dry_run else "removed"
    for d in report.decisions:
        why = ", ".join(d.reasons) if d.keep else "remove"
        click.echo(
            f"{'keep  ' if d.keep else 'forget'} {d.backup.id[:12]} {d.backup.time_iso} "
            f"{printable(d.backup.host)} {d.backup.volume} ({why})"
        )
    gc = report.gc
    assert gc is not None
    click.echo(
        f"{verb} {len(report.removed)} backups, "
        f"{gc.removed} objects ({human_bytes(gc.freed_bytes)})"
    )


@click.command("verify")
@click.option("--read-data", is_flag=True, help="Re-read and re-hash the data too.")
@click.option(
    "--subset",
    type=click.FloatRange(0, 100, min_open=True),
    default=100.0,
    help="With --read-data: re-hash only this percentage of the chunks.",
)
@click.option("--volume", help="Verify only this volume's backups.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_command
def verify_cmd(
    read_data: bool, subset: float, volume: str | None, as_json: bool, store: ChunkStore
) -> None:
    """Check that every backup's data exists (and with --read-data is intact)."""
    from layerfs.commands.maintenance import print_check_report
    from volplugin.backup import service

    report = service.verify_backups(
        store, read_data=read_data, subset_percent=subset, volume=volume
    )
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        print_check_report(report, "verify")
    if not report.ok:
        if as_json:
            sys.exit(1)
        owners = ", ".join(report.damaged_owners()) or "no backup (only unreferenced objects)"
        raise DamageFound(f"damage found in {owners}: see above")


COMMANDS: list[click.Command] = [
    backup_cmd,
    backups_cmd,
    restore_cmd,
    diff_cmd,
    prune_cmd,
    verify_cmd,
]
