"""`layerfs snapshotter serve`: the containerd snapshotter (a proxy plugin over gRPC)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

DEFAULT_ADDRESS = "/run/layerfs/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/layerfs-snapshotter"


@click.group("snapshotter")
def snapshotter_group() -> None:
    """containerd snapshotter whose layers live in the layerfs store."""


@snapshotter_group.command("serve")
@click.option(
    "--address", default=DEFAULT_ADDRESS, show_default=True, type=click.Path(path_type=Path),
    help="Unix socket containerd's proxy_plugins entry names.",
)  # fmt: skip
@click.option(
    "--root", default=DEFAULT_ROOT, show_default=True, type=click.Path(path_type=Path),
    help="Snapshot metadata and upper directories.",
)  # fmt: skip
@click.pass_obj
def serve_command(store_url: str, address: Path, root: Path) -> None:
    """Serve containerd's snapshots API on ADDRESS until SIGTERM.

    containerd's config names it as a proxy plugin:

    \b
      [proxy_plugins.layerfs]
        type = "snapshot"
        address = "/run/layerfs/snapshotter.sock"

    then `ctr image pull|import --snapshotter layerfs` unpacks layers into the
    store and `ctr run --snapshotter layerfs` runs containers on it.
    """
    from layerfs.snapshotter.server import serve
    from layerfs.store.location import open_store

    if "://" not in store_url:  # the chain mount helper and view daemon run elsewhere
        store_url = os.path.abspath(store_url)
    open_store(store_url)  # refuse to start on a store that does not open
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    serve(address.absolute(), root.absolute(), store_url)


COMMANDS = [snapshotter_group]
