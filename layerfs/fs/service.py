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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
    asked_view,
    daemon_dir,
    hold_view,
    open_view,
    release_view,
    run_dir,
    start_view,
    view_serves,
)

if TYPE_CHECKING:
    from layerfs.catalog import ImageRecord
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
    start_view: bool = True,
) -> ImageMount:
    """Mount ``record`` at ``mountpoint``, read-only or writable into ``upper``.

    With ``prefetch`` the image's view fills the content cache with every file
    in the background; without, only with the files that are read (for a
    tree that something else copies out whole, as a lazy volume's fill does).
    Without ``start_view`` nothing forks: if the store's view daemon does not
    run, ViewNotRunning is raised before anything is mounted.
    """
    _replace_stale(mountpoint)
    log_file = mount_log_file(store.backend.cache_dir())
    make_store = _view_store(store_url)
    try:
        with open_view(
            store, record, make_store, log_file, prefetch=prefetch, start=start_view
        ) as view:
            return _mount_over(view, mountpoint, upper)
    except MountError:
        release_view(daemon_dir(store.backend.cache_dir()))
        raise


def mount_stored_image(
    store_url: str, image: str, mountpoint: Path, upper: Path | None
) -> ImageMount:
    """Mount the image named ``image`` (a name or ID) of a store, as ``mount_image`` does.

    When the view daemon of a local store runs, it is asked for the image's view
    (it has the store open): nothing here opens the store or derives its key. Else
    the store is opened here (its password needed) and the daemon started.
    """
    from layerfs.store.location import local_cache_dir, local_root

    root = local_root(store_url)
    if root is not None:
        _replace_stale(mountpoint)
        try:
            with asked_view(local_cache_dir(root), image) as view:
                if view is not None:
                    return _mount_over(view, mountpoint, upper)
        except MountError:
            release_view(daemon_dir(local_cache_dir(root)))
            raise
    from layerfs.catalog import Catalog
    from layerfs.store.location import open_store

    store = open_store(store_url)
    return mount_image(store_url, store, Catalog(store.backend).get_image(image), mountpoint, upper)


def _replace_stale(mountpoint: Path) -> None:
    """Unmount a layerfs overlay at ``mountpoint`` whose image view died."""
    stale = find_overlay(mountpoint)
    view = ViewInfo.load(stale.lowers[0]) if stale is not None and stale.lowers else None
    if stale is not None and (view is None or not view_serves(view)):
        log.warning("replacing the mount at %s, whose image view died", stale.mountpoint)
        umount(stale.mountpoint, lazy=True)


def _mount_over(view: ViewInfo, mountpoint: Path, upper: Path | None) -> ImageMount:
    """The kernel overlay of an image over its ``view``: writable into ``upper`` if given."""
    from layerfs.fs.upper import image_upper

    dirs = image_upper(upper, view.image, view.image_id) if upper is not None else None
    mount_overlay(
        mountpoint,
        [Path(view.path)],
        view.data_layers,
        upper=dirs.tree if dirs else None,
        work=dirs.work if dirs else None,
    )
    return ImageMount(
        os.path.realpath(mountpoint),
        view,
        Path(upper).absolute() if upper else None,
        dirs.tree if dirs else None,
    )


def _view_store(store_url: str) -> Callable[[], ChunkStore]:
    """How a view daemon opens the store again, in its own process."""

    def make_store() -> ChunkStore:
        from layerfs.store.chunks import ChunkStore
        from layerfs.store.location import open_backend

        return ChunkStore(open_backend(store_url), cache_bytes=VIEW_CHUNK_CACHE)

    return make_store


def ready_view(store_url: str, store: ChunkStore, holder: int | None = None) -> int:
    """Start the store's view daemon if none runs (this forks), and with ``holder`` keep
    it serving while that process lives; return the daemon's pid. A long-running
    process that mounts images (volplugin) calls this through a process of its own,
    then mounts with ``start_view=False``: without forking itself, and faster."""
    cache_dir = store.backend.cache_dir()
    if holder is not None:  # first: the daemon must not see itself unused and go
        hold_view(cache_dir, holder)
    return start_view(store, _view_store(store_url), mount_log_file(cache_dir))


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
