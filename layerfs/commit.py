"""Turn a writable mount's changes into a new layer and a new image in the store.

The layer is the mount's changeset (layerfs.changeset) written as a tar by
layerfs.layertar; its DiffID is the sha256 of that tar, and because the tar is
a pure function of the stored tree record, ``layerfs export`` regenerates it
byte for byte. The new config appends the DiffID to ``rootfs.diff_ids`` and one
history entry; the image id is the digest of its bytes.

Crash safety: file chunks and the tree record are flushed first, then the
layer doc, then the image doc. A commit killed at any point leaves at most
unreferenced blobs (for gc) or a layer doc no image lists; never an image
whose layer is incomplete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from layerfs.catalog import Catalog, ImageRecord, LayerRecord
from layerfs.changeset import build_changeset, docker_diff, lower_entries
from layerfs.errors import LayerfsError
from layerfs.imageconfig import chain_ids, committed_config, image_id, rfc3339_now
from layerfs.layertar import write_layer
from layerfs.records import Kind, put_tree
from layerfs.store.chunks import ChunkStore, WriteStats


class NothingToCommit(LayerfsError):
    """The mount has no changes."""


class NotCommittable(LayerfsError):
    """The mount cannot be committed or diffed (no image, no upper directory)."""


@dataclass
class MountChanges:
    """Where a mount's changes are and which image they apply to."""

    mountpoint: Path
    upper: Path  # the upper tree itself
    image: ImageRecord
    upper_exact: bool = False  # read entries from the upper tree, not through the mount


@dataclass
class CommitResult:
    image: ImageRecord
    layer: LayerRecord
    chain_id: str


def normalize_tag(tag: str) -> str:
    """``NAME`` -> ``NAME:latest``; ``NAME:TAG`` and ``host:port/NAME:TAG`` unchanged."""
    if ":" not in tag.rsplit("/", 1)[-1]:
        return tag + ":latest"
    return tag


def locate(store: ChunkStore, mountpoint: Path) -> MountChanges:
    """The upper tree and image of the writable layerfs mount at ``mountpoint``."""
    from layerfs.fs.service import find_image_mount
    from layerfs.fs.upper import upper_image_id

    mounted = find_image_mount(mountpoint)
    if mounted is None:
        raise NotCommittable(
            f"{mountpoint} is not a layerfs mount of an image: mount one with "
            "layerfs mount IMAGE MNT --upper DIR"
        )
    if mounted.upper is None:
        raise NotCommittable(
            f"{mountpoint} is a read-only mount: remount it with --upper DIR to record changes"
        )
    image_id = mounted.view.image_id  # images with the same layers share one view: the
    if mounted.upper_dir is not None:  # upper DIR's own record says which it belongs to
        image_id = upper_image_id(mounted.upper_dir) or image_id
    image = Catalog(store.backend).get_image(image_id)
    return MountChanges(Path(mounted.mountpoint), mounted.upper, image, upper_exact=True)


def diff(store: ChunkStore, changes: MountChanges) -> list[tuple[str, str]]:
    """The mount's changes as ``docker diff`` lists them."""
    lower = lower_entries(store, changes.image.layers)
    return docker_diff(changes.upper, changes.mountpoint, lower)


def commit(
    store: ChunkStore,
    changes: MountChanges,
    tag: str,
    message: str = "",
    author: str = "",
) -> CommitResult:
    """Record the mount's changes as a new top layer; the new image is named ``tag``."""
    with store.backend.lock(exclusive=False):
        return _commit(store, changes, tag, message, author)


def _commit(
    store: ChunkStore, changes: MountChanges, tag: str, message: str, author: str
) -> CommitResult:
    base = changes.image
    lower = lower_entries(store, base.layers)
    stats = WriteStats()
    entries = build_changeset(
        store, changes.upper, changes.mountpoint, lower, stats, upper_exact=changes.upper_exact
    )
    if not entries:
        raise NothingToCommit(
            f"nothing to commit: the mount at {changes.mountpoint} has no changes "
            f"to image {base.name}"
        )
    digest = write_layer(entries, store)
    tree = put_tree(store, entries, {"diff_id": digest.diff_id, "tar_size": digest.size})
    layer = LayerRecord(
        diff_id=digest.diff_id,
        tree=tree,
        entries=len(entries),
        apparent_size=sum(e.size for e in entries if e.kind is Kind.FILE),
        stored_bytes=stats.bytes_stored,
    )
    created = rfc3339_now()
    config = committed_config(
        base.config,
        digest.diff_id,
        created,
        f"layerfs commit {changes.mountpoint}",
        message,
        author,
    )
    image = ImageRecord(
        name=normalize_tag(tag),
        id=image_id(config),
        config=config,
        layers=[*base.layers, layer],
        added_bytes=stats.bytes_stored,
        source=json.dumps({"commit_of": base.id, "mountpoint": str(changes.mountpoint)}),
    )
    store.flush()  # every chunk and the tree record are durable before any doc names them
    catalog = Catalog(store.backend)
    if catalog.get_layer(layer.diff_id) is None:
        catalog.put_layer(layer)
    catalog.put_image(image)
    diff_ids = [layer.diff_id for layer in image.layers]
    return CommitResult(image, layer, chain_ids(diff_ids)[-1])
