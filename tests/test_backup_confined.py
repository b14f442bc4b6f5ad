"""Backups never follow a symlink a container plants in its volume.

Unit level: the scanner skips and reports a directory or file that is swapped
for a symlink (or for another directory) between its lstat and its open.
End to end: a busybox container swaps a directory of its volume for a symlink
to a host directory in a tight loop while the real plugin takes 20 backups; no
stored tree holds a host file's name or content.
"""

from __future__ import annotations

import logging
import os
import secrets
import uuid
from pathlib import Path

import pytest

from layerfs.records import Entry, Kind, get_tree
from layerfs.store.chunks import ChunkStore
from layerfs.store.location import open_store
from tests.support import ceph
from tests.support.dockerenv import BASE_IMAGE
from tests.support.plugin import PluginProcess, remove_driver_objects
from tests.support.waiting import wait_for
from volplugin.backup.docs import get_backup
from volplugin.backup.snapshot import ParentTree, Scanner

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

FILES = 200  # names the volume's directory and the host directory share


def _host_dir(path: Path, secret: bytes, files: int = FILES) -> str:
    """A host directory whose files all hold ``secret``; returns its only unshared name."""
    path.mkdir()
    for i in range(files):
        (path / f"n{i:03}").write_bytes(secret)
    only = f"only-on-host-{secrets.token_hex(6)}"
    (path / only).write_bytes(secret)
    return only


def _volume_dir(path: Path, files: int = FILES) -> None:
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"n{i:03}").write_bytes(b"innocent\n")


def _content(store: ChunkStore, entry: Entry) -> bytes:
    if entry.inline is not None:
        return entry.inline
    return b"".join(store.iter_content(entry.chunks))


def _leaks(store: ChunkStore, tree: str, secret: bytes, only: str) -> list[str]:
    """Paths of a stored tree that hold or name something of the host directory."""
    entries, _meta = get_tree(store, tree)
    found = []
    for entry in entries:
        named = only in entry.path or only in (entry.target or "")
        if named or (entry.kind is Kind.FILE and secret in _content(store, entry)):
            found.append(entry.path)
    return found


# -- unit level ---------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> ChunkStore:
    return open_store(str(tmp_path / "store"))


def _swap_before(monkeypatch: pytest.MonkeyPatch, method: str, rel: str, swap) -> None:  # noqa: ANN001
    """Run ``swap()`` right before Scanner.<method> handles ``rel`` (after its lstat)."""
    original = getattr(Scanner, method)

    def wrapped(self, dirfd, name, child, st, before):  # noqa: ANN001, ANN202
        if child == rel:
            swap()
        return original(self, dirfd, name, child, st, before)

    monkeypatch.setattr(Scanner, method, wrapped)


def test_directory_swapped_for_a_symlink_is_skipped_and_reported(
    tmp_path: Path, local: ChunkStore, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:  # noqa: ANN001
    secret = secrets.token_bytes(16).hex().encode()
    host = tmp_path / "host"
    only = _host_dir(host, secret)
    vol = tmp_path / "vol"
    _volume_dir(vol / "d")
    (vol / "keep").write_bytes(b"kept\n")

    def swap() -> None:
        os.rename(vol / "d", vol / "d.moved")
        os.symlink(host, vol / "d")

    _swap_before(monkeypatch, "_dir", "d", swap)
    with caplog.at_level(logging.WARNING, logger="volplugin.backup"):
        result = Scanner(local, vol, ParentTree()).scan()
    assert result.skipped == ["d"]
    assert "'d'" in caplog.text and "not followed" in caplog.text
    paths = {doc["p"] for doc in result.docs}
    assert "keep" in paths and not any(p == "d" or p.startswith("d/") for p in paths)
    for entry in result.entries:
        assert only not in entry.path
        if entry.kind is Kind.FILE:
            assert secret not in _content(local, entry)


def test_backup_record_names_skipped_paths(
    tmp_path: Path, local: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from volplugin.backup import service

    vol = tmp_path / "vol"
    _volume_dir(vol / "d")

    def swap() -> None:
        os.rename(vol / "d", vol / "d.moved")
        os.symlink(tmp_path, vol / "d")

    _swap_before(monkeypatch, "_dir", "d", swap)
    record = service.create_backup(local, "v", vol, host="h")
    assert record.skipped == ["d"]
    assert service.get_backup(local.backend, record.id).summary()["skipped"] == 1


def test_directory_swapped_for_another_directory_is_skipped(
    tmp_path: Path, local: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = tmp_path / "vol"
    _volume_dir(vol / "d")
    (vol / "other").mkdir()
    (vol / "other" / "x").write_bytes(b"x")

    def swap() -> None:
        os.rename(vol / "d", vol / "d.moved")
        os.rename(vol / "other", vol / "d")

    _swap_before(monkeypatch, "_dir", "d", swap)
    result = Scanner(local, vol, ParentTree()).scan()
    assert result.skipped == ["d"]
    assert not any(doc["p"].startswith("d/") for doc in result.docs)


def test_file_swapped_for_a_symlink_or_a_fifo_is_skipped(
    tmp_path: Path, local: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = b"host-only-" + secrets.token_hex(8).encode()
    host_file = tmp_path / "host-file"
    host_file.write_bytes(secret)
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "a").write_bytes(b"a" * 5000)
    (vol / "b").write_bytes(b"b")
    (vol / "c").write_bytes(b"c")

    swaps = {
        "a": lambda: (os.unlink(vol / "a"), os.symlink(host_file, vol / "a")),
        "b": lambda: (os.unlink(vol / "b"), os.mkfifo(vol / "b")),  # opening it would block
        "c": lambda: (os.unlink(vol / "c"), os.link(host_file, vol / "c")),  # another inode
    }
    original = Scanner._file

    def wrapped(self, dirfd, name, child, st):  # noqa: ANN001, ANN202
        swaps[child]()
        return original(self, dirfd, name, child, st)

    monkeypatch.setattr(Scanner, "_file", wrapped)
    result = Scanner(local, vol, ParentTree()).scan()
    assert result.skipped == ["a", "b", "c"]
    assert [doc["p"] for doc in result.docs] == [""]
    assert result.files_read == 0


def test_unchanged_walk_reports_nothing(tmp_path: Path, local: ChunkStore) -> None:
    vol = tmp_path / "vol"
    _volume_dir(vol / "d" / "e")
    os.symlink("/etc", vol / "link")
    result = Scanner(local, vol, ParentTree()).scan()
    assert result.skipped == []
    kinds = {doc["p"]: doc["k"] for doc in result.docs}
    assert kinds["link"] == Kind.SYMLINK.value and kinds["d/e"] == Kind.DIR.value
    assert result.files == FILES and len(result.stat) == len(result.docs)


# -- through the real daemon ----------------------------------------------------------------

RACED = 4  # directories d0..d3, each swapped by its own loop
RACE_FILES = 500
RACER = (
    'trap "exit 0" TERM; cd /data; '
    "for i in $(seq 0 {last}); do "
    "(while true; do mv d$i x$i; ln -s {host} d$i; rm d$i; mv x$i d$i; done) & "
    "done; touch /data/ready; wait"
)


@pytest.mark.docker
@pytest.mark.s3
def test_racing_container_never_gets_host_files_into_a_backup(
    daemon, s3_env, tmp_path: Path
) -> None:  # noqa: ANN001
    bucket = ceph.new_bucket(s3_env, "vpconf")
    store_url = f"s3://{bucket}/store"
    env = dict(
        os.environ,
        DOCKER_HOST=daemon.host,
        LAYERFS_STORE=store_url,
        LAYERFS_CACHE_DIR=str(tmp_path / "cache"),
    )
    plugin = PluginProcess(tmp_path / "root", name=f"vpconf-{uuid.uuid4().hex[:6]}", env=env)
    plugin.start()
    try:
        secret = b"SECRET-" + secrets.token_hex(16).encode()
        host = tmp_path / f"hostdir-{secrets.token_hex(4)}"
        only = _host_dir(host, secret, RACE_FILES)
        vol = f"vpconf-{uuid.uuid4().hex[:6]}"
        daemon.docker("volume", "create", "-d", plugin.name, vol)
        voldir = plugin.root / "volumes" / vol
        for i in range(RACED):
            _volume_dir(voldir / f"d{i}", RACE_FILES)
        script = RACER.format(host=host, last=RACED - 1)
        daemon.docker("run", "-d", "-v", f"{vol}:/data", BASE_IMAGE, "sh", "-c", script)
        wait_for(lambda: (voldir / "ready").exists(), "the racing container")

        ids = []
        for _ in range(20):
            code, doc = plugin.job("Backup.Create", {"Volume": vol})
            assert code == 200, doc
            ids.append(doc["Backup"]["id"])

        store = open_store(store_url)
        leaks = {}
        for backup_id in ids:
            found = _leaks(store, get_backup(store.backend, backup_id).tree, secret, only)
            if found:
                leaks[backup_id] = found[:5]
        assert leaks == {}, f"host files in {len(leaks)} of 20 backups: {leaks}"
    finally:
        remove_driver_objects(daemon.env, plugin.name)
        plugin.cleanup()
        ceph.remove_bucket(s3_env, bucket)
