"""The `volplugin` command line: serve the plugin, and read volume state (ls, inspect).

`ls` and `inspect` read the state database directly, so they work while `serve` is down.
Without --name, commands on a root use the name `serve` recorded there (pluginrecord).
Heavy libraries (flask, waitress, the docker SDK, boto3) are imported by the commands
that use them, so that --help and small commands start fast.
The backup feature adds its commands from volplugin.backup.commands.COMMANDS.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from layerfs.clitools import OneLineErrors, password_option, store_option
from volplugin.defaults import (
    DEFAULT_NAME,
    DEFAULT_ROOT,
    DEFAULT_THREADS,
    DEFAULT_TICK,
    PLUGIN_DIR,
)
from volplugin.errors import BadRequest
from volplugin.hostid import ENV as HOST_ID_ENV
from volplugin.hostid import check_host_id, use_host_id
from volplugin.pluginrecord import resolve_name
from volplugin.sidekick.paths import SIDEKICK_DIR
from volplugin.text import printable

if TYPE_CHECKING:
    from volplugin.volumes.service import VolumeService


class _Group(OneLineErrors):
    prog = "volplugin"


def _host_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            check_host_id(value)
        except BadRequest as exc:
            raise click.BadParameter(str(exc)) from None
    return value


host_id_option = click.option(
    "--host-id",
    envvar=HOST_ID_ENV,
    callback=_host_id,
    help="This host's id, recorded in its backups; retention (prune, backup-keep) only "
    "forgets backups of this id. Default: the hostname.",
)


@click.group(cls=_Group)
@click.option(
    "--root",
    envvar="VOLPLUGIN_ROOT",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_ROOT,
    show_default=True,
    help="Directory holding the volumes and their state.",
)
@click.option(
    "--name",
    envvar="VOLPLUGIN_NAME",
    default=None,
    help="Plugin name: the driver name for docker and the socket's name. Default: for "
    f"serve {DEFAULT_NAME}; for other commands the name serve recorded in ROOT/plugin.json.",
)
@host_id_option
@password_option()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.pass_context
def cli(ctx: click.Context, root: Path, name: str, host_id: str | None, verbose: bool) -> None:
    """A Docker volume plugin: volumes are directories under ROOT, state in SQLite."""
    use_host_id(host_id)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="volplugin: %(levelname)s: %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # botocore's INFO lines (where credentials were found) are noise here
        logging.getLogger("botocore").setLevel(logging.WARNING)
    ctx.obj = {"root": root, "name": name}


def where(fn):
    """Add --name and --root to a command; they override the group's values."""
    fn = click.option(
        "--root",
        "cmd_root",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"Root directory (default {DEFAULT_ROOT}).",
    )(fn)
    return click.option(
        "--name",
        "cmd_name",
        default=None,
        help=f"Plugin name (default: as recorded by serve in the root, else {DEFAULT_NAME}).",
    )(fn)


def _pick(obj: dict, name: str | None, root: Path | None) -> tuple[str, Path]:
    """Name and root for `serve`: the name given, else the default one."""
    return name or obj["name"] or DEFAULT_NAME, Path(root or obj["root"])


def _where(obj: dict, name: str | None, root: Path | None) -> tuple[str, Path]:
    """Name and root for a command on a root: the name given, else the recorded one."""
    path = Path(root or obj["root"])
    return resolve_name(path, name or obj["name"]), path


@cli.command("serve")
@where
@click.option("--threads", default=DEFAULT_THREADS, show_default=True, help="Request threads.")
@click.option(
    "--plugin-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=PLUGIN_DIR,
    show_default=True,
    help="Where the daemon looks for plugin sockets.",
)
@store_option("Backup store for backups, -o from= and -o backup-schedule (default as for layerfs).")
@password_option()
@click.option(
    "--schedule-tick",
    envvar="VOLPLUGIN_SCHEDULE_TICK",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_TICK,
    show_default=True,
    help="Seconds between looks for due scheduled backups.",
)
@host_id_option
@click.option(
    "--sidekick-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=SIDEKICK_DIR,
    show_default=True,
    help="Where volumes created with -o sidekick-socket=true get their scoped sockets.",
)
@click.option(
    "--metrics-address",
    metavar="HOST:PORT",
    default=None,
    help="Serve Prometheus metrics on this address (e.g. 127.0.0.1:9101). Default: off.",
)
@click.option(
    "--metrics-allow-remote",
    is_flag=True,
    help="Allow a --metrics-address that is not a loopback address.",
)
@click.pass_obj
def serve_cmd(
    obj: dict,
    cmd_name: str | None,
    cmd_root: Path | None,
    threads: int,
    plugin_dir: Path,
    store: str | None,
    schedule_tick: float,
    host_id: str | None,
    sidekick_dir: Path,
    metrics_address: str | None,
    metrics_allow_remote: bool,
) -> None:
    """Serve the volume plugin protocol on PLUGIN_DIR/NAME.sock until SIGTERM.

    The name and store are recorded in ROOT/plugin.json for the other commands.
    """
    from volplugin.server import serve

    name, root = _pick(obj, cmd_name, cmd_root)
    use_host_id(host_id)
    serve(
        name,
        root,
        plugin_dir=plugin_dir,
        threads=threads,
        store=store,
        schedule_tick=schedule_tick,
        sidekick_dir=sidekick_dir,
        metrics_address=metrics_address,
        metrics_allow_remote=metrics_allow_remote,
    )


def _service(obj: dict, cmd_name: str | None, cmd_root: Path | None) -> VolumeService:
    from volplugin.backup import status
    from volplugin.volumes.service import VolumeService
    from volplugin.volumes.state import State

    name, root = _where(obj, cmd_name, cmd_root)
    return status.attach(VolumeService(root, name, State.under(root, create=False)))


@cli.command("ls")
@where
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def ls_cmd(obj: dict, cmd_name: str | None, cmd_root: Path | None, as_json: bool) -> None:
    """List volumes with their size, users and creation time."""
    svc = _service(obj, cmd_name, cmd_root)
    docs = [svc.describe(r) for r in svc.list()]
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    click.echo(f"{'NAME':<32} {'SIZE':>12} {'CONTAINERS':>10}  CREATED")
    for doc in docs:
        st = doc["Status"]
        click.echo(
            f"{printable(doc['Name']):<32} {st['Size']:>12} {st['Containers']:>10}  "
            f"{printable(st['Created'])}"
        )


@cli.command("inspect")
@where
@click.argument("volume")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def inspect_cmd(
    obj: dict, cmd_name: str | None, cmd_root: Path | None, volume: str, as_json: bool
) -> None:
    """Show one volume: mountpoint, size, users, options, last backup."""
    svc = _service(obj, cmd_name, cmd_root)
    doc = svc.describe(svc.get(volume))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    st = doc["Status"]
    p = printable  # what containers wrote (hook output, labels) reaches no terminal as-is
    click.echo(f"Name:        {p(doc['Name'])}")
    click.echo(f"Mountpoint:  {p(doc['Mountpoint'])}")
    click.echo(f"Created:     {p(st['Created'])}")
    click.echo(f"Size:        {st['Size']}")
    click.echo(f"Containers:  {st['Containers']}")
    opts = ", ".join(f"{p(k)}={p(v)}" for k, v in st["Options"].items()) or "(none)"
    click.echo(f"Options:     {opts}")
    backup = st["Backup"]
    if backup["LastTime"]:
        click.echo(
            f"Last backup: {p(backup['LastID'] or '-')} at {p(backup['LastTime'])} "
            f"({p(backup['Age'])} ago, {p(backup['Outcome'])})"
        )
        if backup["Detail"]:
            click.echo(f"             {p(backup['Detail'])}")
    else:
        click.echo("Last backup: never")
    if backup["Schedule"]:
        click.echo(f"Schedule:    {p(backup['Schedule'])} (next {p(backup['NextRun'])})")


def _register() -> None:
    from volplugin.backup.commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
