"""The `layerfs` subcommands, one module per area; COMMANDS lists them for the CLI."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []

from layerfs.commands import maintenance as _maintenance  # noqa: E402

COMMANDS.extend(_maintenance.COMMANDS)
