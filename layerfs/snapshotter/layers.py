"""The store side of the snapshotter: applied upper directories become layers of the
store, and committed chains are mounted read-only from it.

A committed snapshot is a layer of the layerfs store (its tree record pinned
so gc keeps it), deduplicated with everything else there. The upper directory
containerd applied a layer into (overlayfs' format) is read the way
`layerfs commit` reads a kernel upper (layerfs.changeset with
``upper_exact``). A chain of committed snapshots is mounted like an image
(layerfs.fs.service.mount_image over a record made of its layers, never listed
in the catalog): a read-only kernel overlay over the chain's metadata tree and
the store's view. That mount is made by a short-lived helper process
(``python -m layerfs.snapshotter.chainmount``), since starting the store's view
daemon forks and a gRPC server must not fork; it outlives the snapshotter and
keeps the view in use while the snapshot exists.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from layerfs.catalog import ImageRecord, LayerRecord
from layerfs.errors import LayerfsError
from layerfs.fs.views import ViewInfo
from layerfs.store.chunks import ChunkStore

log = logging.getLogger(__name__)


class ChainMountError(LayerfsError):
    """A committed chain could not be mounted."""


def chain_record(name: str, layers: list[LayerRecord]) -> ImageRecord:
    """An image record made of ``layers`` (bottom first), for mounting; never stored."""
    from layerfs.index.build import index_key

    record = ImageRecord(name=f"containerd snapshot {name}", id="", config={}, layers=layers)
    record.id = "chain:" + index_key(record)
    return record


def commit_upper(
    store: ChunkStore,
    upper: Path,
    mountpoint: Path,
    lowers: list[LayerRecord],
    holder: str,
    chain_id: str = "",
) -> tuple[LayerRecord, str]:
    """Store the changes in ``upper`` (seen merged at ``mountpoint``) over ``lowers`` as a
    layer; return it and the id of the pin that keeps it.

    No layer tar is made: containerd checked the DiffID of what it applied, and
    names the layer by its chain ID. The layer's DiffID is recorded only when it
    is known: for a bottom layer it is its chain ID (else "").
    """
    from layerfs.changeset import build_changeset, lower_entries
    from layerfs.maintenance.pins import pin
    from layerfs.records import Kind, put_tree
    from layerfs.store.chunks import WriteStats

    diff_id = chain_id if not lowers else ""
    with store.backend.lock(exclusive=False):
        started = time.monotonic()
        lower = lower_entries(store, lowers)
        stats = WriteStats()
        entries = build_changeset(store, upper, mountpoint, lower, stats, upper_exact=True)
        changes = time.monotonic()
        meta = {"chain_id": chain_id} if chain_id else {}
        tree = put_tree(store, entries, {**meta, **({"diff_id": diff_id} if diff_id else {})})
        store.flush()  # every chunk and the tree record are durable before the pin names them
        log.info(
            "%s: %d entries, %d bytes stored; changes read in %.2f s, tree stored in %.2f s",
            holder,
            len(entries),
            stats.bytes_stored,
            changes - started,
            time.monotonic() - changes,
        )
        layer = LayerRecord(
            diff_id=diff_id,
            tree=tree,
            entries=len(entries),
            apparent_size=sum(e.size for e in entries if e.kind is Kind.FILE),
            stored_bytes=stats.bytes_stored,
        )
        return layer, pin(store.backend, tree, holder).id


def unpin_layer(store: ChunkStore, pin_id: str) -> None:
    from layerfs.maintenance.pins import unpin

    unpin(store.backend, pin_id)


def mounted_view(mountpoint: Path) -> ViewInfo | None:
    """The view of the chain mounted at ``mountpoint``, if that mount still serves."""
    from layerfs.fs.service import find_image_mount
    from layerfs.fs.views import view_serves

    try:
        found = find_image_mount(mountpoint)
    except LayerfsError:
        return None
    if found is None or not view_serves(found.view):
        return None
    return found.view


def ensure_chain_mount(
    store_url: str, name: str, layers: list[LayerRecord], mountpoint: Path
) -> ViewInfo:
    """The chain ``layers`` mounted read-only at ``mountpoint`` (mounted first if it is not,
    or if its view died), and the view it stands on."""
    view = mounted_view(mountpoint)
    if view is not None:
        return view
    mountpoint.mkdir(mode=0o755, parents=True, exist_ok=True)
    request = json.dumps({"name": name, "layers": [asdict(layer) for layer in layers]})
    done = subprocess.run(
        [sys.executable, "-m", "layerfs.snapshotter.chainmount", store_url, str(mountpoint)],
        input=request.encode(),
        capture_output=True,
        env={**os.environ},
        check=False,
    )
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise ChainMountError(
            f"cannot mount snapshot {name} at {mountpoint}: "
            + (detail[-1] if detail else f"exit status {done.returncode}")
        )
    view = mounted_view(mountpoint)
    if view is None:
        raise ChainMountError(f"snapshot {name} was mounted at {mountpoint} but does not serve")
    return view


def unmount_chain(mountpoint: Path) -> None:
    """Unmount a chain's read-only mount (and its view once nothing else uses it)."""
    from layerfs.fs.overlay import find_overlay
    from layerfs.fs.service import unmount_image

    if find_overlay(mountpoint) is not None:
        unmount_image(mountpoint)
