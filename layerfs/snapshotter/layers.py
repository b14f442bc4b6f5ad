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
keeps the view in use while the snapshot exists. Commits, pins and unpins run
in another helper (``python -m layerfs.snapshotter.storework``, called through
``store_work``), so that the server never holds the heap of reading and
storing a layer.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerfs.catalog import ImageRecord, LayerRecord
from layerfs.errors import LayerfsError
from layerfs.fs.views import ViewInfo
from layerfs.snapshotter.metadata import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

if TYPE_CHECKING:
    from layerfs.store.chunks import ChunkStore

log = logging.getLogger(__name__)


class ChainMountError(LayerfsError):
    """A committed chain could not be mounted."""


class StoreWorkError(LayerfsError):
    """The store helper failed or was killed."""


_HELPER_ERRORS: dict[str, type[LayerfsError]] = {
    "NotFound": NotFound,
    "AlreadyExists": AlreadyExists,
    "FailedPrecondition": FailedPrecondition,
    "InvalidArgument": InvalidArgument,
}


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
) -> LayerRecord:
    """Store the changes in ``upper`` (seen merged at ``mountpoint``) over ``lowers`` as a
    layer and return it (call under the store's shared lock, and pin it in that hold).

    No layer tar is made: containerd checked the DiffID of what it applied, and
    names the layer by its chain ID. The layer's DiffID is recorded only when it
    is known: for a bottom layer it is its chain ID (else "").
    """
    from layerfs.changeset import build_changeset, lower_entries
    from layerfs.records import Kind, put_tree
    from layerfs.store.chunks import WriteStats

    diff_id = chain_id if not lowers else ""
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
    return LayerRecord(
        diff_id=diff_id,
        tree=tree,
        entries=len(entries),
        apparent_size=sum(e.size for e in entries if e.kind is Kind.FILE),
        stored_bytes=stats.bytes_stored,
    )


def start_store_helper(store_url: str) -> subprocess.Popen:
    """A store helper (layerfs.snapshotter.storework), started ahead of its request:
    it imports and opens the store meanwhile. Hand it one request with store_work."""
    return subprocess.Popen(
        [sys.executable, "-m", "layerfs.snapshotter.storework", store_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ},
    )


def store_work(
    store_url: str, request: dict[str, Any], helper: subprocess.Popen | None = None
) -> dict[str, Any]:
    """Run ``request`` in a store helper (``helper`` if one was started ahead, else a new
    one) and return its answer; its failure is raised as the error it names (a helper
    killed midway, or one that answered nothing, as StoreWorkError). Its log goes to this
    process's stderr."""
    started = time.monotonic()
    proc = helper if helper is not None else start_store_helper(store_url)
    out, _ = proc.communicate(json.dumps(request).encode())
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    what = f"store helper ({request['op']})"
    status = proc.returncode
    log.info("%s: %.2f s, exit status %d", what, time.monotonic() - started, status)
    if status == 0 and lines and "error" not in answer:
        return answer
    if "error" in answer:
        raise _HELPER_ERRORS.get(answer.get("code", ""), StoreWorkError)(answer["error"])
    if status < 0:
        name = signal.Signals(-status).name
        raise StoreWorkError(f"{what} was killed by {name}: nothing was recorded, retry")
    raise StoreWorkError(f"{what} failed with exit status {status} and no answer (see the log)")


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
