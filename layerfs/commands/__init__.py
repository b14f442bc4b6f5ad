"""The `layerfs` subcommands, one module per area; COMMANDS lists them for the CLI."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
