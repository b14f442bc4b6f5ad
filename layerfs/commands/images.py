"""`layerfs import`, `layerfs images` and `layerfs rmi`: bring images in, list and remove them."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import click

from layerfs.catalog import Catalog, ImageRecord
from layerfs.clitools import human_bytes
from layerfs.errors import LayerfsError
from layerfs.importer import import_archive, import_from_docker
from layerfs.records import read_tree
from layerfs.store.chunks import ChunkStore
from layerfs.store.location import open_store


def image_blobs(store: ChunkStore, image: ImageRecord, cache: dict[str, set[str]]) -> set[str]:
    """Digests of every blob an image references: layer tree records (a directory tree's
    nodes too) and file chunks."""
    out: set[str] = set()
    for layer in image.layers:
        blobs = cache.get(layer.tree)
        if blobs is None:
            blobs = {layer.tree}
            try:
                read = read_tree(store, layer.tree)
            except (LayerfsError, ValueError):
                read = None  # unreadable: fsck reports it; count the tree alone
            if read is not None:
                blobs.update(read.records)
                for doc in read.docs:
                    blobs.update(digest for digest, _size in doc.get("c") or ())
            cache[layer.tree] = blobs
        out |= blobs
    return out


def unique_bytes(store: ChunkStore, images: list[ImageRecord]) -> dict[str, int]:
    """Per image name: stored bytes of the blobs no other image references."""
    sizes = dict(store.backend.iter_blobs())
    cache: dict[str, set[str]] = {}
    sets = {image.name: image_blobs(store, image, cache) for image in images}
    users = Counter(d for blobs in sets.values() for d in blobs)
    return {
        name: sum(sizes.get(d, 0) for d in blobs if users[d] == 1) for name, blobs in sets.items()
    }


def _summary(image: ImageRecord, unique: int) -> dict:
    return {
        "name": image.name,
        "id": image.id,
        "layers": len(image.layers),
        "apparent_size": image.apparent_size,
        "unique_bytes": unique,
        "created": image.created,
        "source": image.source,
    }


@click.command("import")
@click.argument("archive", required=False, type=click.Path(path_type=Path))
@click.option("--from-docker", "image", metavar="IMAGE", help="Import from the local daemon.")
@click.option("--tag", metavar="NAME", help="Name of the image in the store.")
@click.option(
    "--no-cache",
    is_flag=True,
    help="Do not put the files' bytes into this host's content cache (an import for others).",
)
@click.pass_obj
def import_command(
    store_url: str, archive: Path | None, image: str | None, tag: str | None, no_cache: bool
):
    """Import ARCHIVE (docker save output, an OCI archive or layout) or a Docker image.

    The bytes of the files read also go into this host's content cache (as
    `docker load` writes them out), and the image's index and metadata tree are
    built, so that a first mount finds the image ready and its first read is served
    by the kernel from there; --no-cache leaves that to the first mount.
    """
    from layerfs.fs.views import cache_filling, prepare_view

    if (archive is None) == (image is None):
        raise click.UsageError("give either ARCHIVE or --from-docker IMAGE")
    store = open_store(store_url)
    with contextlib.ExitStack() as stack:
        keep = None if no_cache else stack.enter_context(cache_filling(store))
        if image is not None:
            record = import_from_docker(store, image, tag, progress=True, keep=keep)
        else:
            record = import_archive(store, archive, tag, True, keep)  # type: ignore[arg-type]
    if not no_cache:
        prepare_view(store, record)
    click.echo(
        f"imported {record.name} ({record.id[:19]}): {len(record.layers)} layers, "
        f"{human_bytes(record.apparent_size)} apparent, "
        f"{human_bytes(record.added_bytes)} added to the store"
    )


@click.command("images")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_obj
def images_command(store_url: str, as_json: bool) -> None:
    """List the images in the store."""
    store = open_store(store_url)
    images = sorted(Catalog(store.backend).images(), key=lambda i: i.name)
    unique = unique_bytes(store, images)
    rows = [_summary(image, unique[image.name]) for image in images]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max([len(r["name"]) for r in rows] + [4])
    click.echo(f"{'NAME':<{width}}  {'ID':<12}  {'LAYERS':>6}  {'SIZE':>10}  {'ADDS':>10}")
    for r in rows:
        click.echo(
            f"{r['name']:<{width}}  {r['id'][7:19]:<12}  {r['layers']:>6}  "
            f"{human_bytes(r['apparent_size']):>10}  {human_bytes(r['unique_bytes']):>10}"
        )


@click.command("rmi")
@click.argument("name")
@click.pass_obj
def rmi_command(store_url: str, name: str) -> None:
    """Remove the image NAME and its layers no other image uses (`layerfs gc` frees
    their objects)."""
    from layerfs.fs.views import forget_image

    store = open_store(store_url)
    image, layers = Catalog(store.backend).remove_image(name)
    freed = forget_image(store, image)
    click.echo(
        f"removed {image.name} and {len(layers)} of its {len(image.layers)} layer(s) "
        "(the others are used by other images); `layerfs gc` frees their space"
        + (f"; {human_bytes(freed)} of local index and metadata tree freed" if freed else "")
    )


COMMANDS = [import_command, images_command, rmi_command]
