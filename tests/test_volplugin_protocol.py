"""The plugin protocol through a real `volplugin serve` subprocess on its unix socket."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading

import pytest

from tests.support.plugin import PluginProcess, post, running_plugin, without_docker

VOLPLUGIN = os.path.join(os.path.dirname(sys.executable), "volplugin")


@pytest.fixture
def plugin(tmp_path):
    env = without_docker(tmp_path)
    with running_plugin(tmp_path / "root", env=env) as p:
        yield p


def ok(plugin, endpoint, body=None) -> dict:
    status, doc = plugin.call(endpoint, body)
    assert status == 200 and not doc.get("Err"), doc
    return doc


def err(plugin, endpoint, body=None) -> str:
    status, doc = plugin.call(endpoint, body)
    assert status == 500 and doc.get("Err"), doc
    return doc["Err"]


def test_activate_and_capabilities(plugin):
    assert ok(plugin, "Plugin.Activate") == {"Implements": ["VolumeDriver"]}
    assert ok(plugin, "VolumeDriver.Capabilities")["Capabilities"] == {"Scope": "local"}


def test_volume_lifecycle(plugin):
    ok(plugin, "VolumeDriver.Create", {"Name": "v1", "Opts": {"mode": "0750"}})
    ok(plugin, "VolumeDriver.Create", {"Name": "v1", "Opts": {"mode": "750"}})
    assert "already exists" in err(
        plugin, "VolumeDriver.Create", {"Name": "v1", "Opts": {"mode": "0700"}}
    )
    mp = ok(plugin, "VolumeDriver.Mount", {"Name": "v1", "ID": "m1"})["Mountpoint"]
    assert mp == str(plugin.root / "volumes" / "v1")
    assert stat.S_IMODE(os.stat(mp).st_mode) == 0o750
    with open(os.path.join(mp, "f"), "wb") as f:
        f.write(b"x" * 10000)
    ok(plugin, "VolumeDriver.Mount", {"Name": "v1", "ID": "m2"})
    ok(plugin, "VolumeDriver.Mount", {"Name": "v1", "ID": "m2"})
    assert ok(plugin, "VolumeDriver.Path", {"Name": "v1"})["Mountpoint"] == mp
    vol = ok(plugin, "VolumeDriver.Get", {"Name": "v1"})["Volume"]
    assert vol["Name"] == "v1" and vol["Mountpoint"] == mp and vol["CreatedAt"]
    status = vol["Status"]
    assert status["Containers"] == 2
    assert status["Options"] == {"mode": "0750"}
    assert status["SizeBytes"] >= 10000
    assert {"LastID", "LastTime", "Outcome", "Detail", "Age"} <= set(status["Backup"])
    # List shows what Get shows, without the Status
    listed = ok(plugin, "VolumeDriver.List")["Volumes"]
    assert listed == [{"Name": "v1", "Mountpoint": mp, "CreatedAt": vol["CreatedAt"]}]
    # Mounted: the daemon cannot be asked who uses it, so removal is refused.
    assert "v1" in err(plugin, "VolumeDriver.Remove", {"Name": "v1"})
    ok(plugin, "VolumeDriver.Unmount", {"Name": "v1", "ID": "m1"})
    ok(plugin, "VolumeDriver.Unmount", {"Name": "v1", "ID": "m2"})
    assert ok(plugin, "VolumeDriver.Get", {"Name": "v1"})["Volume"]["Status"]["Containers"] == 0
    ok(plugin, "VolumeDriver.Remove", {"Name": "v1"})
    assert not os.path.exists(mp)
    assert "no such volume" in err(plugin, "VolumeDriver.Get", {"Name": "v1"})
    assert ok(plugin, "VolumeDriver.List")["Volumes"] == []


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        ({}, "Name"),
        ({"Name": 7}, "Name"),
        ({"Name": "../escape"}, "path separator"),
        ({"Name": "a\0b"}, "NUL"),
        ({"Name": ".."}, "not allowed"),
        ({"Name": "x" * 300}, "limit is 255"),
        ({"Name": "v", "Opts": {"size": "1G"}}, "unknown option 'size': accepted options are"),
        ({"Name": "v", "Opts": {"mode": "999"}}, "'mode'"),
        ({"Name": "v", "Opts": ["mode"]}, "Opts"),
        (b"{" + b" " * 70000 + b"}", "larger than"),
    ],
)
def test_bad_create_requests_get_an_err_and_touch_nothing(plugin, body, words):
    assert words in err(plugin, "VolumeDriver.Create", body)
    assert ok(plugin, "VolumeDriver.List")["Volumes"] == []
    assert sorted(os.listdir(plugin.root.parent)) == sorted(
        [plugin.root.name, plugin.log_path.name]
    )
    assert os.listdir(plugin.root / "volumes") == []


def test_missing_fields_and_unknown_endpoints(plugin):
    ok(plugin, "VolumeDriver.Create", {"Name": "v"})
    assert "'ID'" in err(plugin, "VolumeDriver.Mount", {"Name": "v"})
    assert "'ID'" in err(plugin, "VolumeDriver.Unmount", {"Name": "v", "ID": ""})
    assert "no such volume" in err(plugin, "VolumeDriver.Mount", {"Name": "w", "ID": "1"})
    assert "Not Found" in err(plugin, "VolumeDriver.Explode", {})
    ok(plugin, "Plugin.Activate")


def test_concurrent_mounts_leave_an_exact_count(plugin):
    ok(plugin, "VolumeDriver.Create", {"Name": "busy"})

    def cycle(i: int) -> None:
        for j in range(10):
            ok(plugin, "VolumeDriver.Mount", {"Name": "busy", "ID": f"{i}-{j}"})
        for j in range(10):
            ok(plugin, "VolumeDriver.Unmount", {"Name": "busy", "ID": f"{i}-{j}"})

    threads = [threading.Thread(target=cycle, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ok(plugin, "VolumeDriver.Get", {"Name": "busy"})["Volume"]["Status"]["Containers"] == 0


def test_socket_is_root_only_and_requests_are_logged(plugin):
    mode = os.stat(plugin.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    ok(plugin, "VolumeDriver.Create", {"Name": "logged"})
    err(plugin, "VolumeDriver.Create", {"Name": "logged", "Opts": {"mode": "0700"}})
    # Each server process writes its own lines: across processes, not in request order.
    creates = plugin.access_records("/VolumeDriver.Create", 2)
    by_outcome = {x["outcome"]: x for x in creates}
    assert len(creates) == 2 and set(by_outcome) == {"ok", "error"}
    assert all(x["volume"] == "logged" and x["duration_ms"] >= 0 for x in creates)
    assert "already exists" in by_outcome["error"]["error"] and "error" not in by_outcome["ok"]
    # an error found before any view runs (a malformed body) is logged the same way
    err(plugin, "VolumeDriver.Get", b"{not json")
    (bad,) = plugin.access_records("/VolumeDriver.Get", 1)
    assert bad["outcome"] == "error" and bad["status"] == 500 and bad["volume"] is None
    assert "not valid JSON" in bad["error"]


def test_state_survives_sigkill_and_stale_socket_is_replaced(plugin):
    ok(plugin, "VolumeDriver.Create", {"Name": "keep", "Opts": {"uid": "5"}})
    ok(plugin, "VolumeDriver.Mount", {"Name": "keep", "ID": "held"})
    (plugin.root / "volumes" / "keep" / "data").write_text("precious")
    plugin.kill()
    assert plugin.socket.exists()  # a crash leaves the socket behind
    plugin.start()
    vol = ok(plugin, "VolumeDriver.Get", {"Name": "keep"})["Volume"]
    # The daemon is unreachable: the mount ID is kept rather than released on a guess.
    assert vol["Status"]["Containers"] == 1
    assert vol["Status"]["Options"] == {"uid": "5"}
    assert (plugin.root / "volumes" / "keep" / "data").read_text() == "precious"
    ok(plugin, "VolumeDriver.Unmount", {"Name": "keep", "ID": "held"})
    assert ok(plugin, "VolumeDriver.Get", {"Name": "keep"})["Volume"]["Status"]["Containers"] == 0


def test_sigterm_removes_socket_and_second_server_on_root_is_refused(plugin, tmp_path):
    other = PluginProcess(plugin.root, env=plugin.env)
    with pytest.raises(RuntimeError, match="is in use by another `volplugin serve`"):
        other.start()
    other.cleanup()
    assert plugin.stop() == 0
    assert not plugin.socket.exists()


def test_cli_reads_state_while_server_is_down(plugin):
    ok(plugin, "VolumeDriver.Create", {"Name": "c1", "Opts": {"mode": "0700"}})
    ok(plugin, "VolumeDriver.Mount", {"Name": "c1", "ID": "x"})
    plugin.stop()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [VOLPLUGIN, *args, "--root", str(plugin.root)], capture_output=True, text=True
        )

    listing = json.loads(cli("ls", "--json").stdout)
    assert [(v["Name"], v["Status"]["Containers"]) for v in listing] == [("c1", 1)]
    doc = json.loads(cli("inspect", "c1", "--json").stdout)
    assert doc["Status"]["Options"] == {"mode": "0700"}
    assert "c1" in cli("ls").stdout
    assert "Containers:  1" in cli("inspect", "c1").stdout
    missing = cli("inspect", "nope")
    assert missing.returncode == 1
    assert missing.stderr.startswith("volplugin: error: no such volume 'nope'")
    bad = subprocess.run(
        [VOLPLUGIN, "ls", "--root", str(plugin.root / "absent")], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "no volplugin state" in bad.stderr


def test_raw_post_without_content_type(plugin):
    status, doc = post(str(plugin.socket), "VolumeDriver.List", b"null")
    assert status == 200 and doc["Volumes"] == []
