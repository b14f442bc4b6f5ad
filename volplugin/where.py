"""Where a `volplugin` command acts: the running plugin's socket, or a root directly.

By default a command talks to the plugin named --name (default `volplugin`, or
VOLPLUGIN_NAME) over PLUGIN_DIR/NAME.sock. Given --root DIR (or VOLPLUGIN_ROOT) it works
on that root in-process, with the name `serve` recorded there unless --name is given.
The options are accepted before the command (`volplugin --name N ls`) and after it
(`volplugin ls --name N`); the latter win.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from volplugin.defaults import DEFAULT_NAME, PLUGIN_DIR
from volplugin.errors import BadOption

if TYPE_CHECKING:
    from volplugin.client import PluginClient


@dataclass(frozen=True)
class Where:
    """The plugin `name` with its socket in `plugin_dir`, or `root` to work on directly."""

    name: str | None
    root: Path | None
    plugin_dir: Path = PLUGIN_DIR

    @property
    def direct(self) -> bool:
        return self.root is not None

    def client(self) -> PluginClient:
        from volplugin.client import PluginClient  # not for --help

        return PluginClient(self.name or DEFAULT_NAME, self.plugin_dir)

    def plugin(self, command: str) -> PluginClient:
        """The plugin's client for a command that only the plugin runs (refused with --root)."""
        if self.root is not None:
            raise BadOption(
                f"`volplugin {command}` asks the running plugin (its jobs live there): drop "
                "--root and give --name NAME if the plugin is not named volplugin"
            )
        return self.client()

    def root_name(self, *, required: bool = False) -> str:
        """The plugin name for direct work on the root: given, else recorded by serve."""
        from volplugin.pluginrecord import resolve_name

        assert self.root is not None
        return resolve_name(self.root, self.name, required=required)


def log_here() -> None:
    """Log to stderr (`volplugin: LEVEL: logger: message`) for work done in this process.

    Calls through the socket log nothing (the plugin logs its own work), so they need
    no logging set up; -v (the group's --verbose) logs debug messages.
    """
    import logging

    ctx = click.get_current_context(silent=True)
    verbose = bool(ctx and (ctx.find_root().obj or {}).get("verbose"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="volplugin: %(levelname)s: %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # botocore's INFO lines (where credentials were found) are noise here
        logging.getLogger("botocore").setLevel(logging.WARNING)


def where_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --name, --root and --plugin-dir to a command; it gets `where: Where`."""

    @functools.wraps(fn)
    def run(
        *args: Any,
        cmd_name: str | None,
        cmd_root: Path | None,
        cmd_plugin_dir: Path | None,
        **kwargs: Any,
    ) -> Any:
        ctx = click.get_current_context()
        obj = ctx.find_root().obj or {}
        where = Where(
            name=cmd_name or obj.get("name"),
            root=cmd_root or obj.get("root"),
            plugin_dir=cmd_plugin_dir or obj.get("plugin_dir") or PLUGIN_DIR,
        )
        return fn(*args, where=where, **kwargs)

    run = click.option(
        "--plugin-dir",
        "cmd_plugin_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"Where the plugin's socket is (default {PLUGIN_DIR}).",
    )(run)
    run = click.option(
        "--root",
        "cmd_root",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Work on this root directly, in-process, instead of through the plugin.",
    )(run)
    return click.option(
        "--name",
        "cmd_name",
        default=None,
        help=f"Plugin name: its socket PLUGIN_DIR/NAME.sock (default {DEFAULT_NAME}); with "
        "--root, the driver name (default: the one serve recorded in the root).",
    )(run)
