"""The `layerfs` command line: a click group whose commands live in layerfs.commands.

Command modules are imported on first use (see layerfs.commands), so a
command starts with only the libraries it needs. Every LayerfsError becomes
one line on stderr and exit status 1.
"""

from __future__ import annotations

import logging

import click

from layerfs.clitools import OneLineErrors, password_option, store_option
from layerfs.memory import return_large_buffers
from layerfs.store.location import default_store_url


class _Group(OneLineErrors):
    """A group that loads its commands lazily and prints LayerfsError as one line."""

    _loaded_all = False

    def _load(self, commands: list[click.Command]) -> None:
        for command in commands:
            if command.name not in self.commands:
                self.add_command(command)

    def _load_all(self) -> None:
        if not self._loaded_all:
            from layerfs.commands import all_commands

            self._load(all_commands())
            self._loaded_all = True

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            from layerfs.commands import COMMANDS, OWNERS, commands_of

            owner = OWNERS.get(cmd_name)
            self._load(commands_of([owner]) + COMMANDS if owner else [])
            if cmd_name not in self.commands:
                self._load_all()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_all()
        return super().list_commands(ctx)


@click.group(cls=_Group)
@store_option("Store location (default: /var/lib/layerfs for root, else ~/.local/share/layerfs).")
@password_option()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.pass_context
def cli(ctx: click.Context, store: str | None, verbose: bool) -> None:
    """Import container images into a content-addressed store and mount them."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="layerfs: %(levelname)s: %(message)s",
    )
    ctx.obj = store or default_store_url()


def main() -> None:
    return_large_buffers()
    cli()
