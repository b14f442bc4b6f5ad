"""SIGKILL in the middle of a backup into the real Ceph RGW: the CLI and the plugin server.

After the kill the bucket stays consistent (`volplugin verify --read-data`
passes, only the earlier backup is listed) and the next backup completes while
uploading less than the volume holds, reusing the packs the killed run indexed.

The uploads run ahead of the reading by at most five packs, and a backup indexes its
uploaded packs once eight wait, so with sixteen packs the killed run has written an
index by its thirteenth: the kill then lands with packs still to go.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

import pytest

from layerfs.repo.repository import open_repository
from layerfs.store.chunks import ChunkStore
from layerfs.store.s3 import PACK_SIZE, S3Backend
from tests.support.plugin import PluginProcess, UnixHTTPConnection, job_call
from tests.support.s3backup import cli, fill_random, start_cli, store_fixture
from tests.support.waiting import wait_for
from volplugin.backup import service

pytestmark = pytest.mark.s3

FILES, FILE_SIZE = 16, 32 << 20  # 512 MiB of incompressible data: 16 packs


store = store_fixture("bks3-kill")


def _listed(store) -> list[str]:
    return [b["id"] for b in json.loads(cli("backups", "--json", store=store.url).stdout)]


def _backup_in_process(store, volume: str, path: Path, cache: Path):
    """A backup with this process's own S3Backend, so its requests and bytes can be counted."""
    backend = open_repository(S3Backend.from_url(store.url, cache_root=cache))
    try:
        record = service.create_backup(ChunkStore(backend), volume, path)
    finally:
        backend.close()
    return record, backend.stats.snapshot()


def _indexed_bytes(store, cache: Path) -> int:
    """Bytes of the blobs the bucket's indexes name: what the next backup need not upload.

    The killed run wrote its first index (of eight packs at least) before the kill.
    """
    backend = open_repository(S3Backend.from_url(store.url, cache_root=cache))
    try:
        indexed = sum(size for _, size in backend.iter_blobs())
    finally:
        backend.close()
    assert indexed >= 8 * FILE_SIZE * 9 // 10, indexed
    return indexed


def _check_reuse(stats: dict, bytes_new: int, total: int, indexed: int) -> None:
    """The next backup uploaded no more than the killed one left unindexed (plus one pack)."""
    left = total - indexed
    assert bytes_new <= left + PACK_SIZE, (bytes_new, left)
    assert stats["bytes_up"] <= left + PACK_SIZE, stats
    # every pack but the last is full, so the count follows from the bytes
    assert stats["packs_written"] <= stats["bytes_up"] // PACK_SIZE + 1, stats
    assert stats["requests"].get("PutObject", 0) < total // PACK_SIZE, stats


def test_sigkill_of_the_cli_backup(store, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "first.txt").write_text("first\n")
    first = json.loads(
        cli("backup", "bks3-kill", "--path", str(vol), "--json", store=store.url).stdout
    )
    total = fill_random(vol, FILES, FILE_SIZE, seed=1)
    indexes = set(store.keys("index/"))
    proc = start_cli("backup", "bks3-kill", "--path", str(vol), store=store.url)
    wait_for(
        lambda: bool(set(store.keys("index/")) - indexes),
        "the killed backup's first index",
        timeout=300,
        guard=lambda: proc.poll() is None,
    )
    proc.kill()
    assert proc.wait() == -9, "the backup finished before it could be killed"

    assert _listed(store) == [first["id"]]
    cli("verify", "--read-data", store=store.url)
    indexed = _indexed_bytes(store, tmp_path / "cache-count")

    second, stats = _backup_in_process(store, "bks3-kill", vol, tmp_path / "cache2")
    assert second.parent == first["id"]
    _check_reuse(stats, second.bytes_new, total, indexed)
    cli("verify", "--read-data", store=store.url)
    out = tmp_path / "out"
    cli("restore", second.id, "--to-dir", str(out), "--path", "blob011", store=store.url)
    assert (out / "blob011").read_bytes() == (vol / "blob011").read_bytes()


def test_sigkill_of_the_plugin_serving_backup_create(store, tmp_path: Path) -> None:
    name = f"bks3-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, LAYERFS_STORE=store.url)
    plugin = PluginProcess(tmp_path / "root", name, plugin_dir=tmp_path / "plugins", env=env)
    (tmp_path / "plugins").mkdir()
    plugin.start()
    try:
        assert plugin.call("/VolumeDriver.Create", {"Name": "bks3-pvol"})[1]["Err"] == ""
        src = Path(plugin.call("/VolumeDriver.Path", {"Name": "bks3-pvol"})[1]["Mountpoint"])
        (src / "first.txt").write_text("first\n")
        status, answer = _call(plugin, "/Backup.Create")
        assert status == 200 and answer["Err"] == "", answer
        first = answer["Backup"]["id"]
        total = fill_random(src, FILES, FILE_SIZE, seed=2)
        indexes = set(store.keys("index/"))
        answers: list[object] = []
        caller = threading.Thread(
            target=lambda: answers.append(_call_quietly(plugin, "/Backup.Create")), daemon=True
        )
        caller.start()
        wait_for(
            lambda: bool(set(store.keys("index/")) - indexes),
            "the killed request's first index",
            timeout=300,
            guard=caller.is_alive,
        )
        plugin.kill()
        caller.join(60)
        assert answers and isinstance(answers[0], OSError), answers  # no answer: it was killed
        killed = [j for j in _jobs_after_restart(plugin) if j["Volume"] == "bks3-pvol"]

        assert _listed(store) == [first]
        cli("verify", "--read-data", store=store.url)
        indexed = _indexed_bytes(store, tmp_path / "cache-count")

        status, answer = _call(plugin, "/Backup.Create")
        assert status == 200 and answer["Err"] == "", answer
        second = answer["Backup"]
        assert [j["State"] for j in killed] == ["succeeded", "interrupted"], killed
        assert "the plugin stopped" in killed[1]["Error"], killed
        assert second["parent"] == first
        assert second["bytes_new"] <= total - indexed + PACK_SIZE, (second, indexed)
        cli("verify", "--read-data", store=store.url)
    finally:
        plugin.cleanup()


def _post(plugin: PluginProcess, endpoint: str, body: dict) -> tuple[int, dict]:
    conn = UnixHTTPConnection(str(plugin.socket), timeout=600)
    try:
        conn.request("POST", endpoint, body=json.dumps(body))
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _call(plugin: PluginProcess, endpoint: str) -> tuple[int, dict]:
    """Run a job {"Volume": "bks3-pvol"} to its end, waiting as long as a large backup takes."""
    return job_call(lambda e, b: _post(plugin, e, b), endpoint, {"Volume": "bks3-pvol"})


def _jobs_after_restart(plugin: PluginProcess) -> list[dict]:
    """Start the killed plugin again; its jobs, oldest first."""
    plugin.start()
    status, doc = plugin.call("/Jobs.List", {"Volume": "bks3-pvol"})
    assert status == 200, doc
    return doc["Jobs"][::-1]


def _call_quietly(plugin: PluginProcess, endpoint: str) -> object:
    try:
        return _call(plugin, endpoint)
    except OSError as exc:  # the server died with the request open
        return exc
