"""`layerfs commit`, `layerfs diff` and `layerfs export`: changes travel back to Docker."""

from __future__ import annotations

from pathlib import Path

import click

from layerfs.catalog import Catalog
from layerfs.commit import commit, diff, locate
from layerfs.exporter import FORMATS, export_image
from layerfs.store.location import open_store


@click.command("commit")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tag", "-t", required=True, help="Name of the new image, NAME[:TAG].")
@click.option("--message", "-m", default="", help="Comment of the new history entry.")
@click.option("--author", "-a", default="", help="Author of the new image.")
@click.pass_obj
def commit_command(store_url: str, mountpoint: Path, tag: str, message: str, author: str) -> None:
    """Record a writable mount's changes as a new image (the mount keeps working)."""
    store = open_store(store_url)
    result = commit(store, locate(store, mountpoint), tag, message, author)
    layer = result.layer
    click.echo(f"{result.image.name} {result.image.id}")
    click.echo(
        f"layer {layer.diff_id} ({layer.entries} entries, {layer.apparent_size} bytes of files), "
        f"chain {result.chain_id}"
    )


@click.command("diff")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.pass_obj
def diff_command(store_url: str, mountpoint: Path) -> None:
    """List a writable mount's changes like `docker diff`: A added, C changed, D deleted."""
    store = open_store(store_url)
    for kind, path in diff(store, locate(store, mountpoint)):
        click.echo(f"{kind} /{path}")


@click.command("export")
@click.argument("image")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="Archive to write.",
)  # fmt: skip
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default="docker", show_default=True,
    help="docker: for `docker load`; oci: an OCI image layout archive.",
)  # fmt: skip
@click.option(
    "--tag", "-t", default="", help="Name to record in the archive (default: the image's)."
)
@click.pass_obj
def export_command(store_url: str, image: str, output: Path, fmt: str, tag: str) -> None:
    """Write IMAGE as an archive that `docker load` or OCI tools read."""
    store = open_store(store_url)
    record = Catalog(store.backend).get_image(image)
    result = export_image(store, record, output, fmt, tag)
    click.echo(f"{result.path} {result.image_id}")
    if result.rewritten:
        click.echo(
            f"note: {len(result.rewritten)} layer(s) regenerated with other bytes than imported; "
            "the archive's config lists the new DiffIDs, so its image id differs",
            err=True,
        )


COMMANDS = [commit_command, diff_command, export_command]
