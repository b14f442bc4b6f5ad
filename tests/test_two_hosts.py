"""Two "hosts" on one machine (tests/support/hosts.py), as the roaming tests use them.

Each host's dockerd runs busybox containers beside the other's; plugins of the same name
on both hosts are each found by their own daemon only, serve from their host's mount
namespace (what a container writes into a volume is at the Mountpoint the plugin reports,
as that host sees it) and reach the S3 gateway on the machine's loopback, so a backup
taken on one host restores on the other. A plugin can be frozen and thawed, and killed
without harm to its daemon; destroying a host while a container still uses a plugin
volume leaves no process, mount or directory behind. The machine's shared daemon and its
docker0 bridge are the same before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.dockerenv import BASE_IMAGE
from tests.support.hosts import Host, namespace_id, namespace_members, running
from tests.support.plugin import post, proc_state

pytestmark = pytest.mark.docker

NAME = "vp-smoke"  # the same driver name on both hosts


def _docker0() -> int:
    """The ifindex of the machine's docker0 (it changes if the bridge is recreated)."""
    out = subprocess.run(
        ["ip", "-j", "link", "show", "docker0"], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)[0]["ifindex"]


def _shared_daemon_answers() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    info = subprocess.run(
        ["docker", "info", "--format", "{{.ID}}"], capture_output=True, text=True, env=env
    )
    assert info.returncode == 0 and info.stdout.strip(), info.stderr


@pytest.fixture(scope="module")
def shared_bridge(docker_client) -> int:
    """The shared daemon runs and docker0 exists before the hosts start; both still do
    once they are destroyed (this fixture is set up first, so it is torn down last)."""
    _shared_daemon_answers()
    before = _docker0()
    yield before
    _shared_daemon_answers()
    assert _docker0() == before


@pytest.fixture(scope="module")
def hosts(shared_bridge, two_hosts) -> tuple[Host, Host]:
    return two_hosts


def _names(plugin) -> list[str]:
    status, doc = plugin.call("VolumeDriver.List", {})
    assert status == 200 and doc["Err"] == "", doc
    return [v["Name"] for v in doc["Volumes"]]


def test_both_daemons_run_containers_at_once(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    ours = {kind: namespace_id(os.getpid(), kind) for kind in ("mnt", "net")}
    for kind in ("mnt", "net"):
        assert len({a.namespaces[kind], b.namespaces[kind], ours[kind]}) == 3
        assert namespace_id(a.daemon_pid, kind) == a.namespaces[kind]
        assert namespace_id(b.daemon_pid, kind) == b.namespaces[kind]
    for host in hosts:
        host.docker("run", "-d", "--name", "sleeper", BASE_IMAGE, "sleep", "600")
    try:
        for host in hosts:
            (state,) = json.loads(host.docker("inspect", "sleeper").stdout)
            assert state["State"]["Running"], state["State"]
            assert host.docker("run", "--rm", BASE_IMAGE, "true").returncode == 0
        ids = {host.docker("inspect", "-f", "{{.Id}}", "sleeper").stdout for host in hosts}
        assert len(ids) == 2  # one container of each daemon
    finally:
        for host in hosts:
            host.docker("rm", "-f", "sleeper", check=False)


@pytest.mark.s3
def test_same_plugin_name_on_both_hosts_each_daemon_finds_its_own(
    hosts: tuple[Host, Host], s3_store_url: str
) -> None:
    a, b = hosts
    pa = a.start_plugin(NAME, host_id="host-a", store=s3_store_url)
    pb = b.start_plugin(NAME, host_id="host-b", store=s3_store_url)
    try:
        for host, plugin in ((a, pa), (b, pb)):
            # the pid is the server's own, in the host's mount namespace and our loopback
            cmdline = Path(f"/proc/{plugin.proc.pid}/cmdline").read_bytes().split(b"\0")
            assert b"serve" in cmdline and NAME.encode() in cmdline
            assert namespace_id(plugin.proc.pid, "mnt") == host.namespaces["mnt"]
            assert namespace_id(plugin.proc.pid, "net") == namespace_id(os.getpid(), "net")
            # the daemon's /run/docker/plugins/NAME.sock is this plugin's socket
            inside = host.run_in_ns(["stat", "-c", "%d:%i", f"/run/docker/plugins/{NAME}.sock"])
            st = os.stat(plugin.socket)
            assert inside.stdout.strip() == f"{st.st_dev}:{st.st_ino}"
        assert pa.socket != pb.socket

        a.docker("volume", "create", "-d", NAME, "v1")
        assert "v1" in _names(pa)
        assert "v1" not in _names(pb)
        assert post(str(pb.socket), "VolumeDriver.Get", {"Name": "v1"})[1]["Err"]
        assert b.docker("volume", "inspect", "v1", check=False).returncode != 0

        a.docker("run", "--rm", "-v", "v1:/data", BASE_IMAGE, "sh", "-c", "echo from-a > /data/f")
        out = a.docker("run", "--rm", "-v", "v1:/data", BASE_IMAGE, "cat", "/data/f")
        assert out.stdout == "from-a\n"
        # the Mountpoint the plugin reports holds it, as the host sees it
        status, doc = pa.call("VolumeDriver.Get", {"Name": "v1"})
        assert status == 200 and doc["Err"] == "", doc
        mountpoint = doc["Volume"]["Mountpoint"]
        assert a.run_in_ns(["cat", f"{mountpoint}/f"]).stdout == "from-a\n"

        # both plugins reach the gateway from their namespace: A backs up, B restores
        status, doc = pa.job("Backup.Create", {"Volume": "v1"})
        assert status == 200 and doc["Err"] == "", doc
        assert doc["Backup"]["host"] == "host-a"
        b.docker("volume", "create", "-d", NAME, "-o", f"from={doc['Backup']['id']}", "v1")
        out = b.docker("run", "--rm", "-v", "v1:/data", BASE_IMAGE, "cat", "/data/f")
        assert out.stdout == "from-a\n"
    finally:
        for host in hosts:
            host.docker("volume", "rm", "v1", check=False)
            host.stop_plugins()


def test_pause_resume_and_kill_reach_the_plugin_and_spare_the_daemon(
    hosts: tuple[Host, Host], tmp_path: Path
) -> None:
    a, _ = hosts
    daemon = a.daemon_pid
    plugin = a.start_plugin("vp-freeze", host_id="host-a", store=str(tmp_path / "store"))
    try:
        pid = plugin.proc.pid
        assert plugin.processes()[0] == pid

        plugin.pause()
        assert {proc_state(p) for p in plugin.processes()} == {"T"}
        answer: list[tuple[int, dict]] = []
        caller = threading.Thread(target=lambda: answer.append(plugin.call("Plugin.Activate")))
        caller.start()
        caller.join(1.0)
        assert caller.is_alive() and not answer  # a frozen server answers nothing
        plugin.resume()
        caller.join()
        assert answer[0][0] == 200
        assert proc_state(pid) != "T"

        plugin.kill()
        assert not running(pid)
        assert plugin.socket.exists()  # left behind, as after a crash
        assert a.daemon_pid == daemon
        assert a.docker("run", "--rm", BASE_IMAGE, "true").returncode == 0

        plugin.start()  # replaces the stale socket
        pid = plugin.proc.pid
        plugin.pause()
        plugin.kill()  # SIGKILL ends a stopped process too
        assert not running(pid)

        plugin.start()
        pid = plugin.proc.pid
        plugin.pause()
        a.pause()  # the host's plugins; a paused one stays paused
        assert proc_state(pid) == "T"
        assert plugin.stop() == 0  # continued after SIGTERM: a clean exit
        assert not plugin.socket.exists()
        assert a.daemon_pid == daemon
    finally:
        a.stop_plugins()


def test_destroy_ends_everything_of_a_host_in_use(shared_bridge, tmp_path: Path) -> None:
    host = Host("host-c")
    try:
        host.start()
        host.ensure_busybox()
        host.start_plugin(NAME, host_id="host-c", store=str(tmp_path / "store"))
        host.docker("volume", "create", "-d", NAME, "busy")
        host.docker("run", "-d", "-v", "busy:/data", BASE_IMAGE, "sleep", "600")
        namespaces = dict(host.namespaces)
        work = host.work
        # the daemon's mounts (the container's root, ...) are in the host's namespace only
        assert str(work) in host.run_in_ns(["cat", "/proc/self/mounts"]).stdout
        with open("/proc/self/mounts") as f:
            assert str(work) not in f.read()
    finally:
        host.destroy()
    for kind, ns in namespaces.items():
        assert not [pid for pid in namespace_members(ns, kind) if running(pid)]
    assert not work.exists()
    with open("/proc/self/mounts") as f:
        assert str(work) not in f.read()
