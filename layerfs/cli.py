"""The `layerfs` command line: a click group whose commands live in layerfs.commands.

Every LayerfsError becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import logging
import sys

import click

from layerfs.errors import LayerfsError
from layerfs.store.location import default_store_url


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except LayerfsError as exc:
            click.echo(f"layerfs: error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option(
    "--store",
    envvar="LAYERFS_STORE",
    default=None,
    metavar="PATH|s3://BUCKET/PREFIX",
    help="Store location (default: /var/lib/layerfs for root, else ~/.local/share/layerfs).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.pass_context
def cli(ctx: click.Context, store: str | None, verbose: bool) -> None:
    """Import container images into a content-addressed store and mount them."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="layerfs: %(levelname)s: %(message)s",
    )
    ctx.obj = store or default_store_url()


def _register() -> None:
    from layerfs.commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register()


def main() -> None:
    cli()
