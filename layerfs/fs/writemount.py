"""Serving writable mounts: an image with an upper DIR, or overlay-style lower/upper/work dirs.

Both go through layerfs.fs.mounting (daemon, wait, log) with the same FUSE
options. Before mounting, a mountpoint left stale by a killed mount process
("Transport endpoint is not connected") is cleaned with a lazy umount; the
upper directory needs no repair because every change to it is atomic or
recorded only once complete (see layerfs.fs.upper).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from layerfs.catalog import ImageRecord
from layerfs.dirstack import DirStack
from layerfs.fs import attrtimeout
from layerfs.fs.mounting import MountError, find_mount, mount_operations
from layerfs.fs.readonly import ReadOnlyOperations
from layerfs.fs.upper import UpperDirs, image_upper, overlay_upper
from layerfs.fs.writable import WritableOperations
from layerfs.view import View

log = logging.getLogger(__name__)

SUBTYPE = "layerfs"
# Seconds the kernel keeps names, attributes of directories and single-name files, and
# the absence of names: every change goes through the mount, which tells the kernel.
ENTRY_TIMEOUT = 1.0
WRITABLE_OPTIONS = {
    "raw_fi": True,  # WritableOperations sets keep_cache and fh on fuse_file_info itself
    "allow_other": True,
    "default_permissions": True,
    "use_ino": True,
    "big_writes": True,
    "max_write": 131072,
    "max_read": 131072,
    # One thread: requests of a Python filesystem do not overlap usefully (GIL),
    # each hand-over between threads costs, and layerfs.fs.attrtimeout and
    # layerfs.fs.lowlevel need it.
    "nothreads": True,
    # Hard links get one kernel inode per name in libfuse's path-based API, so
    # cached attributes of one name would go stale when another name is written:
    # attributes are cached only for files with one name (layerfs.fs.attrtimeout),
    # and dropped when a file gains a second one (layerfs.fs.lowlevel).
    **attrtimeout.mount_options(ENTRY_TIMEOUT),
}

READ_ONLY_OPTIONS = {
    "ro": True,
    "allow_other": True,
    "default_permissions": True,
    "use_ino": True,
    "kernel_cache": True,
}


def is_stale(mountpoint: str | Path) -> bool:
    """Whether ``mountpoint`` is a FUSE mount whose process is gone."""
    try:  # opening asks the daemon; a stat may be answered from cached attributes
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    os.close(fd)
    return False


def recover_stale(mountpoint: str | Path) -> bool:
    """Lazily unmount a stale FUSE mount at ``mountpoint``; return whether there was one."""
    path = os.path.abspath(mountpoint)
    if not is_stale(path):
        return False
    info = find_mount(path)
    if info is None or not info.fstype.startswith("fuse"):
        return False
    log.warning("cleaning up the stale mount at %s (its process is gone)", path)
    if os.geteuid() == 0 and shutil.which("umount"):
        cmd = ["umount", "-l", path]
    else:
        cmd = [shutil.which("fusermount3") or "fusermount", "-uz", path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MountError(
            f"cannot clean up the stale mount at {path}: {proc.stderr.strip()}; "
            f"run `umount -l {path}` as root"
        )
    return True


def serve_writable(
    make_view: Callable[[], View],
    dirs: UpperDirs,
    mountpoint: str | Path,
    *,
    overlay: bool,
    fsname: str,
    foreground: bool,
    log_file: Path,
    on_exit: Callable[[], None] | None = None,
    on_unmount: Callable[[], None] | None = None,
) -> int:
    """Mount a writable union of the view ``make_view`` builds and ``dirs``; return the pid."""
    recover_stale(mountpoint)

    def make_ops() -> WritableOperations:
        os.umask(0)  # the kernel already applied the caller's umask
        timeouts = attrtimeout.AttrTimeout(
            ENTRY_TIMEOUT, cached=ENTRY_TIMEOUT, negative=ENTRY_TIMEOUT
        )
        return WritableOperations(
            make_view(), dirs, overlay=overlay, on_exit=on_exit, attr_timeout=timeouts
        )

    return mount_operations(
        make_ops,
        mountpoint,
        subtype=SUBTYPE,
        fsname=fsname,
        options=WRITABLE_OPTIONS,
        foreground=foreground,
        log_file=log_file,
        on_unmount=on_unmount,
    )


def serve_overlay(
    lowerdirs: list[str],
    upperdir: str | None,
    workdir: str | None,
    mountpoint: str | Path,
    *,
    foreground: bool,
    log_file: Path,
    readonly: bool = False,
    on_unmount: Callable[[], None] | None = None,
) -> int:
    """Mount lower directories (top first) with an overlay-style upper, or read-only."""
    DirStack(lowerdirs).close()  # check the lower directories before forking
    fsname = ":".join(lowerdirs)
    if upperdir is None or readonly:
        if workdir is not None and not readonly:
            raise MountError("an overlay mount with workdir also needs upperdir=DIR")
        recover_stale(mountpoint)
        return mount_operations(
            lambda: ReadOnlyOperations(DirStack(lowerdirs)),
            mountpoint,
            subtype=SUBTYPE,
            fsname=fsname,
            options={**READ_ONLY_OPTIONS},
            foreground=foreground,
            log_file=log_file,
            on_unmount=on_unmount,
        )
    if workdir is None:
        raise MountError("an overlay mount with upperdir also needs workdir=DIR")
    dirs = overlay_upper(Path(upperdir), Path(workdir))
    return serve_writable(
        lambda: DirStack(lowerdirs),
        dirs,
        mountpoint,
        overlay=True,
        fsname=fsname,
        foreground=foreground,
        log_file=log_file,
        on_unmount=on_unmount,
    )


def serve_image(
    store_url: str,
    record: ImageRecord,
    index: Path,
    mountpoint: str | Path,
    upper: str | Path,
    *,
    foreground: bool,
    log_file: Path,
    on_unmount: Callable[[], None] | None = None,
) -> int:
    """Mount an image writable, keeping its changes in the upper DIR; return the pid."""
    from layerfs.index import ImageView
    from layerfs.store import open_store

    dirs = image_upper(Path(upper), record.name, record.id)
    return serve_writable(
        lambda: ImageView(open_store(store_url), index),
        dirs,
        mountpoint,
        overlay=False,
        fsname=record.name,
        foreground=foreground,
        log_file=log_file,
        on_unmount=on_unmount,
    )


def mount_overlay_recorded(
    store_url: str | None,
    lowerdirs: list[str],
    upperdir: str | None,
    workdir: str | None,
    mountpoint: str | Path,
    *,
    foreground: bool,
    readonly: bool = False,
) -> int:
    """serve_overlay, logging to the store's mount log and recording the mount (MountInfo)
    until it is unmounted."""
    from layerfs.fs.mountinfo import forget_mount, record_mount
    from layerfs.store import open_backend

    backend = open_backend(store_url)
    log_file = backend.cache_dir() / "logs" / "mount.log"
    lowers = [os.path.abspath(p) for p in lowerdirs]
    pid = serve_overlay(
        lowers,
        upperdir,
        workdir,
        mountpoint,
        foreground=foreground,
        log_file=log_file,
        readonly=readonly,
        on_unmount=lambda: forget_mount(backend, mountpoint, os.getpid()),
    )
    if not foreground:
        upper = None if readonly else upperdir
        record_mount(backend, mountpoint, pid, upper_dir=upper, lowerdirs=lowers)
    return pid
