"""The plugin with a real Docker daemon: docker volume commands, run, sidekicks, crashes.

A private dockerd is used (see tests/support/private_dockerd.py): the shared daemon would
keep calling our short-lived drivers after the tests end.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.dockerenv import BASE_IMAGE
from tests.support.plugin import PluginProcess, remove_driver_objects
from tests.support.waiting import wait_for

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def plugin(daemon, tmp_path_factory):
    p = PluginProcess(tmp_path_factory.mktemp("vp") / "root", env=daemon.env).start()
    yield p
    if p.proc is None:
        p.start()
    remove_driver_objects(daemon.env, p.name)
    p.cleanup()


@pytest.fixture
def d(daemon, plugin):
    """The docker CLI against the private daemon; cleans this driver's objects after."""
    yield daemon.docker
    if plugin.proc is None:
        plugin.start()
    remove_driver_objects(daemon.env, plugin.name)


def uniq(prefix: str) -> str:
    return f"vp-{prefix}-{uuid.uuid4().hex[:6]}"


def status(plugin, vol: str) -> dict:
    code, doc = plugin.call("VolumeDriver.Get", {"Name": vol})
    assert code == 200, doc
    return doc["Volume"]["Status"]


def test_volume_commands(d, plugin):
    vol = uniq("cmd")
    d("volume", "create", "-d", plugin.name, "-o", "mode=0700", "-o", "uid=7", vol)
    assert vol in d("volume", "ls", "-q").stdout.split()
    (info,) = json.loads(d("volume", "inspect", vol).stdout)
    assert info["Driver"] == plugin.name
    st = info["Status"]
    assert st["Options"] == {"mode": "0700", "uid": "7"}
    assert st["Containers"] == 0 and st["Created"] and "Size" in st and "Backup" in st
    bad = d("volume", "create", "-d", plugin.name, "-o", "colour=red", uniq("bad"), check=False)
    assert bad.returncode != 0
    assert "unknown option 'colour': accepted options are" in bad.stderr
    assert all(f" {o}" in bad.stderr for o in ("from", "gid", "mode", "uid"))
    d("volume", "rm", vol)
    assert vol not in d("volume", "ls", "-q").stdout.split()
    assert not (plugin.root / "volumes" / vol).exists()


def test_run_with_v_and_mount_syntax(d, plugin):
    vol = uniq("run")
    d("volume", "create", "-d", plugin.name, vol)
    d("run", "--rm", "-v", f"{vol}:/d", BASE_IMAGE, "sh", "-c", "echo hello > /d/greeting")
    out = d(
        "run",
        "--rm",
        "--mount",
        f"type=volume,volume-driver={plugin.name},src={vol},dst=/data",
        BASE_IMAGE,
        "cat",
        "/data/greeting",
    ).stdout
    assert out == "hello\n"
    # --mount with a new name creates the volume through the driver.
    fresh = uniq("fresh")
    d(
        "run",
        "--rm",
        "--mount",
        f"type=volume,volume-driver={plugin.name},src={fresh},dst=/x",
        BASE_IMAGE,
        "touch",
        "/x/made",
    )
    assert (plugin.root / "volumes" / fresh / "made").exists()
    assert status(plugin, vol)["Containers"] == 0
    assert status(plugin, vol)["SizeBytes"] > 0


def test_remove_of_used_volume_names_the_container(d, plugin):
    vol, name = uniq("used"), uniq("holder")
    d("volume", "create", "-d", plugin.name, vol)
    d("run", "-d", "--name", name, "-v", f"{vol}:/d", BASE_IMAGE, "sleep", "600")
    assert status(plugin, vol)["Containers"] == 1
    code, doc = plugin.call("VolumeDriver.Remove", {"Name": vol})
    assert code == 500 and name in doc["Err"]
    assert (plugin.root / "volumes" / vol).is_dir()
    d("rm", "-f", name)
    assert status(plugin, vol)["Containers"] == 0
    d("volume", "rm", vol)


def test_sidekick_with_volumes_from(d, plugin):
    vol, svc, side = uniq("side"), uniq("svc"), uniq("sidekick")
    d("volume", "create", "-d", plugin.name, vol)
    d(
        "run", "-d", "--name", svc, "-v", f"{vol}:/data", BASE_IMAGE,
        "sh", "-c", "while :; do date >> /data/service.log; sleep 0.2; done",
    )  # fmt: skip
    wait_for(lambda: (plugin.root / "volumes" / vol / "service.log").exists(), "service writes")
    out = d(
        "run", "--name", side, "--volumes-from", svc, BASE_IMAGE,
        "sh", "-c", "test -s /data/service.log && echo from-sidekick > /data/side.txt && echo ok",
    ).stdout  # fmt: skip
    assert out == "ok\n"
    assert (plugin.root / "volumes" / vol / "side.txt").read_text() == "from-sidekick\n"
    # The sidekick has exited: only the service holds the volume, and keeps writing.
    assert status(plugin, vol)["Containers"] == 1
    log = plugin.root / "volumes" / vol / "service.log"
    size = log.stat().st_size
    wait_for(lambda: log.stat().st_size > size, "the service to keep writing")
    d("exec", svc, "cat", "/data/side.txt")
    d("rm", "-f", svc)
    assert status(plugin, vol)["Containers"] == 0


def test_twenty_containers_at_once_leave_count_zero(d, plugin):
    vol = uniq("many")
    names = [uniq(f"c{i}") for i in range(20)]
    d("volume", "create", "-d", plugin.name, vol)
    with ThreadPoolExecutor(20) as pool:
        list(
            pool.map(
                lambda n: d(
                    "run", "-d", "--name", n, "-v", f"{vol}:/d", BASE_IMAGE, "sleep", "600"
                ),
                names,
            )
        )
    assert status(plugin, vol)["Containers"] == 20
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda n: d("rm", "-f", n), names))
    assert status(plugin, vol)["Containers"] == 0
    d("volume", "rm", vol)


def test_plugin_sigkill_while_containers_run(d, daemon, plugin):
    vol, keep, dies = uniq("crash"), uniq("keep"), uniq("dies")
    d("volume", "create", "-d", plugin.name, vol)
    d("run", "--rm", "-v", f"{vol}:/d", BASE_IMAGE, "sh", "-c", "echo before > /d/data")
    for name in (keep, dies):
        d("run", "-d", "--name", name, "-v", f"{vol}:/d", BASE_IMAGE, "sleep", "600")
    assert status(plugin, vol)["Containers"] == 2

    plugin.kill()
    # A container dies while the plugin is down: its Unmount never arrives.
    d("kill", dies)
    wait_for(
        lambda: d("inspect", "-f", "{{.State.Status}}", dies).stdout.strip() == "exited",
        "the killed container to exit",
    )
    plugin.start()

    # Reconciled at start: only the running container holds the volume.
    assert status(plugin, vol)["Containers"] == 1
    assert f"volume {vol}: dropped 1 stale mount ID(s); 1 running container(s)" in plugin.log()
    assert d("exec", keep, "cat", "/d/data").stdout == "before\n"
    d("exec", keep, "sh", "-c", "echo after >> /d/data")
    assert vol in d("volume", "ls", "-q").stdout.split()
    (info,) = json.loads(d("volume", "inspect", vol).stdout)
    assert info["Status"]["Containers"] == 1
    out = d("run", "--rm", "-v", f"{vol}:/d", BASE_IMAGE, "cat", "/d/data").stdout
    assert out == "before\nafter\n"
    d("rm", "-f", keep, dies)
    assert status(plugin, vol)["Containers"] == 0
    d("volume", "rm", vol)
    assert not (plugin.root / "volumes" / vol).exists()


def test_daemon_restart_keeps_volumes(d, daemon, plugin):
    vol = uniq("restart")
    d("volume", "create", "-d", plugin.name, "-o", "mode=0750", vol)
    d("run", "--rm", "-v", f"{vol}:/d", BASE_IMAGE, "sh", "-c", "echo kept > /d/f")
    daemon.restart()
    # The daemon asked Get for the volume at start; it still knows it.
    assert vol in d("volume", "ls", "-q").stdout.split()
    (info,) = json.loads(d("volume", "inspect", vol).stdout)
    assert info["Driver"] == plugin.name and info["Status"]["Options"] == {"mode": "0750"}
    assert d("run", "--rm", "-v", f"{vol}:/d", BASE_IMAGE, "cat", "/d/f").stdout == "kept\n"
    assert '"/VolumeDriver.Get", "volume": "' + vol in plugin.log()
    d("volume", "rm", vol)
