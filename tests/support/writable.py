"""Writable mounts for tests: one logical tree as an image and as overlay lower dirs.

``BASE`` describes the tree both ways, so the same POSIX tests run over an
image mount with ``--upper DIR`` and over an overlay-style mount of plain
directories. Every mount is unmounted (forcibly if need be) when the context
ends.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from layerfs.fs.mounting import find_mount
from layerfs.records import Entry, Kind
from layerfs.store.location import open_store
from tests.support.lfsmount import force_unmount, layerfs, public_dir
from tests.support.synthetic import MTIME, d, f, link, make_image, opq, sym, wh

IMAGE = "lfsrw/base:1"
BIG = os.urandom(3 << 20)  # many store chunks
FILES = {
    "etc/hello": b"hello world\n",
    "etc/motd": b"message of the day\n" * 10,
    "data/d1/a": b"a" * 1000,
    "data/d1/sub/b": b"b" * 2000,
    "data/keep": b"keep\n",
    "hl1": b"linked content\n" * 10,
    "top": b"top layer\n",
    "big": BIG,
    "xa": b"x",
}


@dataclass
class Mount:
    """A mounted writable tree and where its changes land."""

    path: Path
    upper: Path  # the upper tree (DIR/upper in image mode, U in overlay mode)
    mode: str  # "image" or "overlay"


def make_store(root: Path) -> Path:
    """A store holding IMAGE: two layers, with a whiteout, an opaque dir and a hardlink."""
    s = open_store(str(root))
    make_image(
        s,
        IMAGE,
        [
            [
                d("", mode=0o755),
                d("etc"),
                f(s, "etc/hello", FILES["etc/hello"]),
                f(s, "etc/motd", FILES["etc/motd"]),
                f(s, "etc/old", b"old"),
                d("data"),
                d("data/d1"),
                f(s, "data/d1/a", FILES["data/d1/a"]),
                d("data/d1/sub"),
                f(s, "data/d1/sub/b", FILES["data/d1/sub/b"]),
                f(s, "data/keep", FILES["data/keep"]),
                d("hidden"),
                f(s, "hidden/lower", b"l"),
                f(s, "hl1", FILES["hl1"]),
                link("hl2", "hl1"),
                f(s, "big", BIG),
                f(s, "xa", b"x", xattrs={"user.color": b"blue"}),
                sym("sym", "etc/hello"),
                Entry("fifo", Kind.FIFO, mode=0o640, mtime_ns=MTIME),
            ],
            [
                wh("etc/old"),
                opq("hidden"),
                f(s, "top", FILES["top"]),
            ],
        ],
    )
    return root


def make_lowers(base: Path) -> list[Path]:
    """The same tree as make_store, as two overlayfs lower dirs (top first)."""
    top, bottom = base / "l1", base / "l2"
    for rel, data in FILES.items():
        if rel in ("top", "hl1"):
            continue
        p = bottom / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (bottom / "etc/old").write_bytes(b"old")
    (bottom / "hidden").mkdir()
    (bottom / "hidden/lower").write_bytes(b"l")
    (bottom / "hl1").write_bytes(FILES["hl1"])
    os.link(bottom / "hl1", bottom / "hl2")
    os.setxattr(bottom / "xa", "user.color", b"blue")
    os.symlink("etc/hello", bottom / "sym")
    os.mkfifo(bottom / "fifo", 0o640)
    (top / "etc").mkdir(parents=True)
    os.mknod(top / "etc/old", 0o020000, 0)  # whiteout: character device 0/0
    (top / "hidden").mkdir()
    os.setxattr(top / "hidden", "trusted.overlay.opaque", b"y")
    (top / "top").write_bytes(FILES["top"])
    for p in (top, bottom):
        os.chmod(p, 0o755)
    return [top, bottom]


def unmount(mountpoint: Path, store: Path | None = None) -> None:
    if find_mount(mountpoint) is None:
        return
    if store is not None:
        proc = layerfs(store, "umount", str(mountpoint), check=False)
        if proc.returncode == 0:
            return
    proc = subprocess.run(["umount", str(mountpoint)], capture_output=True)
    if proc.returncode != 0:
        force_unmount(mountpoint)


@contextmanager
def image_mount(store: Path, mountpoint: Path, upper: Path) -> Iterator[Mount]:
    mountpoint.mkdir(exist_ok=True)
    layerfs(store, "mount", IMAGE, str(mountpoint), "--upper", str(upper))
    try:
        yield Mount(mountpoint, upper / "upper", "image")
    finally:
        unmount(mountpoint, store)


@contextmanager
def overlay_mount(
    store: Path, lowers: list[Path], upper: Path, work: Path, mountpoint: Path
) -> Iterator[Mount]:
    for p in (mountpoint, upper, work):
        p.mkdir(exist_ok=True)
    layerfs(
        store,
        "mount",
        "--lowerdir",
        ":".join(map(str, lowers)),
        "--upperdir",
        str(upper),
        "--workdir",
        str(work),
        str(mountpoint),
    )
    try:
        yield Mount(mountpoint, upper, "overlay")
    finally:
        unmount(mountpoint, store)


def fuse_store(tmp_path_factory) -> Path:
    """A store holding IMAGE for a test module; skips without /dev/fuse or root."""
    import pytest

    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    return make_store(tmp_path_factory.mktemp("lfsrw-store"))


@contextmanager
def mounted_as(mode: str, store: Path) -> Iterator[Mount]:
    """The writable tree mounted as an image ("image") or overlay-style ("overlay")."""
    with public_dir("lfsrw-") as base:
        if mode == "image":
            with image_mount(store, base / "m", base / "changes") as mnt:
                yield mnt
        else:
            lowers = make_lowers(base)
            with overlay_mount(store, lowers, base / "u", base / "w", base / "m") as mnt:
                yield mnt
