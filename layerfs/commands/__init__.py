"""The `layerfs` subcommands, one module per area; COMMANDS lists them for the CLI."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []

from layerfs.commands import maintenance as _maintenance  # noqa: E402

COMMANDS.extend(_maintenance.COMMANDS)

from layerfs.commands import mount as _mount  # noqa: E402

COMMANDS.extend(_mount.COMMANDS)

from layerfs.commands import changes as _changes  # noqa: E402

COMMANDS.extend(_changes.COMMANDS)

from layerfs.commands import images as _images  # noqa: E402

COMMANDS.extend(_images.COMMANDS)
