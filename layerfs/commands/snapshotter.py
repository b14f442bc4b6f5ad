"""`layerfs snapshotter serve`: the containerd snapshotter (a proxy plugin over gRPC);
`layerfs containerd import`: an image of the store registered with containerd."""

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
    from layerfs.snapshotter.layers import store_work
    from layerfs.snapshotter.server import serve

    if "://" not in store_url:  # the helpers and the view daemon run elsewhere
        store_url = os.path.abspath(store_url)
    # refuse to start on a store that does not open; the server itself never opens it
    store_work(store_url, {"op": "check"})
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    serve(address.absolute(), root.absolute(), store_url)


@click.group("containerd")
def containerd_group() -> None:
    """Images of the store in containerd, run by the layerfs snapshotter."""


@containerd_group.command("import")
@click.argument("image")
@click.option(
    "--address", default="/run/containerd/containerd.sock", show_default=True,
    type=click.Path(path_type=Path), help="containerd's socket.",
)  # fmt: skip
@click.option("--namespace", "-n", default="default", show_default=True)
@click.option(
    "--snapshotter", default="layerfs", show_default=True,
    help="The proxy plugin's name in containerd's config.",
)  # fmt: skip
@click.option("--name", default="", help="The image's name in containerd (default: IMAGE in full).")
@click.pass_obj
def containerd_import_command(
    store_url: str, image: str, address: Path, namespace: str, snapshotter: str, name: str
) -> None:
    """Register IMAGE of the store with containerd without copying its layers.

    The snapshotter (`layerfs snapshotter serve` on this store) commits each
    layer from the store; containerd gets only the manifest and the config.
    Then `ctr run --snapshotter layerfs NAME` starts it.
    """
    from layerfs.catalog import Catalog
    from layerfs.snapshotter.registry import register_image
    from layerfs.store.location import open_store

    record = Catalog(open_store(store_url).backend).get_image(image)
    done = register_image(record, address, namespace, snapshotter, name)
    click.echo(f"{done.name} ({done.manifest}): {len(done.chain_ids)} layers from the store")


COMMANDS = [snapshotter_group, containerd_group]
