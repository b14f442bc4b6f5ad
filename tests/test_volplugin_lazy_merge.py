"""The lazy merge of a kernel overlay upper tree, on changes made through the real mount.

A backup in a local store is mounted as a lazy volume (kernel overlay over its FUSE
image view), changed through the mount, filled and merged (volplugin.lazy.merge):
metacopy files (chmod only) take the filled bytes, reusing the filled file when the
backup gives it no other name; a merge killed with SIGKILL at any point, in its own
process, is redone to the same tree; a switch killed in its merge is finished by the
next start of the plugin's lazy volumes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from layerfs.store.location import open_store
from layerfs.union.upper import read_upper
from layerfs.union.vocab import XATTR_METACOPY
from tests.support.backuptree import backed_up, describe, visible_links
from volplugin.backup import service
from volplugin.lazy.fill import Filler
from volplugin.lazy.merge import MergeError, merge_upper
from volplugin.lazy.mount import LazyDirs, mount, prepare, release
from volplugin.lazy.volumes import LazyVolumes
from volplugin.volumes.service import VolumeService

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, devices, mounts)")

# Runs merge_upper(UPPER, TARGET, STAGE) and SIGKILLs itself right before its LIMIT-th
# call that changes a file system (LIMIT 0: never); prints how many such calls it made.
KILLER = r"""
import os, shutil, signal, sys
from pathlib import Path
from volplugin.lazy.merge import merge_upper

limit, count = int(sys.argv[4]), 0

def counted(call):
    def run(*args, **kwargs):
        global count
        count += 1
        if count == limit:
            os.kill(os.getpid(), signal.SIGKILL)
        return call(*args, **kwargs)
    return run

for name in ("link", "rename", "mkdir", "unlink", "rmdir", "setxattr", "removexattr",
             "utime", "fchmod", "fchown", "chown", "chmod", "copy_file_range", "pwrite",
             "ftruncate", "open"):
    setattr(os, name, counted(getattr(os, name)))
merge_upper(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
print(count)
"""


def _merge_in_process(dirs: LazyDirs, limit: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", KILLER, str(dirs.upper), str(dirs.fill), str(dirs.stage)]
    return subprocess.run([*cmd, str(limit)], capture_output=True, text=True, timeout=300)


def _change_everything(mnt: Path) -> None:
    """Changes of every kind the kernel records differently, made through the mount."""
    (mnt / "new.txt").write_text("written while lazy\n")
    os.rename(mnt / "data/text.log", mnt / "moved.log")  # a file renamed: metacopy, redirect
    os.rename(mnt / "shared", mnt / "shared2")  # a directory renamed in its parent
    os.mkdir(mnt / "made")
    os.rename(mnt / "data", mnt / "made/data")  # ... and one moved below a new directory
    os.chmod(mnt / "made/data/small.txt", 0o600)  # metacopy below a moved directory
    os.chmod(mnt / "sparse.img", 0o640)  # metacopy: the only name of its file
    os.chmod(mnt / "hard-to-big", 0o600)  # metacopy of a file with two names
    os.link(mnt / "sparse.img", mnt / "sparse-link")  # a new name of a metacopy file
    with open(mnt / "suid", "ab") as f:  # bytes copied up
        f.write(b"# more\n")
    os.unlink(mnt / "fifo")
    os.symlink("/nowhere", mnt / "tmp-was-here")
    shutil.rmtree(mnt / "tmp")
    os.mkdir(mnt / "tmp")  # opaque: removed and made again
    (mnt / "tmp/fresh").write_text("fresh\n")


@pytest.fixture
def changed(tmp_path: Path):
    """A backup, mounted lazily, changed, unmounted and filled: (dirs, what the mount showed)."""
    url, record, _volume = backed_up(tmp_path, "lazy-merge")
    dirs = LazyDirs(tmp_path / "lazy")
    prepare(open_store(url), dirs, record.tree)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount(url, dirs, mnt, "lazy-merge", record.tree)
    try:
        _change_everything(mnt)
        seen = describe(mnt)
    finally:
        assert release(mnt)
    assert Filler(open_store(url), record.tree, dirs.fill).run()
    return dirs, seen


def _merged(dirs: LazyDirs) -> dict:
    """The filled directory as the switch leaves it (without the stage and the upper)."""
    for part in (dirs.stage, dirs.upper):
        if part.exists():
            shutil.rmtree(part)
    return visible_links(describe(dirs.fill))


def _upper_listing(upper: Path) -> list[tuple]:
    return [(e.path, e.kind, e.lower, e.moved, e.opaque) for e in read_upper(upper)]


def _copy(src: Path, dst: Path) -> None:
    """cp -a: hard links, xattrs (trusted.* too, as root), devices and holes kept."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def test_a_merge_killed_at_any_point_is_redone_to_the_same_tree(changed, tmp_path: Path):
    dirs, seen = changed
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    _copy(dirs.fill, pristine / "fill")
    _copy(dirs.upper, pristine / "upper")
    upper_before = _upper_listing(dirs.upper)

    def fresh(n: int) -> LazyDirs:
        trial = LazyDirs(tmp_path / f"trial-{n}")
        trial.base.mkdir()
        _copy(pristine / "fill", trial.fill)
        _copy(pristine / "upper", trial.upper)
        return trial

    whole = _merge_in_process(fresh(0), 0)
    assert whole.returncode == 0, whole.stderr
    calls = int(whole.stdout)
    assert calls > 50
    assert _merged(LazyDirs(tmp_path / "trial-0")) == visible_links(seen)

    points = sorted({1, 2, 3, calls - 1, *range(5, calls, max(calls // 12, 1))})
    for n, limit in enumerate(points, start=1):
        trial = fresh(n)
        killed = _merge_in_process(trial, limit)
        assert killed.returncode == -signal.SIGKILL, (limit, killed.stderr)
        # the redo may be killed too; the next one still gives the same tree
        again = _merge_in_process(trial, limit // 2 + 1)
        assert again.returncode in (0, -signal.SIGKILL), (limit, again.stderr)
        merge_upper(trial.upper, trial.fill, trial.stage)
        assert _upper_listing(trial.upper) == upper_before, f"killed at call {limit}"
        assert _merged(trial) == visible_links(seen), f"killed at call {limit}"
        shutil.rmtree(trial.base)


def test_a_chmod_of_a_big_file_merges_without_copying_it(tmp_path: Path) -> None:
    """chmod through the mount copies only metadata up; the merge reuses the filled file
    (the backup gives it no other name) and copies only a file that has another name."""
    volume = tmp_path / "vol"
    volume.mkdir()
    big = os.urandom(40 << 20)
    (volume / "big").write_bytes(big)
    (volume / "pair-a").write_bytes(big[: 5 << 20])
    os.link(volume / "pair-a", volume / "pair-b")
    url = str(tmp_path / "store")
    record = service.create_backup(open_store(url), "big", volume)
    dirs = LazyDirs(tmp_path / "lazy")
    prepare(open_store(url), dirs, record.tree)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount(url, dirs, mnt, "big", record.tree)
    try:
        os.chmod(mnt / "big", 0o600)
        os.chown(mnt / "big", 1234, 5678)
        os.setxattr(mnt / "big", "user.note", b"changed")
        os.chmod(mnt / "pair-a", 0o600)
        seen = describe(mnt)
    finally:
        assert release(mnt)
    upper_big = dirs.upper / "big"
    assert os.getxattr(upper_big, XATTR_METACOPY) is not None
    assert os.stat(upper_big).st_blocks * 512 < 64 << 10  # no bytes copied up
    assert Filler(open_store(url), record.tree, dirs.fill).run()
    filled = {name: os.stat(dirs.fill / name).st_ino for name in ("big", "pair-a", "pair-b")}

    merge_upper(dirs.upper, dirs.fill, dirs.stage)
    st = os.stat(dirs.fill / "big")
    assert st.st_ino == filled["big"]  # reused, not copied
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 1234, 5678)
    assert os.getxattr(dirs.fill / "big", "user.note") == b"changed"
    assert hashlib.sha256((dirs.fill / "big").read_bytes()).digest() == hashlib.sha256(big).digest()
    # the other name of a file with two keeps its inode and attributes; the changed one
    # is a copy with the backup's bytes
    assert os.stat(dirs.fill / "pair-b").st_ino == filled["pair-b"]
    assert os.stat(dirs.fill / "pair-b").st_mode & 0o777 == 0o644
    assert os.stat(dirs.fill / "pair-a").st_ino != filled["pair-a"]
    assert (dirs.fill / "pair-a").read_bytes() == big[: 5 << 20]
    assert _merged(dirs) == visible_links(seen)


def test_a_filled_file_of_another_size_is_refused(changed) -> None:
    dirs, _seen = changed
    with open(dirs.fill / "data/small.txt", "r+b") as f:
        f.truncate(3)
    with pytest.raises(MergeError, match="the fill did not restore the backup exactly"):
        merge_upper(dirs.upper, dirs.fill, dirs.stage)
    assert not (dirs.stage / "ready").exists()


def test_a_switch_killed_in_its_merge_is_finished_at_the_next_start(tmp_path: Path) -> None:
    url, record, _volume = backed_up(tmp_path, "lazy-merge")
    root = tmp_path / "root"
    svc = VolumeService.open(root, "vp-lazy")
    worker = LazyVolumes.attach(svc, url, background=False)  # creates, never fills
    try:
        svc.create("v", {"from": record.id, "lazy": "true"})
        path = svc.path_of("v")
        _change_everything(path)
        seen = describe(path)
        assert worker._fill(worker.state.get("v"), threading.Event())
        # the switch as far as its merge, which is killed two thirds in (counted on a copy)
        assert release(path)
        worker.state.set_phase("v", "switching")
        dirs = worker.dirs("v")
        scratch = LazyDirs(tmp_path / "scratch")
        scratch.base.mkdir()
        _copy(dirs.fill, scratch.fill)
        _copy(dirs.upper, scratch.upper)
        calls = int(_merge_in_process(scratch, 0).stdout)
        killed = _merge_in_process(dirs, calls * 2 // 3)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert (dirs.stage / "ready").exists()  # killed while applying
    finally:
        worker.close()
        svc.state.close()

    svc = VolumeService.open(root, "vp-lazy")
    main = LazyVolumes.attach(svc, url)  # resumes: redoes the merge, finishes the switch
    try:
        assert main.state.get("v").phase == "done"
        assert not dirs.base.exists()
        assert visible_links(describe(path)) == visible_links(seen)
        svc.remove("v")
    finally:
        main.close()
        svc.state.close()
