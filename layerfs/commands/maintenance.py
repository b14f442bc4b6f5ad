"""`layerfs gc` and `layerfs fsck`: remove unreferenced objects, re-hash and report damage."""

from __future__ import annotations

import functools
import json
import sys

import click

from layerfs.clitools import human_bytes
from layerfs.maintenance import all_roots, check_store, collect_garbage
from layerfs.maintenance.check import CheckReport
from layerfs.maintenance.gc import DEFAULT_GRACE_SECONDS
from layerfs.store.location import open_store


def print_check_report(report: CheckReport, what: str) -> None:
    """Human summary of a check, shared by fsck and the plugin's verify."""
    click.echo(
        f"{what}: {report.roots} owners, {report.referenced} referenced objects, "
        f"{report.checked} re-hashed"
    )
    if report.ok:
        click.echo("no damage found")
        return
    for d in report.damage:
        click.echo(f"damaged object {d.digest}: {d.problem} ({d.detail})")
    for owner, paths in report.damaged_owners().items():
        click.echo(f"{owner}: {len(paths)} damaged path(s)")
        for path in paths:
            click.echo(f"  {path}")


@click.command("gc")
@click.option(
    "--grace",
    type=float,
    default=DEFAULT_GRACE_SECONDS,
    show_default=True,
    help="Never delete objects younger than this many seconds.",
)
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def gc_command(store_url: str, grace: float, dry_run: bool, as_json: bool) -> None:
    """Remove objects that no image, layer, backup or upper references."""
    store = open_store(store_url)
    report = collect_garbage(
        store,
        functools.partial(all_roots, store.backend),
        grace_seconds=grace,
        dry_run=dry_run,
    )
    if as_json:
        click.echo(json.dumps(report.to_json()))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} {report.removed} objects ({human_bytes(report.freed_bytes)}); "
        f"{report.referenced} referenced, {report.kept_fresh} unreferenced but younger than "
        f"{grace:.0f} s kept, {report.tmp_cleaned} temp files cleaned"
    )


@click.command("fsck")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def fsck_command(store_url: str, as_json: bool) -> None:
    """Re-hash every object; name the images, backups and paths damage affects."""
    store = open_store(store_url)
    with store.backend.lock(exclusive=False):
        report = check_store(
            store,
            functools.partial(all_roots, store.backend),
            read_data=True,
            all_objects=True,
        )
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        print_check_report(report, "fsck")
    if not report.ok:
        sys.exit(1)


COMMANDS = [gc_command, fsck_command]
