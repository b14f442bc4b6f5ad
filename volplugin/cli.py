"""The `volplugin` command line: serve the plugin; volumes (ls, inspect), roaming volumes
(ls --all-hosts, release) and jobs (jobs, job).

Commands talk to the running plugin over its socket (volplugin.client); with --root DIR
they work on that root directly (volplugin.where), so `ls` and `inspect` also read a
root while `serve` is down. Heavy libraries (flask, waitress, the docker SDK, boto3,
rich) are imported by the commands that use them, so that --help and socket calls start
fast. The backup feature's commands (volplugin.backup.commands.COMMANDS) are imported
when one of them runs or --help lists them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from layerfs.clitools import OneLineErrors, password_option, store_option
from layerfs.memory import return_large_buffers
from volplugin.defaults import (
    DEFAULT_NAME,
    DEFAULT_ROOT,
    DEFAULT_THREADS,
    DEFAULT_TICK,
    PLUGIN_DIR,
)
from volplugin.errors import BadOption, BadRequest
from volplugin.hostid import ENV as HOST_ID_ENV
from volplugin.hostid import check_host_id, use_host_id
from volplugin.sidekick.paths import SIDEKICK_DIR
from volplugin.text import printable
from volplugin.where import Where, log_here, where_options

if TYPE_CHECKING:
    from volplugin.client import PluginClient
    from volplugin.volumes.service import VolumeService


class _Group(OneLineErrors):
    """The command group; the backup commands are imported when one of them is asked for."""

    prog = "volplugin"

    def _load_backup_commands(self) -> None:
        from volplugin.backup.commands import COMMANDS

        for command in COMMANDS:
            if command.name not in self.commands:
                self.add_command(command)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self._load_backup_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_backup_commands()
        return super().list_commands(ctx)


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
    default=None,
    help=f"Root directory of the volumes and their state. For serve (default {DEFAULT_ROOT}): "
    "the one to serve; for other commands: work on it directly instead of through the plugin.",
)
@click.option(
    "--name",
    envvar="VOLPLUGIN_NAME",
    default=None,
    help=f"Plugin name (default {DEFAULT_NAME}): the driver name for docker and the socket "
    "PLUGIN_DIR/NAME.sock that commands talk to; with --root, the name serve recorded there.",
)
@click.option(
    "--plugin-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Where plugin sockets are (default {PLUGIN_DIR}).",
)
@host_id_option
@password_option()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.pass_context
def cli(
    ctx: click.Context,
    root: Path | None,
    name: str | None,
    plugin_dir: Path | None,
    host_id: str | None,
    verbose: bool,
) -> None:
    """A Docker volume plugin: volumes are directories under a root, state in SQLite.

    Commands other than serve talk to the running plugin over its socket; --root DIR
    makes them work on that root directly.
    """
    use_host_id(host_id)
    ctx.obj = {"root": root, "name": name, "plugin_dir": plugin_dir, "verbose": verbose}


@cli.command("serve")
@click.option("--name", "cmd_name", default=None, help=f"Plugin name (default {DEFAULT_NAME}).")
@click.option(
    "--root",
    "cmd_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Root directory (default {DEFAULT_ROOT}).",
)
@click.option(
    "--plugin-dir",
    "cmd_plugin_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Where the daemon looks for plugin sockets (default {PLUGIN_DIR}).",
)
@click.option("--threads", default=DEFAULT_THREADS, show_default=True, help="Request threads.")
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
    cmd_plugin_dir: Path | None,
    threads: int,
    store: str | None,
    schedule_tick: float,
    host_id: str | None,
    sidekick_dir: Path,
    metrics_address: str | None,
    metrics_allow_remote: bool,
) -> None:
    """Serve the volume plugin protocol on PLUGIN_DIR/NAME.sock until SIGTERM.

    The name and store are recorded in ROOT/plugin.json for direct commands (--root).
    """
    from volplugin.server import serve

    log_here()
    use_host_id(host_id)
    serve(
        cmd_name or obj["name"] or DEFAULT_NAME,
        Path(cmd_root or obj["root"] or DEFAULT_ROOT),
        plugin_dir=cmd_plugin_dir or obj["plugin_dir"] or PLUGIN_DIR,
        threads=threads,
        store=store,
        schedule_tick=schedule_tick,
        sidekick_dir=sidekick_dir,
        metrics_address=metrics_address,
        metrics_allow_remote=metrics_allow_remote,
    )


def _service(where: Where) -> VolumeService:
    from volplugin.backup import status
    from volplugin.volumes.service import VolumeService
    from volplugin.volumes.state import State

    assert where.root is not None
    log_here()
    root = where.root
    return status.attach(VolumeService(root, where.root_name(), State.under(root, create=False)))


def _described(where: Where) -> list[dict]:
    """Every volume as VolumeDriver.Get describes it, from the plugin or the root."""
    if where.direct:
        svc = _service(where)
        return [svc.describe(r) for r in svc.list()]
    from volplugin.client import PluginError

    client = where.client()
    docs = []
    for listed in client.call("VolumeDriver.List")["Volumes"]:
        try:
            docs.append(client.call("VolumeDriver.Get", {"Name": listed["Name"]})["Volume"])
        except PluginError as exc:
            if "no such volume" not in str(exc):
                raise  # a volume removed since the listing is no longer listed
    return docs


def _volume(where: Where, volume: str) -> dict:
    if where.direct:
        svc = _service(where)
        return svc.describe(svc.get(volume))
    return where.client().call("VolumeDriver.Get", {"Name": volume})["Volume"]


@cli.command("ls")
@where_options
@click.option(
    "--all-hosts",
    is_flag=True,
    help="List the roaming volumes of the plugin's store instead, whatever host holds them: "
    "the holder, since when, the lease generation, the head backup's age and host.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls_cmd(where: Where, all_hosts: bool, as_json: bool) -> None:
    """List volumes with their size, users and creation time (--all-hosts: roaming volumes)."""
    if all_hosts:
        _ls_roaming(where, as_json)
        return
    docs = _described(where)
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    click.echo(f"{'NAME':<32} {'SIZE':>12} {'CONTAINERS':>10}  CREATED")
    for doc in docs:
        st = doc["Status"]
        click.echo(
            f"{printable(doc['Name']):<32} {printable(st['Size']):>12} "
            f"{printable(st['Containers']):>10}  {printable(st['Created'])}"
        )


def _roaming_client(where: Where, command: str) -> PluginClient:
    if where.direct:
        raise BadOption(
            f"`volplugin {command}` asks the running plugin (it reads the roaming records in "
            "its store): drop --root and give --name NAME if the plugin is not named volplugin"
        )
    return where.client()


def _ls_roaming(where: Where, as_json: bool) -> None:
    from volplugin.roaming.text import table

    volumes = _roaming_client(where, "ls --all-hosts").call("Roaming.List")["Volumes"]
    if as_json:
        click.echo(json.dumps(volumes, indent=2))
        return
    for line in table(volumes):
        click.echo(line)


@cli.command("release")
@where_options
@click.argument("volume")
@click.option(
    "--force",
    is_flag=True,
    help="Required: break the lease even though its holder may still write the volume.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def release_cmd(where: Where, volume: str, force: bool, yes: bool) -> None:
    """Break the lease of roaming volume VOLUME, whatever host holds it (--force).

    For a holder host that died, or one that must give the volume up now: the volume
    can be mounted on any host at once, from its head backup. The holder's containers
    lose the volume (they are stopped, or it turns read-only) and what they wrote after
    the head backup is lost. Refused on the holder itself while its containers use it:
    stop them, and their last Unmount hands the volume over.
    """
    from volplugin.text import printable as p

    if not force:
        raise BadOption(
            f"`volplugin release` breaks the lease of roaming volume {volume!r} so that "
            "another host can mount it at once; its holder's containers lose it and what "
            "they wrote after the head backup is lost: add --force to do it"
        )
    client = _roaming_client(where, "release")
    listed = [v for v in client.call("Roaming.List")["Volumes"] if v.get("Name") == volume]
    if not listed:
        raise BadOption(f"no roaming volume {volume!r} in the store of plugin {client.name}")
    found = listed[0]
    host = found.get("Holder") or found.get("ExpiredHolder")
    if not host:
        click.echo(f"roaming volume {p(volume)} has no holder: nothing to release")
        return
    if not yes:
        head = found.get("Head")
        state = "expired lease" if found.get("LeaseExpired") else "lease"
        lost = (
            f"Anything written there after its head backup of {p(head['Time'])} is lost"
            if head
            else "It has no head backup: the volume starts empty elsewhere"
        )
        click.confirm(
            f"Break the {state} of host {p(host)} on roaming volume {p(volume)} (held since "
            f"{p(found.get('HolderSince'))}, generation {p(found.get('Generation'))})? "
            f"{lost}",
            default=False,
            abort=True,
        )
    doc = {"Name": volume, "Force": True, "Generation": found.get("Generation")}
    broken = client.call("Roaming.Release", doc).get("Broken")
    if broken is None:
        click.echo(f"roaming volume {p(volume)} has no holder any more: nothing to release")
        return
    click.echo(
        f"broke the lease of host {p(broken['Host'])} (generation {p(broken['Generation'])}) "
        f"on roaming volume {p(volume)}: any host can mount it now"
    )


@cli.command("inspect")
@where_options
@click.argument("volume")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(where: Where, volume: str, as_json: bool) -> None:
    """Show one volume: mountpoint, size, users, options, last backup, running job."""
    doc = _volume(where, volume)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    st = doc["Status"]
    p = printable  # what containers wrote (hook output, labels) reaches no terminal as-is
    click.echo(f"Name:        {p(doc['Name'])}")
    click.echo(f"Mountpoint:  {p(doc['Mountpoint'])}")
    click.echo(f"Created:     {p(st['Created'])}")
    click.echo(f"Size:        {p(st['Size'])}")
    click.echo(f"Containers:  {p(st['Containers'])}")
    opts = ", ".join(f"{p(k)}={p(v)}" for k, v in st["Options"].items()) or "(none)"
    click.echo(f"Options:     {opts}")
    backup = st.get("Backup") or {}
    if backup.get("LastTime"):
        click.echo(
            f"Last backup: {p(backup['LastID'] or '-')} at {p(backup['LastTime'])} "
            f"({p(backup['Age'])} ago, {p(backup['Outcome'])})"
        )
        if backup.get("Detail"):
            click.echo(f"             {p(backup['Detail'])}")
    else:
        click.echo("Last backup: never")
    if backup.get("Schedule"):
        click.echo(f"Schedule:    {p(backup['Schedule'])} (next {p(backup['NextRun'])})")
    if st.get("Job"):
        from volplugin.jobtext import summary

        click.echo(f"Job:         {summary(st['Job'])}")
    if st.get("Roaming"):
        from volplugin.roaming.text import status_lines

        for label, text in status_lines(st["Roaming"]):
            click.echo(f"{label:<12} {text}")


@cli.command("jobs")
@where_options
@click.option("--volume", help="Only this volume's jobs.")
@click.option("--all", "all_jobs", is_flag=True, help="Every job, not only the last finished.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def jobs_cmd(where: Where, volume: str | None, all_jobs: bool, as_json: bool) -> None:
    """List the plugin's jobs, newest first: queued, running and recently finished ones."""
    from volplugin.jobtext import progress_text

    doc: dict = {"All": all_jobs}
    if volume:
        doc["Volume"] = volume
    jobs = where.plugin("jobs").call("Jobs.List", doc)["Jobs"]
    if as_json:
        click.echo(json.dumps(jobs))
        return
    p = printable
    click.echo(f"{'ID':<14} {'KIND':<8} {'VOLUME':<24} {'STATE':<11} {'CREATED':<20}  PROGRESS")
    for job in jobs:
        progress = progress_text(job)
        if job.get("Error"):
            progress = f"{progress}: {p(job['Error'])}" if progress else p(job["Error"])
        click.echo(
            f"{p(job.get('ID')):<14} {p(job.get('Kind')):<8} {p(job.get('Volume') or '-'):<24} "
            f"{p(job.get('State')):<11} {p(job.get('Created')):<20}  {progress}"
        )


@cli.command("job")
@where_options
@click.argument("job_id", metavar="ID")
@click.option("--wait", is_flag=True, help="Follow the job until it ends, with its progress.")
@click.option("--cancel", is_flag=True, help="Ask the job to stop (then --wait for it to).")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
def job_cmd(where: Where, job_id: str, wait: bool, cancel: bool, as_json: bool) -> None:
    """Show one job of the plugin; --wait follows it to its end, --cancel stops it.

    With --wait the exit status is 1 unless the job succeeded (or, with --cancel, was
    cancelled).
    """
    from volplugin.follow import follow, get
    from volplugin.jobtext import failure, what

    client = where.plugin("job")
    if cancel:
        job = client.call("Jobs.Cancel", {"ID": job_id})["Job"]
        if not wait and not as_json:
            click.echo(f"asked {what(job)} job {printable(job.get('ID'))} to stop", err=True)
    else:
        job = get(client, job_id)
    failed = None
    if wait:
        job = follow(client, job)
        if not (cancel and job.get("State") == "cancelled"):
            failed = failure(job)
    if as_json:
        click.echo(json.dumps(job))
    else:
        _show_job(job)
    if failed is not None:
        if not as_json:
            click.echo(f"volplugin: error: {failed}", err=True)
        sys.exit(1)


def _show_job(job: dict) -> None:
    from volplugin.backup.render import result_lines
    from volplugin.jobtext import progress_text

    p = printable
    click.echo(f"ID:        {p(job.get('ID'))}")
    click.echo(f"Kind:      {p(job.get('Kind'))}")
    click.echo(f"Volume:    {p(job.get('Volume') or '(every volume)')}")
    click.echo(f"State:     {p(job.get('State'))}")
    for key in ("Created", "Started", "Finished"):
        click.echo(f"{key + ':':<10} {p(job.get(key) or '-')}")
    click.echo(f"Progress:  {progress_text(job) or '-'}")
    if job.get("Error"):
        click.echo(f"Error:     {p(job['Error'])}")
    if job.get("Result"):
        for i, line in enumerate(result_lines(job)):
            click.echo(f"{'Result:' if i == 0 else '':<10} {line}")


def main() -> None:
    return_large_buffers()
    cli()


if __name__ == "__main__":
    main()
