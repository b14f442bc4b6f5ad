"""Lazy volumes on a local store with the real mount (kernel overlay over a FUSE view):
confinement, durability, pins, resuming.

The merge never follows a symlink the container made or the backup holds; the fill
trusts after a host restart only what it synced and recorded, adopts after a plugin
restart what it placed, and clears leftovers; a lazy volume pins its backup's tree
until its switch is over (or it is removed); a switch interrupted after the merge is
finished at the next start.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from layerfs.maintenance.pins import list_pins, pin, unpin
from layerfs.records import Kind, get_tree, iter_tree
from layerfs.store.location import open_store
from tests.support.backuptree import backed_up, describe, visible_links
from tests.support.waiting import wait_for
from volplugin.lazy.fill import Filler, MemoryJournal, boot_id
from volplugin.lazy.merge import merge_upper
from volplugin.lazy.mount import LazyDirs, LegacyLayout, is_mounted, mount, prepare, release
from volplugin.lazy.state import LazyState
from volplugin.lazy.volumes import LazyVolumes
from volplugin.volumes.service import VolumeService

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, devices, FUSE)")


@pytest.fixture
def backup(tmp_path: Path):
    """A backup of a tree with every kind of entry, in a local store: (URL, record, dir)."""
    return backed_up(tmp_path, "lazy-safety")


def _entries(url: str, record):
    return get_tree(open_store(url), record.tree)[0]


def _pins(url: str) -> list:
    return list_pins(open_store(url).backend)


# -- the merge ---------------------------------------------------------------------------


def test_the_merge_never_follows_a_symlink(backup, tmp_path: Path) -> None:
    """Symlinks made through the mount, or held by the filled tree, are entries, not ways out."""
    url, record, _volume = backup
    dirs = LazyDirs(tmp_path / "lazy")
    prepare(open_store(url), dirs, record.tree)
    host = tmp_path / "host"
    host.mkdir()
    (host / "keep").write_text("host file\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount(url, dirs, mnt, "lazy-safety", record.tree)
    try:
        # the container swaps a directory of the backup for a symlink to a host directory
        # and makes a directory where the backup has a symlink
        os.rename(mnt / "data", mnt / "data-old")
        os.symlink(str(host), mnt / "data")
        os.chmod(mnt / "data-old/big.bin", 0o600)  # its bytes are read from the old path
        os.unlink(mnt / "sym")
        os.mkdir(mnt / "sym")
        (mnt / "sym" / "inside").write_text("in a directory\n")
        seen = describe(mnt)
    finally:
        assert release(mnt)
    assert Filler(open_store(url), record.tree, dirs.fill).run()
    # the filled tree holds a symlink to the host where the upper has a directory
    os.unlink(dirs.fill / "sym")
    os.symlink(str(host), dirs.fill / "sym")
    merge_upper(dirs.upper, dirs.fill, dirs.stage)
    merge_upper(dirs.upper, dirs.fill, dirs.stage)  # once more: the placed symlink stays one
    assert sorted(p.name for p in host.iterdir()) == ["keep"]
    assert (host / "keep").read_text() == "host file\n"
    assert os.readlink(dirs.fill / "data") == str(host)
    assert (dirs.fill / "sym").is_dir() and not (dirs.fill / "sym").is_symlink()
    assert (dirs.fill / "sym" / "inside").read_text() == "in a directory\n"
    shutil.rmtree(dirs.stage)  # as the switch does, with the upper tree
    shutil.rmtree(dirs.upper)
    assert visible_links(describe(dirs.fill)) == visible_links(seen)


# -- the fill ----------------------------------------------------------------------------


def _stopped_fill(url: str, record, target: Path, journal: MemoryJournal) -> None:
    """A fill stopped after three entries (all recorded: the stop syncs and records)."""
    stop = threading.Event()

    def stop_after_three(progress) -> None:
        if progress.files_done >= 3:
            stop.set()

    filler = Filler(open_store(url), record.tree, target, stop=stop, journal=journal)
    filler.on_progress, filler.report_every = stop_after_three, 0
    assert filler.run() is False


def test_after_a_host_restart_the_fill_trusts_only_what_it_recorded(backup, tmp_path: Path) -> None:
    url, record, volume = backup
    target = tmp_path / "fill"
    journal = MemoryJournal()
    _stopped_fill(url, record, target, journal)
    recorded = sorted(journal.paths)
    assert recorded and journal.boot == boot_id()
    inodes = {p: os.lstat(target / p).st_ino for p in recorded}
    # a file placed but not recorded when the host died: the right size and mtime, but
    # its bytes never reached the disk
    big = next(
        e
        for e in reversed(_entries(url, record))
        if e.kind is Kind.FILE and e.size and e.path not in journal.paths
    )
    with open(target / big.path, "wb") as f:
        f.truncate(big.size)
    os.utime(target / big.path, ns=(big.mtime_ns, big.mtime_ns))
    (target / "data" / ".bk-restore-0123456789ab").write_bytes(b"temp of a killed run")

    journal.boot = "an-earlier-boot"
    assert Filler(open_store(url), record.tree, target, journal=journal).run()
    assert describe(target) == describe(volume)
    assert {p: os.lstat(target / p).st_ino for p in recorded} == inodes
    assert journal.boot == boot_id()


def test_after_a_plugin_restart_the_fill_adopts_what_it_placed(backup, tmp_path: Path) -> None:
    url, record, volume = backup
    target = tmp_path / "fill"
    journal = MemoryJournal()
    _stopped_fill(url, record, target, journal)
    placed = sorted(journal.paths)
    journal.paths.clear()  # killed before it recorded them; same boot
    inodes = {p: os.lstat(target / p).st_ino for p in placed}
    assert Filler(open_store(url), record.tree, target, journal=journal).run()
    assert describe(target) == describe(volume)
    assert {p: os.lstat(target / p).st_ino for p in placed} == inodes


def test_the_lazy_state_of_an_older_version_gains_its_new_columns(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with sqlite3.connect(db) as old:
        old.execute(
            "CREATE TABLE lazy_volumes (name TEXT PRIMARY KEY, backup TEXT NOT NULL, "
            "tree TEXT NOT NULL, phase TEXT NOT NULL, files_done INTEGER NOT NULL DEFAULT 0, "
            "files_total INTEGER NOT NULL DEFAULT 0, bytes_done INTEGER NOT NULL DEFAULT 0, "
            "bytes_total INTEGER NOT NULL DEFAULT 0, error TEXT, updated REAL NOT NULL)"
        )
        old.execute("INSERT INTO lazy_volumes VALUES ('v', 'b', 't', 'filling', 0,0,0,0,NULL,0)")
    state = LazyState(db)
    try:
        assert state.get("v").pin is None
        journal = state.journal("v")
        journal.record(["a", os.fsdecode(b"caf\xe9")], "boot-1")
        assert journal.done("a") and journal.done(os.fsdecode(b"caf\xe9"))
        assert not journal.done("b")
        assert journal.last_boot() == "boot-1"
        state.delete("v")
        assert not state.journal("v").done("a")
    finally:
        state.close()


# -- pins and the switch -----------------------------------------------------------------


def test_a_lazy_volume_pins_its_backup_until_the_switch(
    backup, tmp_path: Path, monkeypatch
) -> None:
    url, record, volume = backup
    root = tmp_path / "root"
    svc = VolumeService.open(root, "vp-lazy")
    worker = LazyVolumes.attach(svc, url, background=False)  # creates, never fills
    try:
        svc.create("v", {"from": record.id, "lazy": "true"})
        svc.create("w", {"from": record.id, "lazy": "true"})
        pins = _pins(url)
        assert sorted(p.holder for p in pins) == [
            f"lazy volume v from backup {record.id}",
            f"lazy volume w from backup {record.id}",
        ]
        assert {p.tree for p in pins} == {record.tree}
        assert worker.state.get("v").pin in {p.id for p in pins}
        svc.remove("w")  # a removed volume lets go of its pin
        assert [p.holder for p in _pins(url)] == [f"lazy volume v from backup {record.id}"]

        # fill here, then stop as a crash would after the merge began: phase switching
        lazy = worker.state.get("v")
        assert worker._fill(lazy, threading.Event())
        path = svc.path_of("v")
        assert release(path)
        worker.state.set_phase("v", "switching")
        dirs = worker.dirs("v")
    finally:
        worker.close()
        svc.state.close()
    assert not is_mounted(path)

    svc = VolumeService.open(root, "vp-lazy")  # the next start finishes the switch
    main = LazyVolumes.attach(svc, url)
    try:
        assert main.state.get("v").phase == "done"
        assert not dirs.base.exists()
        assert describe(path) == describe(volume)
        assert _pins(url) == []
        assert main.state.get("v").pin is None
        journal = main.state.journal("v")
        assert not any(journal.done(e.path) for e in iter_tree(open_store(url), record.tree))
        svc.remove("v")
    finally:
        main.close()
        svc.state.close()


def test_a_switch_done_before_its_unpin_unpins_at_start(backup, tmp_path: Path) -> None:
    url, record, _volume = backup
    root = tmp_path / "root"
    svc = VolumeService.open(root, "vp-lazy")
    main = LazyVolumes.attach(svc, url)
    try:
        svc.create("v", {"from": record.id, "lazy": "true"})
        wait_for(lambda: main.state.get("v").phase == "done", "the switch", 60)
        assert _pins(url) == []
    finally:
        main.close()
        svc.state.close()
    # as if the plugin stopped between the switch and the unpin
    held = pin(open_store(url).backend, record.tree, "lazy volume v")
    state = LazyState(root / "state.db")
    state.set_pin("v", held.id)
    state.close()
    svc = VolumeService.open(root, "vp-lazy")
    again = LazyVolumes.attach(svc, url)
    try:
        assert _pins(url) == []
        assert again.state.get("v").pin is None
    finally:
        again.close()
        svc.state.close()


def test_a_lazy_volume_of_a_version_without_pins_is_pinned_at_start(
    backup, tmp_path: Path, monkeypatch
) -> None:
    url, record, _volume = backup
    root = tmp_path / "root"
    svc = VolumeService.open(root, "vp-lazy")
    worker = LazyVolumes.attach(svc, url, background=False)
    try:
        svc.create("v", {"from": record.id, "lazy": "true"})
        unpin(open_store(url).backend, worker.state.get("v").pin)
        worker.state.set_pin("v", None)
    finally:
        worker.close()
        svc.state.close()
    assert _pins(url) == []
    monkeypatch.setenv("VOLPLUGIN_LAZY_FILL_RATE", "1K")  # the fill stays running
    svc = VolumeService.open(root, "vp-lazy")
    main = LazyVolumes.attach(svc, url)
    try:
        assert [p.holder for p in _pins(url)] == [f"lazy volume v from backup {record.id}"]
        assert main.state.get("v").pin == _pins(url)[0].id
        svc.remove("v")
        assert _pins(url) == []
    finally:
        main.close()
        svc.state.close()
        release(root / "volumes" / "v")


def test_a_lazy_volume_of_the_retired_fuse_engine_is_refused_and_left_as_it_is(
    backup, tmp_path: Path
) -> None:
    """A volume made by a version whose mount was the FUSE engine (no layerfs.json, an
    upper tree in that engine's format): neither mounted nor switched, with an error
    saying why; its parts stay until the volume is removed."""
    url, record, _volume = backup
    root = tmp_path / "root"
    svc = VolumeService.open(root, "vp-lazy")
    worker = LazyVolumes.attach(svc, url, background=False)
    try:
        svc.create("v", {"from": record.id, "lazy": "true"})
        path = svc.path_of("v")
        assert release(path)
        dirs = worker.dirs("v")
        dirs.meta.unlink()  # the earlier layout: index.sqlite, upper/, work/, fill/
        (dirs.base / "index.sqlite").write_bytes(b"")
        (dirs.upper / "changed").write_text("made through the old mount\n")
        worker.state.set_phase("v", "filled")
    finally:
        worker.close()
        svc.state.close()
    svc = VolumeService.open(root, "vp-lazy")
    main = LazyVolumes.attach(svc, url)
    try:
        lazy = main.state.get("v")
        assert lazy.phase == "filled"
        assert "made by an earlier volplugin" in lazy.error
        assert "retired FUSE mount engine" in lazy.error
        assert not is_mounted(path)
        with svc.lock:
            assert main._switch_locked("v")  # refused, nothing left to try
        assert main.state.get("v").phase == "filled"
        assert (dirs.upper / "changed").read_text() == "made through the old mount\n"
        with pytest.raises(LegacyLayout, match="can neither mount nor merge"):
            mount(url, dirs, path, "v", record.tree)
        svc.remove("v")
        assert not dirs.base.exists()
        assert _pins(url) == []
    finally:
        main.close()
        svc.state.close()
