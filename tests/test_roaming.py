"""Roaming volumes between two real plugins ("hosts" a and b) sharing one store on Ceph RGW.

The plugins are driven over their sockets as the daemon would (Create, Mount, Unmount,
Get, List); their volumes' directories are read and written from here, as a container
would (the machine's daemon, which backups ask for the volume's users, finds none).
The lease period is 6 s (LAYERFS_S3_LEASE_TTL), so expiry tests take seconds.
Tests with real daemons and containers are in test_roaming_docker.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ceph
from tests.support.mounts import unmount_below
from tests.support.plugin import PluginProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.s3

TTL = "6"


class Hosts:
    """Plugins with their own roots and caches on one store, by host id."""

    def __init__(self, store: str, base: Path) -> None:
        self.store = store
        self.base = base
        self.plugins: dict[str, PluginProcess] = {}

    def start(self, host: str, *, store: str | None = None) -> PluginProcess:
        env = dict(
            os.environ,
            VOLPLUGIN_CRON_SECONDS="1",  # schedules may fire every few seconds
            LAYERFS_STORE=store or self.store,
            LAYERFS_CACHE_DIR=str(self.base / host / "cache"),
            LAYERFS_S3_LEASE_TTL=TTL,
        )
        env.pop("DOCKER_HOST", None)  # the machine's daemon: no container uses these volumes
        plugin = PluginProcess(
            self.base / host / "root",
            name=f"vp-roam-{host}-{uuid.uuid4().hex[:4]}",
            env=env,
            args=("--host-id", host),
        ).start()
        self.plugins[host] = plugin
        return plugin

    def close(self) -> None:
        for plugin in self.plugins.values():
            if plugin.proc is not None and plugin.proc.poll() is None:
                os.kill(plugin.proc.pid, signal.SIGCONT)
            plugin.cleanup()
        unmount_below(self.base)  # lazily served volumes' mounts outlive their plugin


@pytest.fixture
def hosts(s3_store_url: str, tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(s3_store_url, tmp_path)
    try:
        yield h
    finally:
        h.close()


def ok(plugin: PluginProcess, endpoint: str, body: dict) -> dict:
    status, doc = plugin.call(endpoint, body)
    assert status == 200 and not doc.get("Err"), (endpoint, body, doc, plugin.log()[-3000:])
    return doc


def mount(plugin: PluginProcess, name: str, mount_id: str) -> Path:
    return Path(ok(plugin, "VolumeDriver.Mount", {"Name": name, "ID": mount_id})["Mountpoint"])


def roaming_status(plugin: PluginProcess, name: str) -> dict:
    return ok(plugin, "VolumeDriver.Get", {"Name": name})["Volume"]["Status"]["Roaming"]


def test_a_roaming_volume_is_listed_everywhere_and_written_by_one_host_at_a_time(
    hosts: Hosts,
) -> None:
    a, b = hosts.start("a"), hosts.start("b")
    assert ok(a, "VolumeDriver.Capabilities", {})["Capabilities"]["Scope"] == "global"
    ok(a, "VolumeDriver.Create", {"Name": "web", "Opts": {"roaming": "true"}})
    assert [v["Name"] for v in ok(b, "VolumeDriver.List", {})["Volumes"]] == ["web"]

    on_a = mount(a, "web", "a1")
    (on_a / "page.html").write_text("written on a\n")
    (on_a / "dir").mkdir()
    (on_a / "dir" / "link").symlink_to("../page.html")

    status, doc = b.call("VolumeDriver.Mount", {"Name": "web", "ID": "b1"})
    assert status == 500 and "held by host a" in doc["Err"], doc

    ok(a, "VolumeDriver.Unmount", {"Name": "web", "ID": "a1"})  # the handover
    head = roaming_status(a, "web")["Head"]
    assert head["Host"] == "a" and roaming_status(a, "web")["Holder"] is None

    on_b = mount(b, "web", "b1")  # b restores a's head lazily
    assert (on_b / "page.html").read_text() == "written on a\n"
    assert os.readlink(on_b / "dir" / "link") == "../page.html"
    assert roaming_status(b, "web")["Holder"] == "b"
    (on_b / "page.html").write_text("rewritten on b\n")
    (on_b / "new").write_bytes(os.urandom(300_000))
    expected_new = (on_b / "new").read_bytes()
    status, doc = a.call("VolumeDriver.Mount", {"Name": "web", "ID": "a2"})
    assert status == 500 and "held by host b" in doc["Err"], doc
    ok(b, "VolumeDriver.Unmount", {"Name": "web", "ID": "b1"})

    on_a = mount(a, "web", "a2")  # b's writes come back to a
    assert (on_a / "page.html").read_text() == "rewritten on b\n"
    assert (on_a / "new").read_bytes() == expected_new
    assert roaming_status(a, "web")["Generation"] == 3
    ok(a, "VolumeDriver.Unmount", {"Name": "web", "ID": "a2"})


def test_a_mount_with_wait_takes_the_volume_once_the_holder_hands_it_over(hosts: Hosts) -> None:
    a, b = hosts.start("a"), hosts.start("b")
    ok(a, "VolumeDriver.Create", {"Name": "db", "Opts": {"roaming": "true", "wait": "60s"}})
    on_a = mount(a, "db", "a1")
    (on_a / "row").write_text("1\n")
    answer: list = []
    waiter = threading.Thread(
        target=lambda: answer.append(b.call("VolumeDriver.Mount", {"Name": "db", "ID": "b1"}))
    )
    waiter.start()
    wait_for(lambda: "held by host a" not in b.log() and b.log(), "b's plugin to answer")
    assert waiter.is_alive()  # b waits while a holds the volume
    ok(a, "VolumeDriver.Unmount", {"Name": "db", "ID": "a1"})
    waiter.join(timeout=90)
    status, doc = answer[0]
    assert status == 200, doc
    assert (Path(doc["Mountpoint"]) / "row").read_text() == "1\n"


def test_a_stopped_holder_loses_the_volume_and_publishes_nothing_after(hosts: Hosts) -> None:
    a, b = hosts.start("a"), hosts.start("b")
    ok(a, "VolumeDriver.Create", {"Name": "q", "Opts": {"roaming": "true"}})
    on_a = mount(a, "q", "a1")
    (on_a / "kept").write_text("published\n")
    status, doc = a.job("Backup.Create", {"Volume": "q"})  # a checkpoint: the head
    assert status == 200, doc
    head = roaming_status(a, "q")["Head"]["Backup"]
    (on_a / "lost").write_text("written after the head\n")

    os.kill(a.proc.pid, signal.SIGSTOP)  # a host that froze while holding the volume
    on_b = wait_for(
        lambda: b.call("VolumeDriver.Mount", {"Name": "q", "ID": "b1"})[0] == 200 and True,
        "b to take the volume over once a's lease expired",
        timeout=60,
        interval=1.0,
    )
    on_b = mount(b, "q", "b2")  # the same volume, a second container on b
    assert (on_b / "kept").read_text() == "published\n"
    assert not (on_b / "lost").exists()
    status_b = roaming_status(b, "q")
    assert status_b["Holder"] == "b"
    assert any("took over from host a" in n and head in n for n in status_b["Notes"]), status_b

    os.kill(a.proc.pid, signal.SIGCONT)
    wait_for(
        lambda: roaming_status(a, "q")["Lease"].startswith("lost"),
        "a to notice it lost the lease",
        timeout=30,
        interval=0.5,
    )
    status, doc = a.job("Backup.Create", {"Volume": "q"})
    assert status == 500 and "lease" in doc["Err"], doc
    ok(a, "VolumeDriver.Unmount", {"Name": "q", "ID": "a1"})  # no handover: nothing published
    record = roaming_status(b, "q")
    assert record["Head"]["Backup"] == head and record["Holder"] == "b"
    assert "lost" in a.log() and "lease" in a.log()
    for mount_id in ("b1", "b2"):
        ok(b, "VolumeDriver.Unmount", {"Name": "q", "ID": mount_id})
    assert roaming_status(b, "q")["Head"]["Host"] == "b"


def test_checkpoints_publish_heads_while_the_volume_stays_mounted(hosts: Hosts) -> None:
    a = hosts.start("a")
    ok(
        a,
        "VolumeDriver.Create",
        {"Name": "c", "Opts": {"roaming": "true", "checkpoint-interval": "2s"}},
    )
    on_a = mount(a, "c", "a1")
    (on_a / "one").write_text("1\n")
    first = wait_for(lambda: roaming_status(a, "c")["Head"], "a first checkpoint", timeout=60)
    (on_a / "two").write_text("2\n")
    wait_for(
        lambda: roaming_status(a, "c")["Head"]["Backup"] != first["Backup"],
        "a second checkpoint",
        timeout=60,
    )
    assert roaming_status(a, "c")["Holder"] == "a"  # still held: checkpoints keep the lease
    ok(a, "VolumeDriver.Unmount", {"Name": "c", "ID": "a1"})


def test_remove_is_refused_while_another_host_holds_the_volume(hosts: Hosts) -> None:
    a, b = hosts.start("a"), hosts.start("b")
    ok(a, "VolumeDriver.Create", {"Name": "r", "Opts": {"roaming": "true"}})
    ok(b, "VolumeDriver.Create", {"Name": "r", "Opts": {}})  # b takes the store's options
    assert ok(b, "VolumeDriver.Get", {"Name": "r"})["Volume"]["Status"]["Options"] == {
        "roaming": "true"
    }
    mount(a, "r", "a1")
    status, doc = b.call("VolumeDriver.Remove", {"Name": "r"})
    assert status == 500 and "held by host a" in doc["Err"], doc
    ok(a, "VolumeDriver.Unmount", {"Name": "r", "ID": "a1"})
    ok(b, "VolumeDriver.Remove", {"Name": "r"})
    status, doc = a.call("VolumeDriver.Mount", {"Name": "r", "ID": "a2"})
    assert status == 500 and "not in the store any more" in doc["Err"], doc


def test_roaming_options_are_checked(hosts: Hosts, tmp_path: Path) -> None:
    a = hosts.start("a")
    for opts, words in (
        ({"wait": "10s"}, "applies to roaming volumes"),
        ({"roaming": "true", "wait": "5m"}, "at most 90s"),
        ({"roaming": "true", "on-lease-loss": "panic"}, "stop or readonly"),
        ({"roaming": "true", "checkpoint-interval": "soon"}, "a duration"),
        ({"roaming": "true", "from": "0123456789abcdef"}, "starts empty"),
    ):
        status, doc = a.call("VolumeDriver.Create", {"Name": "bad", "Opts": opts})
        assert status == 500 and words in doc["Err"], (opts, doc)
    local = hosts.start("l", store=str(tmp_path / "local-store"))
    status, doc = local.call("VolumeDriver.Create", {"Name": "x", "Opts": {"roaming": "true"}})
    assert status == 500 and "roaming volumes need a store that hosts share" in doc["Err"], doc
    assert ok(local, "VolumeDriver.Capabilities", {})["Capabilities"]["Scope"] == "local"


def test_a_tampered_record_is_refused_by_name(hosts: Hosts, s3_env: ceph.S3Env) -> None:
    a, b = hosts.start("a"), hosts.start("b")
    name = "tampered-volume"
    ok(a, "VolumeDriver.Create", {"Name": name, "Opts": {"roaming": "true"}})
    bucket = hosts.store.split("/")[2]
    client = s3_env.client()
    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket=bucket, Prefix="store/docs/roaming/")["Contents"]
    ]
    assert len(keys) == 1 and "tampered" not in keys[0]  # the name is not shown
    body = bytearray(client.get_object(Bucket=bucket, Key=keys[0])["Body"].read())
    assert b'"roaming"' not in body  # sealed
    body[-5] ^= 0x40
    client.put_object(Bucket=bucket, Key=keys[0], Body=bytes(body))
    for plugin in (b, a):
        status, doc = plugin.call("VolumeDriver.Mount", {"Name": name, "ID": "m1"})
        assert status == 500 and f"record of roaming volume {name!r}" in doc["Err"], doc
    assert json.dumps(ok(a, "VolumeDriver.Get", {"Name": name})).count("cannot read") == 1


def test_on_lease_loss_readonly_makes_the_lost_volume_read_only(hosts: Hosts) -> None:
    a, b = hosts.start("a"), hosts.start("b")
    opts = {"roaming": "true", "on-lease-loss": "readonly"}
    ok(a, "VolumeDriver.Create", {"Name": "ro", "Opts": opts})
    (mount(a, "ro", "a1") / "f").write_text("a\n")
    ok(a, "VolumeDriver.Unmount", {"Name": "ro", "ID": "a1"})
    on_b = mount(b, "ro", "b1")  # served lazily: a mount of its own
    assert os.path.ismount(on_b)
    (on_b / "g").write_text("b\n")

    os.kill(b.proc.pid, signal.SIGSTOP)
    wait_for(
        lambda: a.call("VolumeDriver.Mount", {"Name": "ro", "ID": "a2"})[0] == 200,
        "a to take the volume over once b's lease expired",
        timeout=60,
        interval=1.0,
    )
    os.kill(b.proc.pid, signal.SIGCONT)

    def refused() -> bool:
        try:
            (on_b / "h").write_text("after the loss\n")
        except OSError as exc:
            return exc.errno == errno.EROFS
        (on_b / "h").unlink()
        return False

    wait_for(refused, "b's volume to turn read-only", timeout=30, interval=0.5)
    assert (on_b / "g").read_text() == "b\n"  # still readable
    assert roaming_status(b, "ro")["Lease"].startswith("lost")
    ok(b, "VolumeDriver.Unmount", {"Name": "ro", "ID": "b1"})
    ok(a, "VolumeDriver.Unmount", {"Name": "ro", "ID": "a2"})


def test_scheduled_backups_run_on_the_holder_and_are_skipped_elsewhere(hosts: Hosts) -> None:
    a, b = hosts.start("a"), hosts.start("b")
    opts = {"roaming": "true", "backup-schedule": "* * * * * */2"}
    ok(a, "VolumeDriver.Create", {"Name": "s", "Opts": opts})
    ok(b, "VolumeDriver.Create", {"Name": "s", "Opts": {}})
    (mount(a, "s", "a1") / "f").write_text("scheduled\n")
    heads = set()

    def two_scheduled_heads() -> bool:
        heads.add(
            roaming_status(a, "s")["Head"]["Backup"] if roaming_status(a, "s")["Head"] else None
        )
        return len(heads - {None}) >= 2

    wait_for(two_scheduled_heads, "two scheduled backups on a, each the head", timeout=60)
    wait_for(lambda: "scheduled backup skipped" in b.log(), "b to skip its schedule", timeout=30)
    status_b = ok(b, "VolumeDriver.Get", {"Name": "s"})["Volume"]["Status"]
    assert not (status_b.get("Backup") or {}).get("failures"), status_b  # no failure counted
    ok(a, "VolumeDriver.Unmount", {"Name": "s", "ID": "a1"})


def test_of_hosts_racing_for_a_free_volume_exactly_one_takes_it(s3_store_url: str) -> None:
    from layerfs.store.location import open_backend
    from volplugin.roaming.lease import HeldElsewhere, take
    from volplugin.roaming.registry import Registry, RoamingRecord

    backend = open_backend(s3_store_url)
    try:
        registry = Registry(backend)
        assert registry.create(RoamingRecord("race", {"roaming": "true"}, "now", 60.0))
        assert registry.create(RoamingRecord("race", {"roaming": "true"}, "now", 60.0)) is None
        start = threading.Barrier(8)
        outcomes: dict[str, object] = {}

        def racer(host: str) -> None:
            start.wait()
            try:
                outcomes[host] = take(Registry(backend), "race", host)
            except HeldElsewhere as exc:
                outcomes[host] = exc

        racers = [threading.Thread(target=racer, args=(f"h{i}",)) for i in range(8)]
        for t in racers:
            t.start()
        for t in racers:
            t.join()
        winners = [h for h, o in outcomes.items() if not isinstance(o, HeldElsewhere)]
        assert len(winners) == 1, outcomes
        found = registry.get("race")
        assert found is not None and found.record.holder.host == winners[0]
        assert found.record.generation == 1
        for host, outcome in outcomes.items():
            if host != winners[0]:
                assert f"held by host {winners[0]}" in str(outcome)
    finally:
        backend.close()


def _last_handover(plugin: PluginProcess, name: str) -> dict:
    jobs = ok(plugin, "Jobs.List", {"Volume": name})["Jobs"]
    return next(j for j in jobs if j["Kind"] == "backup")["Result"]["Backup"]


def test_a_handover_after_a_takeover_reads_only_what_changed(hosts: Hosts) -> None:
    a, b = hosts.start("a"), hosts.start("b")
    ok(a, "VolumeDriver.Create", {"Name": "big", "Opts": {"roaming": "true"}})
    on_a = mount(a, "big", "a1")
    for i in range(40):
        (on_a / f"f{i:02d}").write_bytes(os.urandom(100_000))
    ok(a, "VolumeDriver.Unmount", {"Name": "big", "ID": "a1"})
    assert _last_handover(a, "big")["files_read"] == 40

    on_b = mount(b, "big", "b1")  # a's head, served lazily
    (on_b / "f07").write_bytes(b"changed on b")
    (on_b / "new").write_bytes(b"new on b")
    ok(b, "VolumeDriver.Unmount", {"Name": "big", "ID": "b1"})
    handover = _last_handover(b, "big")
    assert handover["files"] == 41 and handover["files_read"] == 2, handover

    on_a = mount(a, "big", "a2")  # b's head, served lazily on a
    assert (on_a / "f07").read_bytes() == b"changed on b"
    ok(a, "VolumeDriver.Unmount", {"Name": "big", "ID": "a2"})
    assert _last_handover(a, "big")["files_read"] == 0


def _held_view(plugin: PluginProcess) -> int | None:
    """The pid of the image view daemon that ``plugin`` holds, once it holds one."""
    from layerfs.fs.views import DaemonInfo, run_dir, view_answers

    assert plugin.proc is not None
    for hold in (run_dir() / "views").glob(f"*.holds/{plugin.proc.pid}"):
        mount_dir = hold.parent.with_name(hold.parent.name.removesuffix(".holds"))
        info = DaemonInfo.load(mount_dir)
        if info is not None and info.pid and view_answers(mount_dir):
            return info.pid
    return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has left: its parent (our plugin's mount process) is gone already
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_a_plugin_serving_roaming_volumes_keeps_its_image_view_ready_while_it_runs(
    hosts: Hosts,
) -> None:
    a = hosts.start("a")
    ok(a, "VolumeDriver.Create", {"Name": "ready", "Opts": {"roaming": "true"}})
    (mount(a, "ready", "a1") / "f").write_text("from a\n")
    ok(a, "VolumeDriver.Unmount", {"Name": "ready", "ID": "a1"})

    b = hosts.start("b")
    # before any Mount asks: the store's view daemon serves, held by b's plugin
    view = wait_for(lambda: _held_view(b), timeout=60, what="b's image view")
    on_b = mount(b, "ready", "b1")  # served lazily from a's head, over that view
    assert (on_b / "f").read_text() == "from a\n"
    ok(b, "VolumeDriver.Unmount", {"Name": "ready", "ID": "b1"})
    # nothing of the store is mounted on b now: the view stays for the next Mount
    assert roaming_status(b, "ready")["Holder"] is None
    assert _held_view(b) == view and _running(view)
    on_b = mount(b, "ready", "b2")
    assert (on_b / "f").read_text() == "from a\n" and _held_view(b) == view
    ok(b, "VolumeDriver.Unmount", {"Name": "ready", "ID": "b2"})

    b.cleanup()  # SIGTERM: its hold goes; the idle daemon notices (LAYERFS_VIEW_IDLE)
    wait_for(lambda: not _running(view), timeout=30, what="the unused view to stop")
