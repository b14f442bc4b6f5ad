"""The `layerfs` subcommands, one module per area, imported only when needed.

MODULES lists the command modules (each has a COMMANDS list). OWNERS names the
module of a command the CLI may import on its own, so that `layerfs mount`
starts without loading the import, export and maintenance code; any other
command name, and --help, loads every module. COMMANDS holds commands added
directly (``COMMANDS.extend(...)``); the CLI always shows those too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import click

MODULES: list[str] = [
    "layerfs.commands.maintenance",
    "layerfs.commands.mount",
    "layerfs.commands.changes",
    "layerfs.commands.images",
    "layerfs.commands.keys",
    "layerfs.commands.cache",
    "layerfs.commands.snapshotter",
]
OWNERS: dict[str, str] = {
    "mount": "layerfs.commands.mount",
    "umount": "layerfs.commands.mount",
    "snapshotter": "layerfs.commands.snapshotter",
    "containerd": "layerfs.commands.snapshotter",
}
COMMANDS: list[click.Command] = []


def commands_of(modules: list[str]) -> list[click.Command]:
    """The commands the given modules define."""
    return [cmd for name in modules for cmd in importlib.import_module(name).COMMANDS]


def all_commands() -> list[click.Command]:
    """Every command: those of MODULES and those added to COMMANDS."""
    return commands_of(MODULES) + COMMANDS
