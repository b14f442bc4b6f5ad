"""Crafted backups in a real local store are refused by `volplugin restore`, naming the path.

The tree records are written straight into the store (bypassing the encoder's
checks) with a backup document naming them, as a bucket writer could. A restore
must stop before writing anything: the target's parent directory and the place
each crafted path points at stay as they were.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from layerfs.maintenance.pins import list_pins
from layerfs.records import encode_tree_docs
from layerfs.store.location import open_store
from tests.support.backuptree import describe, volplugin
from tests.support.plugin import VOLPLUGIN
from tests.support.waiting import wait_for
from volplugin.backup.docs import BackupRecord, put_backup
from volplugin.backup.restore import STAGING_PREFIX

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="restores keep owners (root)")

ROOT = {"p": "", "k": "d", "m": 0o755}


def crafted_file(path: str) -> dict:
    data = b"written by a crafted backup\n"
    return {"p": path, "k": "f", "m": 0o4755, "s": len(data), "i": base64.b64encode(data).decode()}


def put_crafted(store_dir: Path, docs: list[dict]) -> str:
    """Store a tree record of ``docs`` as it is, and a backup naming it; return its id."""
    store = open_store(str(store_dir))
    try:
        tree = store.put_record(encode_tree_docs(docs, {"type": "backup", "volume": "crafted"}))
        store.flush()
        record = BackupRecord(
            id=secrets.token_hex(16),
            volume="crafted",
            host="elsewhere",
            time=time.time(),
            tree=tree,
        )
        put_backup(store.backend, record)
    finally:
        store.backend.close()
    return record.id


def listing(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its type, mode, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def crafted_cases(outside: Path) -> dict[str, tuple[list[dict], str, str]]:
    """name: (entries, the bad path, a word the error must contain)."""
    long_name = "n" * 256
    return {
        "absolute": ([ROOT, crafted_file(f"{outside}/abs")], f"{outside}/abs", "absolute"),
        "dotdot": ([ROOT, crafted_file("../../outside/up")], "../../outside/up", ".."),
        "under-symlink": (
            [ROOT, {"p": "link", "k": "l", "l": str(outside)}, crafted_file("link/evil")],
            "link/evil",
            "not a directory",
        ),
        "long-name": ([ROOT, crafted_file(long_name)], long_name, "255"),
        "nul": ([ROOT, crafted_file("a\0b")], "a\0b", "NUL"),
        "dotdot-hardlink": (
            [ROOT, {"p": "h", "k": "h", "l": "../../outside/x"}],
            "../../outside/x",
            "..",
        ),
    }


@pytest.mark.parametrize(
    "case", ["absolute", "dotdot", "under-symlink", "long-name", "nul", "dotdot-hardlink"]
)
def test_crafted_backup_is_refused_naming_the_path(tmp_path: Path, case: str) -> None:
    store_dir = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "existing").write_text("kept\n")
    docs, bad, word = crafted_cases(outside)[case]
    backup_id = put_crafted(store_dir, docs)
    before = listing(tmp_path / "parent"), listing(outside)

    for target in (parent / "target", parent):  # new directory; existing one with --force
        proc = volplugin(
            "restore", backup_id, "--to-dir", str(target), "--force", store=store_dir, check=False
        )
        assert proc.returncode != 0, proc.stdout
        assert backup_id in proc.stderr, proc.stderr
        assert repr(bad) in proc.stderr, proc.stderr
        assert word in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert (listing(tmp_path / "parent"), listing(outside)) == before


def test_restore_leaves_no_staging_and_refuses_a_symlinked_target(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    docs = [ROOT, {"p": "d", "k": "d", "m": 0o700}, crafted_file("d/f")]
    backup_id = put_crafted(store_dir, docs)
    target = tmp_path / "target"
    volplugin("restore", backup_id, "--to-dir", str(target), store=store_dir)
    assert sorted(os.listdir(target)) == ["d"]
    assert (target / "d" / "f").read_bytes() == b"written by a crafted backup\n"
    assert os.stat(target / "d" / "f").st_mode & 0o7777 == 0o4755

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    proc = volplugin(
        "restore", backup_id, "--to-dir", str(link), "--force", store=store_dir, check=False
    )
    assert proc.returncode != 0 and "not a directory" in proc.stderr, proc.stderr
    assert os.listdir(elsewhere) == []


def _megabyte_files(src: Path) -> Path:
    """80 random files of 1 MiB in 8 directories: a restore of a few seconds' work."""
    for i in range(8):
        (src / f"d{i}").mkdir(parents=True)
        for j in range(10):
            (src / f"d{i}" / f"f{j}").write_bytes(os.urandom(1 << 20))
    return src


def test_a_prune_during_a_restore_keeps_the_data_it_reads(tmp_path: Path) -> None:
    """The restore is stopped (SIGSTOP) at its start while a prune forgets its backup."""
    store_dir = tmp_path / "store"
    src = _megabyte_files(tmp_path / "src")
    old = json.loads(volplugin("backup", "v", "--path", str(src), "--json", store=store_dir).stdout)
    empty = tmp_path / "empty"
    empty.mkdir()
    volplugin("backup", "v", "--path", str(empty), store=store_dir)
    target = tmp_path / "target"
    env = dict(os.environ, LAYERFS_STORE=str(store_dir))
    restoring = subprocess.Popen(
        [VOLPLUGIN, "restore", old["id"], "--to-dir", str(target)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                target.exists() and any(n.startswith(STAGING_PREFIX) for n in os.listdir(target))
            ),
            "the restore to start",
            interval=0.001,
            guard=lambda: restoring.poll() is None,
        )
        restoring.send_signal(signal.SIGSTOP)
        pruned = volplugin("prune", "--keep-last", "1", "--grace", "0", "--json", store=store_dir)
        assert [b["id"] for b in json.loads(pruned.stdout)["remove"]] == [old["id"]]
    finally:
        restoring.send_signal(signal.SIGCONT)
    out, err = restoring.communicate(timeout=300)
    assert restoring.returncode == 0, err
    for i in range(8):
        for j in range(10):
            got = (target / f"d{i}" / f"f{j}").read_bytes()
            assert got == (src / f"d{i}" / f"f{j}").read_bytes()
    store = open_store(str(store_dir))
    try:
        assert list_pins(store.backend) == []  # released when the restore ended
    finally:
        store.backend.close()


def test_crafted_backup_into_a_new_volume_creates_no_volume(tmp_path: Path) -> None:
    """`volplugin restore --to NEWVOL` checks the tree before it creates the volume."""
    store_dir = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    docs, bad, _word = crafted_cases(outside)["dotdot"]
    backup_id = put_crafted(store_dir, docs)
    root = tmp_path / "plugin"
    proc = volplugin(
        "--root", str(root), "restore", backup_id, "--to", "newvol", store=store_dir, check=False
    )
    assert proc.returncode != 0 and repr(bad) in proc.stderr, proc.stderr
    listed = volplugin("--root", str(root), "ls", "--json", store=store_dir, check=False)
    assert "newvol" not in listed.stdout, listed.stdout
    assert not (root / "volumes" / "newvol").exists()


def test_a_restore_into_a_new_volume_killed_midway_leaves_no_volume(tmp_path: Path) -> None:
    """The new volume exists only once its restore is complete; the kill leaves trash."""
    from volplugin.volumes.service import VolumeService

    store_dir = tmp_path / "store"
    src = _megabyte_files(tmp_path / "src")
    backup = json.loads(
        volplugin("backup", "v", "--path", str(src), "--json", store=store_dir).stdout
    )
    root = tmp_path / "plugin"
    VolumeService.open(root, "volplugin").state.close()
    env = dict(os.environ, LAYERFS_STORE=str(store_dir))
    cmd = [VOLPLUGIN, "--root", str(root), "restore", backup["id"], "--to", "newvol"]
    restoring = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    trash = root / "trash"

    def some_files_written() -> bool:
        return any(
            name.startswith(STAGING_PREFIX) and os.listdir(os.path.join(top, name))
            for top, dirs, _files in os.walk(trash)
            for name in dirs
        )

    try:
        wait_for(
            some_files_written,
            "the restore to write its first files",
            interval=0.001,
            guard=lambda: restoring.poll() is None,
        )
    finally:
        restoring.kill()
        restoring.communicate(timeout=60)
    assert not (root / "volumes" / "newvol").exists()
    listed = volplugin("--root", str(root), "ls", "--json", store=store_dir)
    assert "newvol" not in listed.stdout
    service = VolumeService.open(root, "volplugin")
    service.empty_trash()  # what `volplugin serve` does at start
    service.state.close()
    assert os.listdir(trash) == []

    volplugin(*cmd[1:], store=store_dir)
    assert describe(root / "volumes" / "newvol") == describe(src)
