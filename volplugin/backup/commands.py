"""The backup subcommands of `volplugin` (backup, backups, restore, diff, prune, verify).

By default they ask the running plugin over its socket, which uses its own store:
`backups`, `diff` and `verify` answer at once; `backup`, `restore` and `prune` start a
job in the plugin and follow it to its end with its progress (`--no-wait`: print the
job's id and return). They work in-process instead when given --root DIR (a root no
`serve` holds, for the commands that change it; the store is the one serve recorded
there unless --store is given); `backups`, `diff`, `verify` and `prune` also when a
store is named (--store or LAYERFS_STORE); `backup --path DIR` and `restore --to-dir
DIR` always do. The store and backup modules are imported when a command runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from layerfs.clitools import store_option
from layerfs.errors import LayerfsError
from layerfs.store.backend import DEFAULT_GRACE_SECONDS
from volplugin.backup.errors import BackupError, DamageFound
from volplugin.defaults import DEFAULT_ROOT
from volplugin.errors import BadOption, VolpluginError
from volplugin.hostid import host_id
from volplugin.pluginrecord import resolve_store
from volplugin.text import printable
from volplugin.where import Where, log_here, where_options

if TYPE_CHECKING:
    from layerfs.store.chunks import ChunkStore


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Store errors become the plugin's one-line errors."""
    try:
        yield
    except VolpluginError:
        raise
    except LayerfsError as exc:
        raise BackupError(str(exc)) from exc


def _open_store(where: Where, store: str | None) -> ChunkStore:
    """The store for in-process work: --store, else the one serve recorded in the root."""
    from layerfs.store.location import open_store

    log_here()
    return open_store(resolve_store(Path(where.root or DEFAULT_ROOT), store))


def _command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --name/--root/--plugin-dir and --store; one-line errors for store errors."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _store_errors():
            return fn(*args, **kwargs)

    run = store_option(
        "Work in-process on this store (default: for --root the one serve recorded in the "
        "root, else as for layerfs); without it and --root, the plugin's store is used."
    )(run)
    return where_options(run)


def _no_wait(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--no-wait",
        is_flag=True,
        help="Through the plugin: print the job's id and return; `volplugin job ID` follows it.",
    )(fn)


def _refuse_plugin_store(store: str | None, what: str) -> None:
    """--store on the command line of a command the plugin runs with its own store."""
    ctx = click.get_current_context()
    if store is not None and ctx.get_parameter_source("store") is ParameterSource.COMMANDLINE:
        raise BadOption(
            f"--store works in-process only: the plugin {what} with its own store; drop "
            "--store, or add --root DIR to work on a root that no plugin serves"
        )


def _refuse_no_wait(no_wait: bool) -> None:
    if no_wait:
        raise BadOption(
            "--no-wait starts a job in the plugin: it does not go with --root, --path or --to-dir"
        )


def _run_job(where: Where, endpoint: str, doc: dict, key: str, no_wait: bool, as_json: bool):
    """Start a job with `endpoint` and follow it: its Result[`key`]; None with `no_wait`.

    A plugin that answers with the result at once (an older one, without jobs) is fine.
    """
    from volplugin.follow import follow, succeeded
    from volplugin.jobtext import command

    client = where.client()
    answer = client.call(endpoint, doc, timeout=None)
    if "Job" not in answer:
        return answer[key]
    job = answer["Job"]
    if no_wait:
        click.echo(json.dumps(job) if as_json else printable(job["ID"]))
        click.echo(
            f"started {job.get('Kind')} job {printable(job['ID'])}: "
            f"`{command(client)} job {printable(job['ID'])} --wait` follows it",
            err=True,
        )
        return None
    return succeeded(follow(client, job))["Result"][key]


def _echo(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)


def _check_grace(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0 <= value < math.inf:  # also refuses nan
        raise click.BadParameter(f"{value} is not a finite number of seconds, 0 or more")
    return value


@click.command("backup")
@click.argument("volume")
@click.option("--tag", "tags", multiple=True, help="Tag the backup (repeatable).")
@click.option(
    "--path",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Back up this directory (as VOLUME), in-process, instead of the plugin volume.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_no_wait
@_command
def backup_cmd(
    where: Where,
    volume: str,
    tags: tuple[str, ...],
    path: Path | None,
    as_json: bool,
    no_wait: bool,
    store: str | None,
) -> None:
    """Snapshot VOLUME into the store (only changed files are read).

    A plugin volume is backed up by the plugin, whose consistency hooks quiet the
    containers using it. With --root the backup runs in-process, and the containers are
    found by the plugin name (--name, else the one `serve` recorded in the root).
    """
    if path is not None:
        from volplugin.backup import service

        _refuse_no_wait(no_wait)
        record = service.create_backup(
            _open_store(where, store), volume, path, list(tags), host=host_id()
        ).to_json()
    elif where.direct:
        from volplugin.backup import volumes
        from volplugin.backup.runner import run_backup

        _refuse_no_wait(no_wait)
        assert where.root is not None
        from volplugin.rootlock import unserved_root

        with unserved_root(where.root, "backup"):
            opened = _open_store(where, store)
            svc = volumes.open_service(where.root, where.root_name(required=True))
            record = run_backup(svc, opened, volume, tags, trigger="cli").to_json()
    else:
        _refuse_plugin_store(store, "backs up")
        doc = {"Volume": volume, "Tags": list(tags)}
        record = _run_job(where, "Backup.Create", doc, "Backup", no_wait, as_json)
        if record is None:
            return
    if as_json:
        click.echo(json.dumps(record))
    else:
        from volplugin.backup import render

        _echo(render.backup_lines(record))


@click.command("backups")
@click.argument("volume", required=False)
@click.option("--host", help="Only the backups this host id took.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_command
def backups_cmd(
    where: Where, volume: str | None, host: str | None, as_json: bool, store: str | None
) -> None:
    """List backups (of VOLUME), oldest first, with the host that took each."""
    if where.direct or store is not None:
        from volplugin.backup import service

        records = service.list_backups(_open_store(where, store).backend, volume)
        summaries = [r.summary() for r in records if host is None or r.host == host]
    else:
        doc = {"Volume": volume, "Host": host}
        summaries = where.client().call("Backup.List", doc, timeout=None)["Backups"]
    if as_json:
        click.echo(json.dumps(summaries))
    else:
        from volplugin.backup import render

        _echo(render.backups_lines(summaries))


@click.command("restore")
@click.argument("backup")
@click.option("--to", "to_volume", help="Plugin volume to restore into (created if missing).")
@click.option(
    "--to-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to restore into (in-process) instead of a volume.",
)
@click.option("--path", "subpath", help="Restore only this path of the backup.")
@click.option("--force", is_flag=True, help="Restore into a non-empty target.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_no_wait
@_command
def restore_cmd(
    where: Where,
    backup: str,
    to_volume: str | None,
    to_dir: Path | None,
    subpath: str | None,
    force: bool,
    as_json: bool,
    no_wait: bool,
    store: str | None,
) -> None:
    """Restore BACKUP (or its --path) into a volume or directory."""
    if (to_volume is None) == (to_dir is None):
        raise BackupError("give exactly one of --to VOLUME or --to-dir DIR")
    if to_dir is not None or where.direct:
        _refuse_no_wait(no_wait)
        doc = _restore_here(where, store, backup, to_volume, to_dir, subpath, force)
    else:
        _refuse_plugin_store(store, "restores")
        request = {"Backup": backup, "Volume": to_volume, "Force": force}
        if subpath:
            request["Path"] = subpath
        doc = _run_job(where, "Backup.Restore", request, "Restore", no_wait, as_json)
        if doc is None:
            return
    if as_json:
        click.echo(json.dumps(doc))
    else:
        from volplugin.backup import render

        _echo(render.restore_lines(doc))


def _restore_here(
    where: Where,
    store: str | None,
    backup: str,
    to_volume: str | None,
    to_dir: Path | None,
    subpath: str | None,
    force: bool,
) -> dict:
    """Restore in-process into `to_dir`, or into `to_volume` of the root."""
    from volplugin.backup import service, volumes
    from volplugin.rootlock import unserved_root

    with contextlib.ExitStack() as stack:
        if to_dir is None:
            assert where.root is not None
            stack.enter_context(unserved_root(where.root, "restore"))
        opened = _open_store(where, store)
        plan = stack.enter_context(service.open_restore(opened, backup, subpath=subpath))
        if to_dir is not None:  # the backup is found and checked before a volume exists
            target, result = to_dir, plan.run(to_dir, force=force)[1]
        else:
            assert where.root is not None
            svc = volumes.open_service(where.root, where.root_name())
            target, result = volumes.restore_into_volume(svc, to_volume, plan, force=force)
        record = plan.record
    return {
        "id": record.id,
        "target": str(target),
        "entries": result.entries,
        "files": result.files,
        "bytes": result.bytes,
    }


@click.command("diff")
@click.argument("backup_a")
@click.argument("backup_b")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_command
def diff_cmd(where: Where, backup_a: str, backup_b: str, as_json: bool, store: str | None) -> None:
    """Show what changed from BACKUP_A to BACKUP_B (+ added, - removed, M modified)."""
    if where.direct or store is not None:
        from volplugin.backup import service

        found = service.diff_backups(_open_store(where, store), backup_a, backup_b)
        changes = [c.to_json() for c in found]
    else:
        doc = {"A": backup_a, "B": backup_b}
        changes = where.client().call("Backup.Diff", doc, timeout=None)["Changes"]
    if as_json:
        click.echo(json.dumps(changes))
    else:
        from volplugin.backup import render

        _echo(render.diff_lines(changes))


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
    "not only this host's (--host-id; through the plugin, the plugin's).",
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
@_no_wait
@_command
def prune_cmd(
    where: Where,
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
    no_wait: bool,
    store: str | None,
) -> None:
    """Forget backups outside the retention policy, then remove unreferenced data.

    The policy applies to each volume of each host separately, and only to this host's
    backups (its --host-id; through the plugin, the plugin's) unless --all-hosts is given.
    """
    keep = (keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    if where.direct or store is not None:
        from volplugin.backup import service
        from volplugin.backup.retention import Policy
        from volplugin.rootlock import unserved_root

        _refuse_no_wait(no_wait)
        with contextlib.ExitStack() as stack:
            if where.root is not None:
                stack.enter_context(unserved_root(where.root, "prune"))
            report = service.prune_backups(
                _open_store(where, store),
                Policy(*keep),
                volume=volume,
                dry_run=dry_run,
                grace_seconds=grace,
                host=host_id(),
                all_hosts=all_hosts,
            ).to_json()
    else:
        names = ("KeepLast", "KeepHourly", "KeepDaily", "KeepWeekly", "KeepMonthly", "KeepYearly")
        doc: dict = dict(zip(names, keep, strict=True))
        doc.update(DryRun=dry_run, Grace=grace, AllHosts=all_hosts)
        if volume:
            doc["Volume"] = volume
        report = _run_job(where, "Backup.Prune", doc, "Prune", no_wait, as_json)
        if report is None:
            return
    if as_json:
        click.echo(json.dumps(report))
    else:
        from volplugin.backup import render

        _echo(render.prune_lines(report))


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
    where: Where,
    read_data: bool,
    subset: float,
    volume: str | None,
    as_json: bool,
    store: str | None,
) -> None:
    """Check that every backup's data exists (and with --read-data is intact)."""
    if where.direct or store is not None:
        from volplugin.backup import service

        report = service.verify_backups(
            _open_store(where, store), read_data=read_data, subset_percent=subset, volume=volume
        ).to_json()
    else:
        from volplugin.client import PluginError

        doc: dict = {"ReadData": read_data, "Subset": subset}
        if volume:
            doc["Volume"] = volume
        try:
            report = where.client().call("Backup.Verify", doc, timeout=None)["Verify"]
        except PluginError as exc:
            if not isinstance(exc.answer.get("Verify"), dict):
                raise
            report = exc.answer["Verify"]  # damage found: the report says where
    if as_json:
        click.echo(json.dumps(report))
    else:
        from volplugin.backup import render

        _echo(render.verify_lines(report))
    if not report["ok"]:
        if as_json:
            sys.exit(1)
        owners = ", ".join(a["owner"] for a in report["affected"])
        owners = printable(owners) or "no backup (only unreferenced objects)"
        raise DamageFound(f"damage found in {owners}: see above")


COMMANDS: list[click.Command] = [
    backup_cmd,
    backups_cmd,
    restore_cmd,
    diff_cmd,
    prune_cmd,
    verify_cmd,
]
