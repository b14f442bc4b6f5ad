"""Kernel overlayfs mounts: assembling one over an image view and reading them back.

A layerfs mount of an image is a kernel overlay whose first lower layer is the
image's view (layerfs.fs.imageview) and whose data-only lower layer is the
content cache (``lowerdir=VIEW::DATA``): file bytes come from the cache, the
view only answers metadata. A writable mount adds ``upperdir`` and
``workdir``: every write is the kernel's, kept in the upper directory in
overlayfs' own format. Mounts are made with mount(2) directly; the kernel's
mount table is the only record of what is mounted where.

Data-only lower layers need Linux 6.5 or later; on an older kernel the view
is the only lower layer and serves the bytes itself.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path

from layerfs.fs.mounting import MountError, find_mount, kernel_mounts

FSTYPE = "overlay"
SOURCE = "layerfs"  # the source column of every layerfs overlay mount
MS_RDONLY = 1
MNT_DETACH = 2


def data_only_layers_supported(release: str | None = None) -> bool:
    """Whether the running kernel (or ``release``) has data-only lower layers (6.5).

    ``LAYERFS_DATA_ONLY_LAYERS=off`` says no for the running kernel: image
    views then serve file bytes themselves, as on an older kernel.
    """
    if release is None and os.environ.get("LAYERFS_DATA_ONLY_LAYERS", "").lower() == "off":
        return False
    found = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return found is not None and (int(found[1]), int(found[2])) >= (6, 5)


@dataclass(frozen=True)
class OverlayMount:
    """A layerfs overlay as the kernel lists it."""

    mountpoint: str
    lowers: list[str]  # top first, data-only layers excluded
    data_layers: list[str]
    upper: str | None
    work: str | None
    readonly: bool


def _check_path(path: Path) -> str:
    text = os.path.realpath(path)
    if any(c in text for c in ":,\\\n"):
        raise MountError(f"{text}: overlay layer paths cannot contain ':', ',' or '\\'")
    return text


def _mount_syscall(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)  # the C library this process runs on
    result = libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode())
    if result != 0:
        err = ctypes.get_errno()
        raise MountError(
            f"cannot mount an overlay at {target}: {os.strerror(err)} ({data}); "
            "see the kernel log (dmesg) for overlayfs' reason"
        )


def overlay_options(
    lowers: list[Path],
    data_layers: list[Path],
    upper: Path | None = None,
    work: Path | None = None,
) -> list[str]:
    """The overlay options of a layerfs mount (lower layers top first); read-only without
    ``upper`` (the caller adds MS_RDONLY or "ro")."""
    lowerdir = ":".join(_check_path(p) for p in lowers)
    if data_layers:
        lowerdir += "::" + "::".join(_check_path(p) for p in data_layers)
    # xino: one st_dev for the whole mount, and inode numbers that stay the same across
    # copy-up and remount (the layers are on different filesystems)
    options = [f"lowerdir={lowerdir}", "metacopy=on", "xino=on"]
    if upper is None:
        return [*options, "redirect_dir=follow"]
    if work is None:
        raise MountError("a writable overlay needs a work directory")
    return [
        *options,
        f"upperdir={_check_path(upper)}",
        f"workdir={_check_path(work)}",
        "redirect_dir=on",
    ]


def mount_overlay(
    mountpoint: str | Path,
    lowers: list[Path],
    data_layers: list[Path],
    upper: Path | None = None,
    work: Path | None = None,
) -> None:
    """Mount a layerfs overlay at ``mountpoint``; read-only without ``upper``."""
    target = os.path.realpath(mountpoint)
    if not os.path.isdir(target):
        raise MountError(f"mount point {target} is not a directory: create it first")
    if os.path.ismount(target):
        raise MountError(f"{target} is already a mount point: unmount it first")
    options = overlay_options(lowers, data_layers, upper, work)
    flags = MS_RDONLY if upper is None else 0
    _mount_syscall(SOURCE, target, FSTYPE, flags, ",".join(options))


def _parse(mountpoint: str, options: str) -> OverlayMount:
    fields: dict[str, str] = {}
    for item in options.split(","):
        key, _, value = item.partition("=")
        fields[key] = value
    lowerdir = fields.get("lowerdir", "")
    lowers, _, data = lowerdir.partition("::")
    return OverlayMount(
        mountpoint=mountpoint,
        lowers=[p for p in lowers.split(":") if p],
        data_layers=[p for p in data.split("::") if p],
        upper=fields.get("upperdir") or None,
        work=fields.get("workdir") or None,
        readonly="ro" in fields,
    )


def layerfs_overlays() -> list[OverlayMount]:
    """Every layerfs overlay mount this process sees."""
    return [
        _parse(m.mountpoint, m.options)
        for m in kernel_mounts()
        if m.fstype == FSTYPE and m.source == SOURCE
    ]


def find_overlay(mountpoint: str | Path) -> OverlayMount | None:
    """The layerfs overlay mounted at ``mountpoint``, or None."""
    found = find_mount(mountpoint)
    if found is None or found.fstype != FSTYPE or found.source != SOURCE:
        return None
    return _parse(found.mountpoint, found.options)


def unmount_overlay(mountpoint: str | Path) -> OverlayMount:
    """Unmount the layerfs overlay at ``mountpoint``; refuse anything else."""
    path = os.path.realpath(mountpoint)
    found = find_overlay(path)
    if found is None:
        raise MountError(f"{path} is not a layerfs mount")
    umount(path)
    return found


def umount(path: str, lazy: bool = False) -> None:
    """umount(2) of ``path`` (``lazy``: detach it now, let it go once unused);
    MountError with the reason if the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)  # the C library this process runs on
    if libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise MountError(f"cannot unmount {path}: {os.strerror(err)}")
