"""The mount service: assembles every layerfs mount, finds it again, takes it apart.

A mount of an image is a kernel overlay (layerfs.fs.overlay) over the image's
shared view (layerfs.fs.views) and the content cache; with an upper DIR it is
writable and the kernel keeps every change in ``DIR/upper`` (overlayfs'
format, ``DIR/work`` its workdir, ``DIR/layerfs.json`` the image it belongs
to). Plain directories are mounted as overlayfs would (``mount_dirs``).
Nothing else is recorded: the kernel's mount table says what is mounted
where, and the view's record says which image it shows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from layerfs.catalog import ImageRecord
from layerfs.errors import LayerfsError
from layerfs.fs.mounting import MountError
from layerfs.fs.overlay import (
    find_overlay,
    mount_overlay,
    umount,
    unmount_overlay,
)
from layerfs.fs.views import (
    VIEW_CHUNK_CACHE,
    ViewInfo,
    daemon_dir,
    open_view,
    release_view,
    run_dir,
    view_serves,
)
from layerfs.store.chunks import ChunkStore

log = logging.getLogger(__name__)


def mount_log_file(cache_dir: Path) -> Path:
    """Where the view daemons of a store write their log."""
    return cache_dir / "logs" / "mount.log"


@dataclass(frozen=True)
class ImageMount:
    """A mounted image as the kernel and its view describe it."""

    mountpoint: str
    view: ViewInfo
    upper_dir: Path | None  # DIR of --upper (None: read-only)
    upper: Path | None  # the upper tree (DIR/upper)


def mount_image(
    store_url: str,
    store: ChunkStore,
    record: ImageRecord,
    mountpoint: Path,
    upper: Path | None,
    *,
    prefetch: bool = True,
) -> ImageMount:
    """Mount ``record`` at ``mountpoint``, read-only or writable into ``upper``.

    With ``prefetch`` the image's view fills the content cache with every file
    in the background; without, only with the files that are read (for a
    tree that something else copies out whole, as a lazy volume's fill does).
    """
    from layerfs.fs.upper import image_upper
    from layerfs.index import ensure_index
    from layerfs.store.location import open_backend

    stale = find_overlay(mountpoint)
    view = ViewInfo.load(stale.lowers[0]) if stale is not None and stale.lowers else None
    if stale is not None and (view is None or not view_serves(view)):
        log.warning("replacing the mount at %s, whose image view died", stale.mountpoint)
        umount(stale.mountpoint, lazy=True)
    index = Path(os.path.abspath(ensure_index(store, record)))
    dirs = None
    if upper is not None:
        dirs = image_upper(upper, record.name, record.id)

    def make_store() -> ChunkStore:
        return ChunkStore(open_backend(store_url), cache_bytes=VIEW_CHUNK_CACHE)

    log_file = mount_log_file(store.backend.cache_dir())
    try:
        with open_view(store, record, index, make_store, log_file, prefetch=prefetch) as view:
            mount_overlay(
                mountpoint,
                [Path(view.path)],
                view.data_layers,
                upper=dirs.tree if dirs else None,
                work=dirs.work if dirs else None,
            )
    except MountError:
        release_view(daemon_dir(store.backend.cache_dir()))
        raise
    return ImageMount(
        os.path.realpath(mountpoint),
        view,
        Path(upper).absolute() if upper else None,
        dirs.tree if dirs else None,
    )


def find_image_mount(mountpoint: str | Path) -> ImageMount | None:
    """The image mounted at ``mountpoint``, or None if it is no layerfs image mount."""
    found = find_overlay(mountpoint)
    if found is None or not found.lowers:
        return None
    view = ViewInfo.load(found.lowers[0])
    if view is None:
        raise LayerfsError(
            f"{found.mountpoint} is a layerfs overlay whose view {found.lowers[0]} has no "
            "record: unmount it and mount the image again"
        )
    upper = Path(found.upper) if found.upper else None
    return ImageMount(found.mountpoint, view, upper.parent if upper else None, upper)


def mount_dirs(
    lowers: list[Path], mountpoint: Path, upper: Path | None = None, work: Path | None = None
) -> None:
    """Mount plain directories (top first) the way overlayfs does: with overlayfs.

    Read-only without ``upper``; ``upper`` and ``work`` go together, on one
    filesystem. Whiteouts and opaque directories follow overlayfs (character
    devices 0/0, ``trusted.overlay.opaque``); OCI ``.wh.*`` files are plain files
    here (an OCI layer tar is imported with `layerfs import` instead).
    """
    if (upper is None) != (work is None):
        raise MountError("upperdir and workdir go together")
    for path in [*lowers, *([upper, work] if upper and work else [])]:
        if not Path(path).is_dir():
            raise MountError(f"{path} is not a directory")
    if len(lowers) == 1 and upper is None:  # overlayfs wants two lower layers then
        empty = run_dir() / "empty"
        empty.mkdir(mode=0o755, parents=True, exist_ok=True)
        lowers = [*lowers, empty]
    mount_overlay(mountpoint, lowers, [], upper=upper, work=work)


def unmount_image(mountpoint: str | Path) -> None:
    """Unmount a layerfs overlay, and its image's view once no other mount uses it."""
    found = unmount_overlay(mountpoint)
    view = ViewInfo.load(found.lowers[0]) if found.lowers else None
    if view is not None:
        release_view(view.daemon)
