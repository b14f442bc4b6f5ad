"""The backup subcommands of `volplugin` (backup, backups, restore, diff, prune, verify)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
