"""`layerfs mount` and `layerfs umount`: an image (or plain directories) as a mounted tree.

An image mount is assembled by layerfs.fs.service (a kernel overlay over the
image's shared view). A mount is on the start-up path of containers, so this
module imports only what such a mount needs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


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
    """Mount IMAGE at MOUNTPOINT read-only, or writable with --upper DIR.

    The mount is a kernel overlay (listed by `mount` as overlay, source
    layerfs) over the image's view, a FUSE mount under /run/layerfs/views
    shared by every mount of the image, which fills the store's content cache
    in the background; the kernel reads file bytes from that cache. With
    --upper DIR the mount is writable and the kernel keeps its changes in
    DIR/upper (created if missing; mount the same image with the same DIR to
    go on). `layerfs mount --lowerdir A:B [--upperdir U --workdir W] MOUNTPOINT`
    mounts plain directories the way overlayfs does instead of an image.

    While the store's view runs (a local store), the mount asks it for the image
    and needs no password; else it opens the store. The first mount of an image
    builds its index under the store's cache directory. The view logs to
    <store cache dir>/logs/mount.log, e.g. /var/lib/layerfs/cache/logs/mount.log
    for root's default store.
    Unmount with `layerfs umount MOUNTPOINT`.
    """
    if lowerdir is not None:
        if mountpoint is not None or upper is not None:
            raise click.UsageError("with --lowerdir give only MOUNTPOINT (no IMAGE, no --upper)")
        if (upperdir is None) != (workdir is None):
            raise click.UsageError("--upperdir and --workdir go together")
        from layerfs.fs.service import mount_dirs

        mount_dirs(
            [Path(p) for p in lowerdir.split(":")],
            Path(image),
            Path(upperdir) if upperdir else None,
            Path(workdir) if workdir else None,
        )
        return
    if mountpoint is None:
        raise click.UsageError("missing MOUNTPOINT")
    if upperdir is not None or workdir is not None:
        raise click.UsageError("--upperdir/--workdir need --lowerdir; for an image use --upper")
    if foreground:
        raise click.UsageError(
            "an image mount is a kernel overlay: it needs no process of its own to stay "
            "attached to (its image view logs to the store's mount log)"
        )
    from layerfs.fs.service import mount_stored_image

    if "://" not in store_url:  # the view daemon runs in /, so relative paths would move
        store_url = os.path.abspath(store_url)
    mount_stored_image(store_url, image, Path(mountpoint), Path(upper) if upper else None)
    _exit_now()


def _exit_now() -> None:
    """End the command at once: the daemon serves the mount, and tearing the
    interpreter down (freeing every imported module) only delays the caller."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@click.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.pass_obj
def umount_command(store_url: str, mountpoint: str) -> None:
    """Unmount a layerfs mount at MOUNTPOINT (no store or password is needed).

    An image's view is unmounted too once no other mount uses it."""
    from layerfs.fs.service import unmount_image

    unmount_image(mountpoint)


COMMANDS = [mount_command, umount_command]
