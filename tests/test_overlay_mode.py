"""Overlay-style mounts of plain dirs: whiteout conventions, mount(8) helper, kernel overlayfs."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.fs.mounting import find_mount
from tests.support.lfsmount import LAYERFS, force_unmount, public_dir
from tests.support.writable import make_lowers, overlay_mount

pytestmark = pytest.mark.fuse

HELPER = Path("/usr/sbin/mount.fuse.layerfs")


@pytest.fixture
def base():
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    with public_dir("lfsrw-") as path:
        yield path


@pytest.fixture
def store(base) -> Path:
    return base / "store"


def tree_of(root: Path) -> dict[str, tuple]:
    """Everything a user sees of a tree: type, mode, owner, size, content digest, link target."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, size, extra)
    return out


def test_whiteout_conventions_of_lower_dirs(base, store):
    """Plain directories are mounted with overlayfs: its whiteouts (devices 0/0) and opaque
    directories (xattr) count; OCI's ``.wh.*`` names are plain files there."""
    top, bottom = base / "a", base / "b"
    for rel in ("x", "y", "z", "d/old", "e/old", "keep"):
        (bottom / rel).parent.mkdir(parents=True, exist_ok=True)
        (bottom / rel).write_text(rel)
    top.mkdir()
    (top / ".wh.x").write_text("")  # whiteout file
    os.mknod(top / "y", stat.S_IFCHR, 0)  # whiteout device
    (top / "d").mkdir()
    (top / "d" / ".wh..wh..opq").write_text("")  # opaque marker file
    (top / "d" / "new").write_text("new")
    (top / "e").mkdir()
    os.setxattr(top / "e", "trusted.overlay.opaque", b"y")
    (top / "z").write_text("top z")
    mnt = base / "m"
    mnt.mkdir()
    ro = subprocess.run(
        [
            LAYERFS,
            "--store",
            str(store),
            "mount",
            "--lowerdir",
            f"{top}:{bottom}",
            str(mnt),
        ],
        capture_output=True,
        text=True,
    )
    assert ro.returncode == 0, ro.stderr
    try:
        assert sorted(os.listdir(mnt)) == [".wh.x", "d", "e", "keep", "x", "z"]
        assert sorted(os.listdir(mnt / "d")) == [".wh..wh..opq", "new", "old"]
        assert os.listdir(mnt / "e") == []
        assert (mnt / "z").read_text() == "top z"
        with pytest.raises(OSError):
            (mnt / "keep").write_text("no")  # no upperdir: read-only
        assert (find_mount(mnt).fstype, find_mount(mnt).source) == ("overlay", "layerfs")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        force_unmount(mnt)


def _kernel_overlay(lowers: list[Path], upper: Path, work: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work},metacopy=on"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)], check=True)


def test_upper_mounts_with_kernel_overlayfs_showing_the_same_tree(base, store):
    lowers = make_lowers(base)
    upper, work = base / "u", base / "w"
    with overlay_mount(store, lowers, upper, work, base / "m") as m:
        p = m.path
        (p / "etc" / "hello").write_bytes(b"rewritten")
        os.chmod(p / "big", 0o600)  # metacopy only
        os.unlink(p / "etc" / "motd")
        os.rename(p / "data" / "d1", p / "moved")  # lower directory rename
        os.mkdir(p / "hidden2")
        os.symlink("moved/a", p / "ln")
        os.link(p / "hl1", p / "hl3")
        os.rmdir(p / "hidden")
        os.mkdir(p / "hidden")  # recreated: opaque
        (p / "hidden" / "fresh").write_bytes(b"f")
        os.setxattr(p / "top", "user.k", b"v")
        ours = tree_of(p)
    k = base / "k"
    _kernel_overlay(lowers, upper, work, k)
    try:
        theirs = tree_of(k)
        assert os.getxattr(k / "top", "user.k") == b"v"
    finally:
        subprocess.run(["umount", str(k)], check=True)
    assert theirs == ours
    assert "moved/sub/b" in ours and "etc/motd" not in ours and "hidden/lower" not in ours


@pytest.fixture
def helper():
    created = False
    if not HELPER.exists():
        HELPER.symlink_to(Path(sys.executable).parent / "mount.fuse.layerfs")
        created = True
    yield HELPER
    if created:
        HELPER.unlink()


def test_mount_helper_through_mount_8(base, store, helper, monkeypatch):
    monkeypatch.setenv("LAYERFS_STORE", str(store))
    lowers = make_lowers(base)
    upper, work, mnt = base / "u", base / "w", base / "m"
    for d in (upper, work, mnt):
        d.mkdir()
    opts = f"lowerdir={lowers[0]}:{lowers[1]},upperdir={upper},workdir={work}"
    proc = subprocess.run(
        ["mount", "-t", "fuse.layerfs", "layerfs", str(mnt), "-o", opts],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        assert find_mount(mnt).fstype == "overlay"
        (mnt / "via-helper").write_bytes(b"h")
        assert (mnt / "top").read_bytes() == b"top layer\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert (upper / "via-helper").read_bytes() == b"h"
    ro = subprocess.run(
        ["mount", "-t", "fuse.layerfs", "layerfs", str(mnt), "-o", f"ro,lowerdir={lowers[0]}"],
        capture_output=True,
        text=True,
    )
    assert ro.returncode == 0, ro.stderr
    try:
        assert sorted(os.listdir(mnt)) == ["etc", "hidden", "top"]
        with pytest.raises(OSError):
            (mnt / "nope").write_bytes(b"")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    bad = subprocess.run(
        ["mount", "-t", "fuse.layerfs", "layerfs", str(mnt), "-o", f"lowerdir={base}/missing"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "missing" in bad.stderr
    assert find_mount(mnt) is None
