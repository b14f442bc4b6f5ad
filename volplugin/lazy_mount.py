"""The FUSE side of a lazy volume: the backup's index, its upper tree, the mount daemon.

A backup tree is one layer without whiteouts, so its index is built by layerfs' image
index builder (one-layer ImageRecord) and served by ImageView: chunks are fetched from
the store on first read and kept in the store's local cache. The writable mount keeps
changes in an image-mode upper tree (layerfs.fs.upper) and runs as its own process in
its own session (``python -m volplugin.lazy_mount``), so it outlives the plugin: a
plugin restart finds the mount still serving; only a mount whose process died is made
again.

Layout under ROOT/lazy/NAME/: ``index.sqlite``, ``upper/`` (the upper tree),
``work/`` (copy-up temp files), ``fill/`` (the background fill), ``mount.log``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from layerfs.catalog import ImageRecord, LayerRecord
from layerfs.fs.mounting import MountError, find_mount, unmount
from layerfs.fs.upper import UpperDirs, reset_tmp
from layerfs.fs.writemount import SUBTYPE, is_stale, recover_stale
from layerfs.index.build import build_index
from layerfs.records import Kind, find_entry
from layerfs.store.chunks import ChunkStore

FSTYPE = f"fuse.{SUBTYPE}"
MOUNT_TIMEOUT = 120.0


@dataclass(frozen=True)
class LazyDirs:
    """Where one lazy volume keeps its parts."""

    base: Path

    @property
    def index(self) -> Path:
        return self.base / "index.sqlite"

    @property
    def upper(self) -> UpperDirs:
        return UpperDirs(self.base / "upper", self.base / "work")

    @property
    def fill(self) -> Path:
        return self.base / "fill"

    @property
    def log(self) -> Path:
        return self.base / "mount.log"


def prepare(store: ChunkStore, dirs: LazyDirs, tree: str) -> None:
    """Build the index and an empty upper tree whose root has the backup root's attributes."""
    dirs.base.mkdir(parents=True, exist_ok=True)
    image = ImageRecord(name=f"backup-tree-{tree[:12]}", id=tree, config={}, layers=[])
    image.layers.append(LayerRecord(diff_id=tree, tree=tree))
    if not dirs.index.exists():
        build_index(store, image, dirs.index)
    upper = dirs.upper
    upper.tree.mkdir(exist_ok=True)
    upper.work.mkdir(exist_ok=True)
    dirs.fill.mkdir(exist_ok=True)
    root = find_entry(store, tree, "")
    if root is not None and root.kind is Kind.DIR:
        os.chown(upper.tree, root.uid, root.gid)
        os.chmod(upper.tree, root.mode & 0o7777)
        for name, value in root.xattrs.items():
            os.setxattr(upper.tree, name, value)
        os.utime(upper.tree, ns=(root.mtime_ns, root.mtime_ns))


def is_mounted(mountpoint: Path) -> bool:
    """Whether a live lazy mount serves ``mountpoint``."""
    info = find_mount(mountpoint)
    return info is not None and info.fstype == FSTYPE and not is_stale(mountpoint)


def mount(store_url: str, dirs: LazyDirs, mountpoint: Path, name: str) -> None:
    """Start the mount process for a lazy volume and wait until it serves; no-op if it does."""
    if is_mounted(mountpoint):
        return
    recover_stale(mountpoint)
    cmd = [sys.executable, "-m", "volplugin.lazy_mount", "--store", store_url]
    cmd += ["--base", str(dirs.base), "--name", name, str(mountpoint)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=MOUNT_TIMEOUT, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0 or not is_mounted(mountpoint):
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise MountError(
            f"cannot mount the lazy volume {name!r} at {mountpoint}: "
            f"{detail[-1] if detail else 'the mount process failed'} (see {dirs.log})"
        )


def release(mountpoint: Path, attempts: int = 20) -> bool:
    """Unmount a lazy mount; False if it stays busy. A stale mount is cleaned up."""
    if recover_stale(mountpoint):
        return True
    for _ in range(attempts):
        info = find_mount(mountpoint)
        if info is None or info.fstype != FSTYPE:
            return True
        try:
            unmount(mountpoint, FSTYPE)
            return True
        except MountError:
            time.sleep(0.1)
    return False


def force_release(mountpoint: Path) -> None:
    """Detach a lazy mount even if busy (for Remove): users keep it until they close."""
    if release(mountpoint, attempts=3):
        return
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    """Entry of the mount process: serve the writable mount in the background and return."""
    from layerfs.fs.writemount import serve_writable
    from layerfs.index import ImageView
    from layerfs.store import open_store

    parser = argparse.ArgumentParser(prog="python -m volplugin.lazy_mount")
    parser.add_argument("--store", required=True)
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("mountpoint", type=Path)
    args = parser.parse_args(argv)
    dirs = LazyDirs(args.base)
    upper = dirs.upper
    reset_tmp(upper)
    try:
        serve_writable(
            lambda: ImageView(open_store(args.store), dirs.index),
            upper,
            args.mountpoint,
            overlay=False,
            fsname=f"volplugin-lazy:{args.name}",
            foreground=False,
            log_file=dirs.log,
        )
    except MountError as exc:
        print(f"lazy mount: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
