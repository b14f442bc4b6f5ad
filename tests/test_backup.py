"""Backups of real directory trees: round trip of every attribute, incremental, dedup, restore."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from layerfs.records import get_tree
from layerfs.store.location import open_store
from tests.support.backuptree import allocated_bytes, describe, make_tree, volplugin
from tests.support.blobs import corrupt_blob
from volplugin.backup import service
from volplugin.backup.errors import BackupError, RestoreError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, devices)")


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    root = tmp_path / "vol"
    make_tree(root)
    return root


def _backup(store_dir: Path, name: str, path: Path, *extra: str) -> dict:
    out = volplugin("backup", name, "--path", str(path), "--json", *extra, store=store_dir)
    return json.loads(out.stdout)


def test_round_trip_keeps_every_attribute(store_dir: Path, volume: Path, tmp_path: Path) -> None:
    record = _backup(store_dir, "bk-vol", volume, "--tag", "first")
    assert record["files"] == 7  # hardlinks count once
    target = tmp_path / "restored"
    out = volplugin("restore", record["id"], "--to-dir", str(target), store=store_dir)
    assert record["id"] in out.stdout
    assert describe(target) == describe(volume)
    assert allocated_bytes(target / "sparse.img") < 4 << 20  # holes stay holes
    assert os.stat(target / "hard-to-big").st_ino == os.stat(target / "data" / "big.bin").st_ino
    listing = json.loads(volplugin("backups", "bk-vol", "--json", store=store_dir).stdout)
    assert listing == [
        {
            "id": record["id"],
            "time": listing[0]["time"],
            "volume": "bk-vol",
            "host": record["host"],
            "files": 7,
            "size": record["size"],
            "new_bytes": record["bytes_new"],
            "tags": ["first"],
            "skipped": 0,
        }
    ]


def test_incremental_reads_only_changed_files(store_dir: Path, tmp_path: Path) -> None:
    vol = tmp_path / "many"
    vol.mkdir()
    for i in range(100):
        (vol / f"f{i:03}").write_bytes(os.urandom(100_000))
    first = _backup(store_dir, "bk-inc", vol)
    assert first["files_read"] == 100 and first["bytes_read"] == 100 * 100_000
    again = _backup(store_dir, "bk-inc", vol)
    assert again["bytes_read"] == 0 and again["bytes_new"] == 0
    assert again["parent"] == first["id"]
    # change 1% of the files; one of them keeps its size and mtime (only ctime tells)
    changed = vol / "f007"
    st = changed.stat()
    with open(changed, "r+b") as f:
        f.seek(50_000)
        f.write(b"X" * 100)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = _backup(store_dir, "bk-inc", vol)
    assert third["files_read"] == 1
    assert third["bytes_read"] == 100_000
    assert 0 < third["bytes_new"] <= 100_000
    target = tmp_path / "out"
    service.restore_backup(open_store(str(store_dir)), third["id"], target)
    assert (target / "f007").read_bytes() == changed.read_bytes()


def test_dedup_across_volumes(store_dir: Path, volume: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["cp", "-a", str(volume), str(other)], check=True)
    first = _backup(store_dir, "bk-a", volume)
    second = _backup(store_dir, "bk-b", other)
    assert first["bytes_new"] > 3 << 20
    assert second["bytes_read"] == first["bytes_read"]  # a different volume: no parent
    assert second["bytes_new"] == 0


def test_dedup_with_image_layers(store_dir: Path, tmp_path: Path, busybox_image: str) -> None:
    importer = pytest.importorskip("layerfs.importer")
    store = open_store(str(store_dir))
    importer.import_from_docker(store, busybox_image)
    vol = tmp_path / "tools"
    vol.mkdir()
    shutil.copy("/bin/busybox", vol / "busybox")
    record = service.create_backup(store, "bk-tools", vol)
    size = os.path.getsize("/bin/busybox")
    assert record.bytes_read == size
    assert record.bytes_new < size // 10


def test_partial_restore(store_dir: Path, volume: Path, tmp_path: Path) -> None:
    record = _backup(store_dir, "bk-part", volume)
    target = tmp_path / "part"
    volplugin("restore", record["id"], "--to-dir", str(target), "--path", "data", store=store_dir)
    restored = describe(target)
    original = describe(volume)
    assert set(restored) == {b".", b"data"} | {p for p in original if p.startswith(b"data/")}
    for path in restored:
        if path != b".":  # hardlink groups differ: big.bin's partner is outside "data"
            assert restored[path][:9] == original[path][:9], path
    # a single file whose hardlink partner lies outside the selection
    only = tmp_path / "only"
    service.restore_backup(open_store(str(store_dir)), record["id"], only, subpath="hard-to-big")
    assert (only / "hard-to-big").read_bytes() == (volume / "data" / "big.bin").read_bytes()
    with pytest.raises(RestoreError, match="no path"):
        service.restore_backup(
            open_store(str(store_dir)), record["id"], tmp_path / "x", subpath="nope"
        )


def test_restore_refuses_non_empty_target(store_dir: Path, volume: Path, tmp_path: Path) -> None:
    record = _backup(store_dir, "bk-ne", volume)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep").write_text("x")
    proc = volplugin("restore", record["id"], "--to-dir", str(target), store=store_dir, check=False)
    assert proc.returncode != 0
    assert "not empty" in proc.stderr and "--force" in proc.stderr
    (target / "sym").write_text("a file where a symlink goes")
    volplugin("restore", record["id"], "--to-dir", str(target), "--force", store=store_dir)
    restored = describe(target)
    del restored[b"keep"]
    assert restored == describe(volume)


def test_diff(store_dir: Path, volume: Path) -> None:
    a = _backup(store_dir, "bk-diff", volume)
    (volume / "data" / "small.txt").write_text("changed\n")
    (volume / "fifo").unlink()
    (volume / "new-file").write_text("new\n")
    os.chmod(volume / "suid", 0o755)
    b = _backup(store_dir, "bk-diff", volume)
    out = volplugin("diff", a["id"], b["id"], store=store_dir).stdout.splitlines()
    assert "- fifo" in out and "+ new-file" in out
    assert any(line.startswith("M data/small.txt") and "content" in line for line in out)
    changes = json.loads(volplugin("diff", a["id"][:8], b["id"], "--json", store=store_dir).stdout)
    by_path = {c["path"]: c for c in changes}
    assert by_path["suid"] == {"change": "M", "path": "suid", "what": ["mode"]}
    assert set(by_path) == {"data/small.txt", "data/small-link", "fifo", "new-file", "suid"}


def test_damaged_chunk_fails_restore_naming_the_file(
    store_dir: Path, volume: Path, tmp_path: Path
) -> None:
    record = _backup(store_dir, "bk-dmg", volume)
    store = open_store(str(store_dir))
    entries, _ = get_tree(store, record["tree"])
    big = next(e for e in entries if e.path == "data/big.bin")
    corrupt_blob(store.backend, big.chunks[3].digest)
    target = tmp_path / "out"
    proc = volplugin("restore", record["id"], "--to-dir", str(target), store=store_dir, check=False)
    assert proc.returncode == 1
    assert "data/big.bin" in proc.stderr and "hard-to-big" in proc.stderr
    assert not (target / "data" / "big.bin").exists()
    assert not (target / "hard-to-big").exists()
    assert [p.name for p in target.rglob(".bk-restore-*")] == []
    assert (target / "data" / "text.log").read_bytes() == (
        volume / "data" / "text.log"
    ).read_bytes()


def test_full_disk_fails_cleanly(store_dir: Path, tmp_path: Path) -> None:
    vol = tmp_path / "v"
    vol.mkdir()
    (vol / "a").write_bytes(os.urandom(1 << 20))
    (vol / "b").write_bytes(os.urandom(6 << 20))
    record = service.create_backup(open_store(str(store_dir)), "bk-full", vol)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "bk-tmpfs", str(small)], check=True)
    try:
        proc = volplugin(
            "restore", record.id, "--to-dir", str(small / "t"), store=store_dir, check=False
        )
        assert proc.returncode == 1
        assert "no space left" in proc.stderr and "while restoring b:" in proc.stderr
        assert sorted(p.name for p in (small / "t").iterdir()) == ["a"]
        assert (small / "t" / "a").read_bytes() == (vol / "a").read_bytes()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_kill_during_backup_then_verify_and_next_backup(store_dir: Path, tmp_path: Path) -> None:
    vol = tmp_path / "large"
    vol.mkdir()
    (vol / "first").write_text("first\n")
    first = service.create_backup(open_store(str(store_dir)), "bk-kill", vol)
    for i in range(40):
        (vol / f"blob{i:02}").write_bytes(os.urandom(8 << 20))
    env = dict(os.environ, LAYERFS_STORE=str(store_dir))
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "volplugin"), "backup", "bk-kill", "--path", str(vol)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    packs_dir = store_dir / "packs"
    before = sum(len(files) for _, _, files in os.walk(packs_dir))

    def written() -> int:  # packs the running backup has written so far
        return sum(len(files) for _, _, files in os.walk(packs_dir)) - before

    while proc.poll() is None and written() < 3:
        time.sleep(0.002)
    proc.kill()
    assert proc.wait() == -9, "the backup finished before it could be killed"
    assert written()  # a killed writer's leftovers
    store = open_store(str(store_dir))
    assert [r.id for r in service.list_backups(store.backend, "bk-kill")] == [first.id]
    volplugin("verify", "--read-data", store=store_dir)
    second = service.create_backup(store, "bk-kill", vol)
    assert second.parent == first.id
    target = tmp_path / "out"
    service.restore_backup(store, second.id, target)
    assert (target / "blob17").read_bytes() == (vol / "blob17").read_bytes()


def test_volume_resolved_through_plugin_state(store_dir: Path, tmp_path: Path) -> None:
    volumes = pytest.importorskip("volplugin.volumes.service")
    root = tmp_path / "plugin"
    svc = volumes.VolumeService.open(root, "bk-driver")
    svc.create("bk-named", {})
    (svc.path_of("bk-named") / "file").write_text("in a volume\n")
    where = ["--root", str(root), "--name", "bk-driver"]
    out = volplugin(*where, "backup", "bk-named", "--json", store=store_dir)
    record = json.loads(out.stdout)
    assert record["volume"] == "bk-named" and record["files"] == 1
    assert svc.state.get("bk-named").backup.last_id == record["id"]
    volplugin(*where, "restore", record["id"], "--to", "bk-copy", store=store_dir)
    assert (svc.path_of("bk-copy") / "file").read_text() == "in a volume\n"
    proc = volplugin(*where, "backup", "bk-missing", store=store_dir, check=False)
    assert proc.returncode == 1 and "bk-missing" in proc.stderr


def test_unknown_backup_is_one_line_error(store_dir: Path) -> None:
    proc = volplugin("restore", "feedbeef", "--to-dir", "/tmp/x", store=store_dir, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "volplugin backups" in proc.stderr
    with pytest.raises(BackupError):
        service.diff_backups(open_store(str(store_dir)), "aaaa", "bbbb")


def test_restore_streams_the_tree_in_batches(store_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A restore reads the tree node by node and works BATCH entries at a time: with tiny
    batches, hard links into earlier batches, directory attributes and a subpath still
    come back exactly."""
    from volplugin.backup import restore

    vol = tmp_path / "vol"
    make_tree(vol)
    store = open_store(str(store_dir))
    record = service.create_backup(store, "bk-batches", vol)
    monkeypatch.setattr(restore, "BATCH", 2)
    service.restore_backup(store, record.id, tmp_path / "all")
    assert describe(tmp_path / "all") == describe(vol)
    service.restore_backup(store, record.id, tmp_path / "part", subpath="data")
    assert sorted(os.listdir(tmp_path / "part")) == ["data"]
    part, whole = describe(tmp_path / "part" / "data"), describe(vol / "data")
    # big.bin's other name lies outside the subpath: the same file, now with one name
    assert part.pop(b"big.bin")[:-1] == whole.pop(b"big.bin")[:-1]
    assert part == whole


def test_restore_syncs_as_it_writes_and_once_after(
    store_dir: Path, volume: Path, tmp_path: Path, monkeypatch
) -> None:
    """The kernel writes a restore back while it runs (syncfs on a thread), and one more
    syncfs, after the last entry, makes the rest durable before the restore returns."""
    from volplugin.backup import restore

    calls: list[tuple[int, bool]] = []  # (entries restored so far, on the restore's thread)
    done = [0]
    real = restore.syncfs

    def counted(fd: int) -> None:
        calls.append((done[0], threading.current_thread() is threading.main_thread()))
        real(fd)

    def slowly(files: int, size: int) -> None:
        done[0] += 1
        time.sleep(0.02)

    monkeypatch.setattr(restore, "syncfs", counted)
    monkeypatch.setattr(restore, "WRITEBACK_EVERY", 0.01)
    store = open_store(str(store_dir))
    record = service.create_backup(store, "bk-sync", volume)
    target = tmp_path / "restored"
    with service.open_restore(store, record.id) as plan:
        plan.run(target, progress=slowly)
    assert describe(target) == describe(volume)
    during = [n for n, main in calls if not main]
    assert len(during) >= 3 and min(during) < done[0]  # while entries were still coming
    assert calls[-1] == (done[0], True)  # the last one after every entry, before returning


def test_restore_fails_when_writing_back_fails(
    store_dir: Path, volume: Path, tmp_path: Path, monkeypatch
) -> None:
    """A writeback error (EIO from syncfs) fails the restore with one line naming the
    target; a restore that fails by itself is not synced afterwards."""
    from volplugin.backup import restore

    store = open_store(str(store_dir))
    record = service.create_backup(store, "bk-eio", volume)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(restore, "syncfs", eio)
    target = tmp_path / "restored"
    with pytest.raises(RestoreError, match=f"to the disk of {target} failed: .*Input/output"):
        service.restore_backup(store, record.id, target)

    calls: list[int] = []
    monkeypatch.setattr(restore, "syncfs", calls.append)
    with pytest.raises(ValueError), restore.synced(tmp_path / "other"):
        raise ValueError("the restore itself failed")
    assert calls == []
