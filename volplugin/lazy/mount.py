"""The mount of a lazy volume: the backup as an image, mounted writable by layerfs' mount service.

A backup tree is one layer without whiteouts: a one-layer ImageRecord named after it
(``backup_image``) is mounted by layerfs.fs.service like any image, with the store's
shared index of that tree (layerfs.index.ensure_index, built at ``prepare``): a kernel
overlay on the volume's directory over the tree's read-only image view (file bytes from
the store's content cache, fetched on first read), writable into the volume's upper
DIR. The kernel keeps every change in DIR/upper in overlayfs' format
(layerfs.union.upper), DIR/work is its workdir and DIR/layerfs.json names the tree
(upper format 2).

The overlay outlives the plugin (it is the kernel's) and so does the view (its own
daemon, in its own session): a plugin restart finds the volume still mounted
(``is_mounted``), and only a mount whose view died is made again (the mount service
replaces it). The plugin mounts in its own process, with its open store, when the
store's view daemon runs; starting that daemon forks, so a short-lived process
(``python -m volplugin.lazy.mount``) does it instead of the plugin's threads, and
mounts. A plugin that serves roaming volumes has that process start the daemon when
it starts and hold it for the plugin's life (``ready``), so their Mounts never wait
for a new interpreter, a new daemon and the store opened twice more.

Layout under ROOT/lazy/NAME/ (the upper DIR): ``layerfs.json``, ``upper/``, ``work/``,
``fill/`` (the background fill) and ``merge/`` (the merge's state, volplugin.lazy.merge).
A volume made by an earlier version (``index.sqlite`` and an upper tree in the retired
FUSE engine's format, no layerfs.json) is refused with ``LegacyLayout``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from layerfs.catalog import ImageRecord, LayerRecord
from layerfs.errors import LayerfsError
from layerfs.fs.mounting import MountError, find_mount
from layerfs.fs.overlay import find_overlay, umount
from layerfs.fs.service import find_image_mount, unmount_image
from layerfs.fs.upper import FORMAT, META_FILE, image_upper
from layerfs.fs.views import ViewNotRunning, release_view, view_serves
from layerfs.index import ensure_index
from layerfs.memory import return_large_buffers
from layerfs.records import Kind, find_entry
from layerfs.store.chunks import ChunkStore

MOUNT_TIMEOUT = 120.0
LEGACY_FSTYPE = "fuse.layerfs"  # the mounts of the retired FUSE engine


class LegacyLayout(MountError):
    """A lazy volume made by an earlier version, whose upper tree this one cannot use."""


@dataclass(frozen=True)
class LazyDirs:
    """Where one lazy volume keeps its parts (``base`` is the mount's upper DIR)."""

    base: Path

    @property
    def upper(self) -> Path:
        return self.base / "upper"

    @property
    def work(self) -> Path:
        return self.base / "work"

    @property
    def meta(self) -> Path:
        return self.base / META_FILE

    @property
    def fill(self) -> Path:
        return self.base / "fill"

    @property
    def stage(self) -> Path:
        return self.base / "merge"


def backup_image(tree: str) -> ImageRecord:
    """The one-layer image a backup tree is mounted as."""
    image = ImageRecord(name=f"backup-tree-{tree[:12]}", id=tree, config={}, layers=[])
    image.layers.append(LayerRecord(diff_id=tree, tree=tree))
    return image


def check_layout(dirs: LazyDirs, name: str) -> None:
    """Refuse a volume whose upper tree is not the kernel's (made by an earlier version)."""
    fmt = None
    if dirs.meta.exists():
        try:
            fmt = json.loads(dirs.meta.read_text()).get("format")
        except (OSError, ValueError) as exc:
            raise LegacyLayout(f"cannot read {dirs.meta}: {exc}") from exc
    elif not dirs.upper.exists():
        return  # nothing made yet
    if fmt == FORMAT:
        return
    raise LegacyLayout(
        f"the lazy volume {name!r} was made by an earlier volplugin: the changes made "
        f"through its mount ({dirs.upper}) are in the format of the retired FUSE mount "
        "engine, which this version can neither mount nor merge. Copy its data out while "
        "its earlier mount still serves it (or with the earlier volplugin), then remove "
        "the volume and restore it again"
    )


def prepare(store: ChunkStore, dirs: LazyDirs, tree: str) -> None:
    """Build the tree's index, and the upper DIR whose root has the backup root's attributes."""
    image = backup_image(tree)
    ensure_index(store, image)
    upper = image_upper(dirs.base, image.name, image.id)
    dirs.fill.mkdir(exist_ok=True)
    root = find_entry(store, tree, "")
    if root is not None and root.kind is Kind.DIR:
        os.chown(upper.tree, root.uid, root.gid)
        os.chmod(upper.tree, root.mode & 0o7777)
        for key, value in root.xattrs.items():
            os.setxattr(upper.tree, key, value)
        os.utime(upper.tree, ns=(root.mtime_ns, root.mtime_ns))


def is_mounted(mountpoint: Path) -> bool:
    """Whether a lazy volume's overlay is mounted at ``mountpoint`` and its view serves."""
    try:
        found = find_image_mount(mountpoint)
    except LayerfsError:  # an overlay whose view left no record: stale
        return False
    return found is not None and found.upper is not None and view_serves(found.view)


def mount(
    store_url: str,
    dirs: LazyDirs,
    mountpoint: Path,
    name: str,
    tree: str,
    store: ChunkStore | None = None,
) -> None:
    """Mount a lazy volume and return once it serves; no-op if it does already.

    With the caller's open ``store`` and the store's view daemon running, the mount is
    made here; else by a mount process. A mount whose view died is replaced (by the
    mount service).
    """
    from layerfs.fs.service import mount_image

    check_layout(dirs, name)
    if is_mounted(mountpoint):
        return
    store_url = _absolute(store_url)
    if store is not None:
        try:
            mount_image(
                store_url,
                store,
                backup_image(tree),
                mountpoint,
                dirs.base,
                prefetch=False,
                start_view=False,
            )
            return
        except ViewNotRunning:
            pass
    args = ["--base", str(dirs.base), "--tree", tree, "--name", name, str(mountpoint)]
    _run(store_url, args, f"cannot mount the lazy volume {name!r} at {mountpoint}")
    if not is_mounted(mountpoint):
        raise MountError(f"cannot mount the lazy volume {name!r} at {mountpoint}")


def ready(store_url: str, holder: int) -> None:
    """Have the store's view daemon running, held for as long as process ``holder`` lives
    (the daemon is started by a process of its own: starting it forks)."""
    _run(_absolute(store_url), ["--hold", str(holder)], "cannot start the image view")


def _absolute(store_url: str) -> str:
    # the view daemon runs in /: a relative store path would name another directory
    return store_url if "://" in store_url else os.path.abspath(store_url)


def _run(store_url: str, args: list[str], failure: str) -> None:
    cmd = [sys.executable, "-m", "volplugin.lazy.mount", "--store", store_url, *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=MOUNT_TIMEOUT, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise MountError(f"{failure}: {detail[-1] if detail else 'the mount process failed'}")


def release(mountpoint: Path, attempts: int = 20) -> bool:
    """Unmount a lazy volume's overlay (and its view, if no other mount uses it);
    False if it stays busy. A mount whose view died is unmounted all the same."""
    for attempt in range(attempts):
        if find_overlay(mountpoint) is None:
            return True
        try:
            unmount_image(mountpoint)
            return True
        except MountError:
            if attempt + 1 < attempts:
                time.sleep(0.1)
    return False


def force_release(mountpoint: Path) -> None:
    """Detach a lazy volume's mount even if busy (for Remove): users keep it until they
    close. Also detaches the FUSE mount of a volume made by an earlier version."""
    legacy = find_mount(mountpoint)
    if legacy is not None and legacy.fstype == LEGACY_FSTYPE:
        umount(legacy.mountpoint, lazy=True)
        return
    if release(mountpoint, attempts=3):
        return
    found = find_overlay(mountpoint)
    if found is not None:
        umount(found.mountpoint, lazy=True)
        for lower in found.lowers[:1]:
            release_view(lower)


def main(argv: list[str] | None = None) -> int:
    """Entry of the mount process: mount the volume (the view daemon stays) and return;
    with ``--hold PID`` only start the view daemon and hold it for that process."""
    return_large_buffers()
    from layerfs.fs.service import mount_image, ready_view
    from layerfs.store import open_store

    parser = argparse.ArgumentParser(prog="python -m volplugin.lazy.mount")
    parser.add_argument("--store", required=True)
    parser.add_argument("--hold", type=int, metavar="PID")
    parser.add_argument("--base", type=Path)
    parser.add_argument("--tree")
    parser.add_argument("--name")
    parser.add_argument("mountpoint", type=Path, nargs="?")
    args = parser.parse_args(argv)
    if args.hold is None and None in (args.base, args.tree, args.name, args.mountpoint):
        parser.error("--base, --tree, --name and MOUNTPOINT are needed to mount")
    try:
        store = open_store(args.store)
        if args.hold is not None:
            ready_view(args.store, store, args.hold)
            return 0
        # The volume's fill copies every file out: the view caches only what is read.
        mount_image(
            args.store, store, backup_image(args.tree), args.mountpoint, args.base, prefetch=False
        )
    except (LayerfsError, OSError) as exc:
        print(f"lazy mount: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
