"""Lazy restore parts on a local store with the real mount (kernel overlay, FUSE image view):
fill, resume, merge, options."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from layerfs.fs.service import find_image_mount
from layerfs.store.location import open_store
from layerfs.union.vocab import XATTR_REDIRECT
from tests.support.backuptree import backed_up, describe, visible_links
from tests.support.waiting import wait_for
from volplugin.errors import BadOption
from volplugin.lazy.fill import Filler, MemoryJournal, parse_rate
from volplugin.lazy.merge import merge_upper
from volplugin.lazy.mount import LazyDirs, is_mounted, mount, prepare, release
from volplugin.lazy.volumes import LazyVolumes
from volplugin.volumes import options
from volplugin.volumes.service import VolumeService

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, devices, FUSE)")


@pytest.fixture
def backup(tmp_path: Path):
    """A backup of a tree with every kind of entry, in a local store: (URL, record, dir)."""
    return backed_up(tmp_path, "lazy-unit")


def test_the_fill_holds_the_directories_not_the_entries(tmp_path: Path) -> None:
    """A fill reads the tree one node at a time: while it fills, the entries alive are
    the directories and the current node's, not the whole list."""
    import gc

    from layerfs.records import Entry
    from volplugin.backup import service

    vol = tmp_path / "vol"
    for d in range(30):
        for f in range(30):
            path = vol / f"d{d:02}" / f"f{f:02}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{d} {f}\n")
    store = open_store(str(tmp_path / "s"))
    record = service.create_backup(store, "v", vol)
    filler = Filler(store, record.tree, tmp_path / "fill")
    alive: list[int] = []
    calls = 0
    real_fill = filler._fill

    def counting(entry):  # noqa: ANN001, ANN202 - wraps Filler._fill
        nonlocal calls
        calls += 1
        if calls % 29 == 0:
            alive.append(sum(isinstance(o, Entry) for o in gc.get_objects()))
        return real_fill(entry)

    filler._fill = counting  # type: ignore[method-assign]
    gc.collect()
    before = sum(isinstance(o, Entry) for o in gc.get_objects())  # other tests' leftovers
    assert filler.run()
    assert calls == 900
    # the 31 directories and the one being filled; not 931
    assert max(alive) - before < 100, (before, alive)
    assert describe(tmp_path / "fill") == describe(vol)


def test_fill_stops_and_resumes_without_fetching_again(backup, tmp_path: Path) -> None:
    url, record, volume = backup
    target = tmp_path / "fill"
    stop = threading.Event()

    def stop_after_three(progress) -> None:
        if progress.files_done >= 3:
            stop.set()

    journal = MemoryJournal()
    first = Filler(open_store(url), record.tree, target, stop=stop, journal=journal)
    first.on_progress, first.report_every = stop_after_three, 0
    assert first.run() is False
    done_before = {p: os.lstat(p).st_ino for p in target.rglob("*") if p.is_file()}
    assert done_before, "the first run wrote nothing"
    assert journal.paths, "the first run recorded nothing"

    second = Filler(open_store(url), record.tree, target, journal=journal)
    assert second.run() is True
    assert second.progress.files_done == second.progress.files_total
    assert second.progress.bytes_done == second.progress.bytes_total == record.size
    assert describe(target) == describe(volume)
    # files of the first run were kept, not written again
    assert {p: os.lstat(p).st_ino for p in done_before} == done_before
    assert os.stat(target / "hard-to-big").st_ino == os.stat(target / "data/big.bin").st_ino


def test_merge_gives_the_tree_the_mount_showed(backup, tmp_path: Path) -> None:
    url, record, volume = backup
    dirs = LazyDirs(tmp_path / "lazy")
    prepare(open_store(url), dirs, record.tree)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount(url, dirs, mnt, "lazy-unit", record.tree)
    try:
        mounted = find_image_mount(mnt)
        assert mounted is not None and mounted.upper == dirs.upper
        assert json.loads(dirs.meta.read_text())["format"] == 2
        assert describe(mnt) == describe(volume)
        (mnt / "new.txt").write_text("written while lazy\n")
        with open(mnt / "data/big.bin", "r+b") as f:  # the kernel copies the bytes up
            f.seek(1 << 20)
            f.write(b"X" * 1000)
        with open(mnt / "data/text.log", "ab") as f:
            f.write(b"appended\n")
        os.unlink(mnt / "data/small.txt")
        os.rename(mnt / "shared", mnt / "shared2")  # a directory renamed
        os.rename(mnt / "suid", mnt / "data/suid-moved")  # a file moved: metacopy, redirect
        os.chmod(mnt / "tmp", 0o700)
        os.chmod(mnt / "sparse.img", 0o600)  # metadata only: a metacopy file
        os.truncate(mnt / "data/empty", 1 << 20)
        os.mkdir(mnt / "data/sub")
        (mnt / "data/sub/f").write_bytes(b"f")
        seen = describe(mnt)
    finally:
        assert release(mnt)
    assert not is_mounted(mnt)
    assert os.getxattr(dirs.upper / "shared2", XATTR_REDIRECT) == b"shared"
    assert os.getxattr(dirs.upper / "data/suid-moved", XATTR_REDIRECT) == b"/suid"
    assert Filler(open_store(url), record.tree, dirs.fill).run()
    assert merge_upper(dirs.upper, dirs.fill, dirs.stage) > 0
    # redoing the merge (after a crash during the switch) gives the same tree
    merge_upper(dirs.upper, dirs.fill, dirs.stage)
    shutil.rmtree(dirs.base / "merge")  # as the switch does, with the upper tree
    shutil.rmtree(dirs.upper)
    assert visible_links(describe(dirs.fill)) == visible_links(seen)


def test_lazy_option_needs_from() -> None:
    assert options.normalize({"from": "abcd1234", "lazy": "yes"}) == {
        "from": "abcd1234",
        "lazy": "true",
    }
    with pytest.raises(BadOption, match="give 'from' too"):
        options.normalize({"lazy": "true"})
    with pytest.raises(BadOption, match="true or false"):
        options.normalize({"from": "abcd", "lazy": "maybe"})


def test_parse_rate() -> None:
    assert parse_rate("") == 0
    assert parse_rate("20M") == 20 << 20
    assert parse_rate("512k") == 512 << 10
    assert parse_rate("1000") == 1000
    with pytest.raises(ValueError, match="VOLPLUGIN_LAZY_FILL_RATE"):
        parse_rate("fast")


def test_a_lazy_volume_created_in_a_worker_is_filled_by_the_main_process(
    backup, tmp_path: Path
) -> None:
    """Worker processes of `volplugin serve` create lazy volumes; the main one fills them."""
    url, record, volume = backup
    root = tmp_path / "root"
    main_svc = VolumeService.open(root, "vp-lazy")
    worker_svc = VolumeService.open(root, "vp-lazy")
    main = LazyVolumes.attach(main_svc, url)  # background: resumes and watches
    worker = LazyVolumes.attach(worker_svc, url, background=False)
    try:
        worker_svc.create("v", {"from": record.id, "lazy": "true"})
        path = worker_svc.path_of("v")
        assert is_mounted(path)
        assert not worker._fills  # a worker never fills
        lazy = wait_for(
            lambda: (r := main.state.get("v")) is not None and r.phase == "done" and r,
            "the main process to fill and switch the volume",
            60,
        )
        assert lazy.phase == "done"
        assert not is_mounted(path)
        assert describe(path) == describe(volume)
        main_svc.remove("v")
    finally:
        for lazy_volumes in (worker, main):
            lazy_volumes.close()
        for svc in (worker_svc, main_svc):
            svc.state.close()
        release(root / "volumes" / "v")


def test_a_mount_whose_view_died_is_found_and_replaced(backup, tmp_path: Path) -> None:
    url, record, volume = backup
    dirs = LazyDirs(tmp_path / "lazy")
    prepare(open_store(url), dirs, record.tree)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount(url, dirs, mnt, "lazy-unit", record.tree)
    try:
        (mnt / "kept").write_text("written before the view died\n")
        first = find_image_mount(mnt)
        os.kill(first.view.pid, signal.SIGKILL)
        wait_for(lambda: not is_mounted(mnt), "the dead view to be noticed", 10)
        mount(url, dirs, mnt, "lazy-unit", record.tree)  # replaces the mount
        again = find_image_mount(mnt)
        assert is_mounted(mnt) and again.view.pid != first.view.pid
        assert (mnt / "kept").read_text() == "written before the view died\n"
        assert (mnt / "data/big.bin").read_bytes() == (volume / "data/big.bin").read_bytes()
    finally:
        assert release(mnt)
