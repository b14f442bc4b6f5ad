"""The backup endpoints on the real plugin socket (`volplugin serve` over a Unix socket)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.plugin import job_call

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the plugin server runs as root")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=300)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


class Plugin:
    def __init__(self, sock: Path, root: Path) -> None:
        self.sock = sock
        self.root = root

    def call(self, endpoint: str, doc: dict | None = None) -> tuple[int, dict]:
        conn = _UnixConnection(self.sock)
        try:
            conn.request("POST", endpoint, body=json.dumps(doc or {}))
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def ok(self, endpoint: str, doc: dict | None = None) -> dict:
        status, answer = self.call(endpoint, doc)
        assert status == 200 and answer["Err"] == "", answer
        return answer

    def job(self, endpoint: str, doc: dict) -> tuple[int, dict]:
        return job_call(self.call, endpoint, doc)

    def job_ok(self, endpoint: str, doc: dict) -> dict:
        status, answer = self.job(endpoint, doc)
        assert status == 200 and answer["Err"] == "", answer
        return answer


@pytest.fixture
def plugin(tmp_path: Path):
    root, plugins = tmp_path / "root", tmp_path / "plugins"
    plugins.mkdir()
    env = dict(os.environ, LAYERFS_STORE=str(tmp_path / "store"))
    exe = str(Path(sys.executable).parent / "volplugin")
    cmd = [exe, "--root", str(root), "--name", "bk-api", "serve", "--plugin-dir", str(plugins)]
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    sock = plugins / "bk-api.sock"
    try:
        for line in server.stderr:  # the server logs once it listens
            if "serving driver" in line:
                break
        else:
            pytest.fail(f"volplugin serve exited with {server.wait()}")
        yield Plugin(sock, root)
    finally:
        server.terminate()
        server.wait()


def test_backup_list_restore_diff_verify_prune(plugin: Plugin) -> None:
    plugin.ok("/VolumeDriver.Create", {"Name": "bk-src"})
    src = Path(plugin.ok("/VolumeDriver.Path", {"Name": "bk-src"})["Mountpoint"])
    (src / "notes.txt").write_text("one\n")
    first = plugin.job_ok("/Backup.Create", {"Volume": "bk-src", "Tags": ["nightly"]})["Backup"]
    assert first["volume"] == "bk-src" and first["files"] == 1
    (src / "notes.txt").write_text("two\n")
    second = plugin.job_ok("/Backup.Create", {"Volume": "bk-src"})["Backup"]
    listed = plugin.ok("/Backup.List", {"Volume": "bk-src"})["Backups"]
    assert [b["id"] for b in listed] == [first["id"], second["id"]]
    assert listed[0]["tags"] == ["nightly"]

    restored = plugin.job_ok("/Backup.Restore", {"Backup": first["id"], "Volume": "bk-dst"})
    dst = Path(plugin.ok("/VolumeDriver.Path", {"Name": "bk-dst"})["Mountpoint"])
    assert restored["Restore"]["target"] == str(dst)
    assert (dst / "notes.txt").read_text() == "one\n"

    changes = plugin.ok("/Backup.Diff", {"A": first["id"], "B": second["id"]})["Changes"]
    assert changes == [{"change": "M", "path": "notes.txt", "what": ["content", "mtime"]}]
    assert plugin.ok("/Backup.Verify", {"ReadData": True})["Verify"]["ok"]
    pruned = plugin.job_ok("/Backup.Prune", {"KeepLast": 1, "Grace": 0})["Prune"]
    assert [r["id"] for r in pruned["remove"]] == [first["id"]]
    assert [b["id"] for b in plugin.ok("/Backup.List")["Backups"]] == [second["id"]]
    status = plugin.ok("/VolumeDriver.Get", {"Name": "bk-src"})["Volume"]["Status"]
    assert status["Backup"]["LastID"] == second["id"]


def test_errors_are_500_with_err(plugin: Plugin) -> None:
    status, answer = plugin.job("/Backup.Restore", {"Backup": "0123abcd", "Volume": "bk-x"})
    assert status == 500 and "no backup" in answer["Err"]
    assert answer["Job"]["State"] == "failed" and answer["Job"]["Error"] == answer["Err"]
    status, answer = plugin.call("/VolumeDriver.Get", {"Name": "bk-x"})
    assert status == 500, "a failed restore must not create its volume"
    status, answer = plugin.call("/Backup.Create", {"Volume": "bk-nothing", "Wait": True})
    assert status == 500 and "bk-nothing" in answer["Err"] and "Job" not in answer
    status, answer = plugin.call("/Backup.Create", {})
    assert status == 500 and "Volume" in answer["Err"]
    status, answer = plugin.call("/Backup.Prune", {})
    assert status == 500 and "no retention policy" in answer["Err"]
