"""Faults of writable mounts: a full upper disk, and an image view killed with SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from layerfs.fs.mounting import find_mount
from layerfs.fs.overlay import find_overlay
from layerfs.fs.views import ViewInfo, view_answers
from tests.support.lfsmount import force_unmount, layerfs, public_dir
from tests.support.writable import (
    BIG,
    FILES,
    IMAGE,
    fuse_store,
    image_mount,
)

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return fuse_store(tmp_path_factory)


@pytest.fixture
def small_disk():
    """A 2 MiB tmpfs for the upper directory."""
    with public_dir("lfsrw-") as base:
        disk = base / "disk"
        disk.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "lfsrw-tmpfs", str(disk)], check=True
        )
        try:
            yield base, disk
        finally:
            for mp in (base / "m", disk):
                if find_mount(mp) is not None:
                    subprocess.run(["umount", str(mp)], check=False)
                    force_unmount(mp)


def _fill(path: Path) -> OSError:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        block = b"\xff" * 65536
        for _ in range(1000):
            os.write(fd, block)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
    raise AssertionError("the 2 MiB upper never filled up")


def test_full_upper_gives_enospc_and_stays_consistent(store, small_disk):
    base, disk = small_disk
    middle = len(BIG) // 2  # BIG does not fit on the disk: copying it up fails
    with image_mount(store, base / "m", disk / "c") as m:
        assert _fill(m.path / "filler").errno == errno.ENOSPC
        with pytest.raises(OSError) as exc:
            fd = os.open(m.path / "big", os.O_WRONLY)
            try:
                os.pwrite(fd, b"!" * 70000, middle)  # needs chunks copied up: no room
            finally:
                os.close(fd)
        assert exc.value.errno == errno.ENOSPC
        assert (m.path / "big").read_bytes() == BIG  # still the lower bytes, not holes
        assert (m.path / "etc" / "hello").read_bytes() == FILES["etc/hello"]
        os.unlink(m.path / "filler")
        with open(m.path / "etc" / "hello", "r+b") as fh:
            fh.write(b"!")
    want = b"!" + FILES["etc/hello"][1:]
    with image_mount(store, base / "m", disk / "c") as m:
        assert (m.path / "etc" / "hello").read_bytes() == want
        assert (m.path / "big").read_bytes() == BIG
        assert not os.path.exists(m.path / "filler")
    assert os.listdir(disk / "c" / "work" / "work") == []


def test_sigkill_loses_nothing_fsynced_and_mount_recovers(store):
    with public_dir("lfsrw-") as base:
        mnt, changes = base / "m", base / "c"
        mnt.mkdir()
        layerfs(store, "mount", IMAGE, str(mnt), "--upper", str(changes))
        try:
            fd = os.open(mnt / "synced", os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, b"durable")
            os.fsync(fd)
            os.close(fd)
            fd = os.open(mnt / "big", os.O_WRONLY)
            os.pwrite(fd, b"KILLED", 1000)
            os.fsync(fd)
            os.close(fd)
            os.unlink(mnt / "etc" / "hello")
            view = ViewInfo.load(find_overlay(mnt).lowers[0])
            os.kill(view.pid, signal.SIGKILL)  # the mount's only process
            # metadata and cached contents are local files: the mount goes on, and a
            # content the cache lacked fails, never reads wrong
            for _ in range(200):
                if not view_answers(view.daemon):
                    break
                time.sleep(0.05)
            assert not view_answers(view.daemon)
            assert sorted(os.listdir(mnt / "data" / "d1")) == ["a", "sub"]
            # mounting again at the same place replaces the mount whose view died
            layerfs(store, "mount", IMAGE, str(mnt), "--upper", str(changes))
            assert (mnt / "synced").read_bytes() == b"durable"
            assert (mnt / "big").read_bytes() == BIG[:1000] + b"KILLED" + BIG[1006:]
            assert not (mnt / "etc" / "hello").exists()
            (mnt / "after").write_bytes(b"usable")
            assert (mnt / "after").read_bytes() == b"usable"
        finally:
            if find_mount(mnt) is not None:
                layerfs(store, "umount", str(mnt), check=False)
                force_unmount(mnt)
