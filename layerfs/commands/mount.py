"""`layerfs mount` and `layerfs umount`: serve an image's merged tree read-only through FUSE.

A read-only mount is on the start-up path of containers, so this module
imports only what such a mount needs; writable and overlay-style mounts load
layerfs.fs.writemount when asked for.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from layerfs.store import open_store

if TYPE_CHECKING:
    from layerfs.fs.readonly import ReadOnlyOperations

SUBTYPE = "layerfs"
# Lower layers never change, so the kernel may keep attributes, names (also
# missing ones) and pages for as long as it likes.
CACHE_SECONDS = 86400.0
READ_ONLY_OPTIONS = {
    "ro": True,
    "allow_other": True,
    "default_permissions": True,
    "use_ino": True,
    "kernel_cache": True,
    "attr_timeout": CACHE_SECONDS,
    "entry_timeout": CACHE_SECONDS,
    "negative_timeout": CACHE_SECONDS,
    "max_read": 131072,
    "max_readahead": 131072,
    # One thread: requests of a walk or a read arrive one after another anyway,
    # and Python threads would only contend for the GIL and each open their
    # own index connection. Reads fetch chunks ahead in the store's own thread.
    "nothreads": True,
}
# Plain chunks the mount daemon keeps: the kernel's page cache holds what was
# read, so this only has to cover chunks a read straddles and read-ahead.
DAEMON_CHUNK_CACHE = 8 << 20


def mount_log_file(cache_dir: Path) -> Path:
    """Where mount daemons of a store write their log."""
    return cache_dir / "logs" / "mount.log"


@click.command("mount")
@click.argument("image")
@click.argument("mountpoint", type=click.Path(file_okay=False), required=False)
@click.option(
    "-f", "--foreground", is_flag=True, help="Stay attached and log to stderr until unmounted."
)
@click.option("--upper", metavar="DIR", help="Mount writable; changes go to DIR (kept).")
@click.option("--lowerdir", metavar="A:B", help="Overlay mode: lower dirs, top first (no IMAGE).")
@click.option("--upperdir", metavar="U", help="Overlay mode: the upper dir (needs --workdir).")
@click.option("--workdir", metavar="W", help="Overlay mode: the work dir, same fs as U.")
@click.pass_obj
def mount_command(
    store_url: str,
    image: str,
    mountpoint: str | None,
    foreground: bool,
    upper: str | None,
    lowerdir: str | None,
    upperdir: str | None,
    workdir: str | None,
) -> None:
    """Mount IMAGE at MOUNTPOINT (listed by `mount` as fuse.layerfs), read-only or --upper DIR.

    With --upper DIR the mount is writable and keeps its changes in DIR
    (created if missing; mount the same image with the same DIR to go on).
    `layerfs mount --lowerdir A:B [--upperdir U --workdir W] MOUNTPOINT`
    mounts plain directories the way overlayfs does instead of an image.

    The first mount of an image builds its index under the store's cache
    directory. Without --foreground the command returns once the mount
    answers, and the mount process logs to STORE/cache/logs/mount.log (for
    a local store; in general <backend cache dir>/logs/mount.log), e.g.
    /var/lib/layerfs/cache/logs/mount.log for root's default store.
    Unmount with `layerfs umount MOUNTPOINT`.
    """
    if lowerdir is not None:
        if mountpoint is not None or upper is not None:
            raise click.UsageError("with --lowerdir give only MOUNTPOINT (no IMAGE, no --upper)")
        if (upperdir is None) != (workdir is None):
            raise click.UsageError("--upperdir and --workdir go together")
        from layerfs.fs.writemount import mount_overlay_recorded

        mount_overlay_recorded(
            store_url, lowerdir.split(":"), upperdir, workdir, image, foreground=foreground
        )
        return
    if mountpoint is None:
        raise click.UsageError("missing MOUNTPOINT")
    if upperdir is not None or workdir is not None:
        raise click.UsageError("--upperdir/--workdir need --lowerdir; for an image use --upper")
    if _is_stale(mountpoint):
        from layerfs.fs.writemount import recover_stale

        recover_stale(mountpoint)
    from layerfs.catalog import Catalog
    from layerfs.fs.mountinfo import forget_mount, record_mount
    from layerfs.fs.mounting import mount_operations
    from layerfs.fs.readonly import ReadOnlyOperations
    from layerfs.index import ImageView, ensure_index
    from layerfs.store.chunks import ChunkStore
    from layerfs.store.location import open_backend

    if "://" not in store_url:  # the daemon runs in /, so relative paths would move
        store_url = os.path.abspath(store_url)
    store = open_store(store_url)
    record = Catalog(store.backend).get_image(image)
    index = Path(os.path.abspath(ensure_index(store, record)))
    log_file = mount_log_file(store.backend.cache_dir())

    def make_ops() -> ReadOnlyOperations:
        daemon_store = ChunkStore(open_backend(store_url), cache_bytes=DAEMON_CHUNK_CACHE)
        return ReadOnlyOperations(ImageView(daemon_store, index, read_ahead=True))

    def forget() -> None:  # in the mount's process, once it is unmounted
        forget_mount(store.backend, mountpoint, os.getpid())

    if upper is not None:
        from layerfs.fs.writemount import serve_image

        pid = serve_image(
            store_url,
            record,
            index,
            mountpoint,
            upper,
            foreground=foreground,
            log_file=log_file,
            on_unmount=forget,
        )
    else:
        pid = mount_operations(
            make_ops,
            mountpoint,
            subtype=SUBTYPE,
            fsname=record.name,
            options=READ_ONLY_OPTIONS,
            foreground=foreground,
            log_file=log_file,
            on_unmount=forget,
        )
    if not foreground:
        record_mount(
            store.backend, mountpoint, pid, image=record.name, image_id=record.id, upper_dir=upper
        )
        _exit_now()


def _exit_now() -> None:
    """End the command at once: the daemon serves the mount, and tearing the
    interpreter down (freeing every imported module) only delays the caller."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _is_stale(mountpoint: str) -> bool:
    """Whether a killed mount process left ``mountpoint`` disconnected.

    Opening asks the daemon; a stat may be answered from cached attributes.
    """
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    os.close(fd)
    return False


@click.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.pass_obj
def umount_command(store_url: str, mountpoint: str) -> None:
    """Unmount a layerfs mount at MOUNTPOINT (its process drops its record; no store or
    password is needed)."""
    from layerfs.fs.mounting import unmount

    unmount(mountpoint, f"fuse.{SUBTYPE}")


COMMANDS = [mount_command, umount_command]
