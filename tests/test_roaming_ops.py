"""Operations on roaming volumes across hosts, through real plugins on a real S3 store.

Two `volplugin serve` processes (host ids a and b) share a bucket on the Ceph RGW, with
a short lease period; they are driven over their sockets like the daemon drives them
(their docker is unreachable: no container runs), and the operator's side is the
`volplugin` command line: `ls --all-hosts`, `release`, `inspect`, and a scrape of the
roaming metrics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.mounts import unmount_below
from tests.support.plugin import PluginProcess, metrics_url, without_docker
from tests.support.waiting import wait_for
from volplugin.metrics.collector import HEAD_CACHE

VOLPLUGIN = str(Path(sys.executable).parent / "volplugin")
LEASE_TTL = "6"  # seconds: a renewal every 1.5 s, so a broken lease is noticed at once

Start = Callable[..., PluginProcess]


@pytest.fixture
def hosts(s3_store_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Start]:
    """start(host, *serve_args, docker=False, **env): a plugin with that --host-id on the
    shared store; its docker is unreachable unless `docker` (then the shared daemon, which
    it only asks who uses a volume: none of these volumes is the daemon's)."""
    started: list[PluginProcess] = []

    def start(host: str, *args: str, docker: bool = False, **more: str) -> PluginProcess:
        if docker:
            request.getfixturevalue("docker_client")  # it runs
        env = dict(
            os.environ if docker else without_docker(tmp_path),
            LAYERFS_STORE=s3_store_url,
            LAYERFS_CACHE_DIR=str(tmp_path / host / "cache"),
            LAYERFS_S3_LEASE_TTL=LEASE_TTL,
            **more,
        )
        name = f"vp-roam-{host}-{uuid.uuid4().hex[:6]}"
        plugin = PluginProcess(tmp_path / host / "root", name, env=env, args=("--host-id", host))
        plugin.args += args
        started.append(plugin.start())
        return plugin

    yield start
    for plugin in started:
        plugin.cleanup()
        unmount_below(plugin.root)


def ok(plugin: PluginProcess, endpoint: str, doc: dict | None = None) -> dict:
    code, answer = plugin.call(endpoint, doc or {})
    assert code == 200, (endpoint, answer, plugin.log()[-3000:])
    return answer


def vp(plugin: PluginProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`volplugin ARGS --name PLUGIN` (a command that talks to the plugin's socket)."""
    return subprocess.run(
        [VOLPLUGIN, *args, "--name", plugin.name],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def listed(plugin: PluginProcess, volume: str) -> dict:
    """`volplugin ls --all-hosts --json`'s entry of `volume`."""
    out = vp(plugin, "ls", "--all-hosts", "--json")
    assert out.returncode == 0, out.stderr
    found = [v for v in json.loads(out.stdout) if v["Name"] == volume]
    assert len(found) == 1, out.stdout
    return found[0]


def table_row(plugin: PluginProcess, volume: str) -> dict[str, str]:
    """`volplugin ls --all-hosts`'s row of `volume`, by column."""
    out = vp(plugin, "ls", "--all-hosts")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    assert header == ["NAME", "HOLDER", "SINCE", "GENERATION", "HEAD AGE", "HEAD HOST"]
    rows = [re.split(r"\s{2,}", line) for line in lines[1:]]
    found = [dict(zip(header, r, strict=True)) for r in rows if r[0] == volume]
    assert len(found) == 1, out.stdout
    return found[0]


def roaming_status(plugin: PluginProcess, volume: str) -> dict:
    return ok(plugin, "VolumeDriver.Get", {"Name": volume})["Volume"]["Status"]["Roaming"]


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("volplugin: error: "), out.stderr
    return lines[0]


def test_ls_all_hosts_shows_the_holder_and_the_head_on_every_host(hosts: Start) -> None:
    a, b = hosts("a"), hosts("b")
    ok(a, "VolumeDriver.Create", {"Name": "r1", "Opts": {"roaming": "true"}})
    mountpoint = Path(ok(a, "VolumeDriver.Mount", {"Name": "r1", "ID": "x1"})["Mountpoint"])
    (mountpoint / "hello.txt").write_text("from a\n")

    for plugin, here in ((a, True), (b, False)):
        entry = listed(plugin, "r1")
        assert entry["Holder"] == "a" and not entry["LeaseExpired"], entry
        assert entry["Generation"] == 1 and entry["Head"] is None, entry
        assert entry["HeldHere"] is here and entry["Local"] is here, entry
        row = table_row(plugin, "r1")
        assert row["HOLDER"] == "a" and row["GENERATION"] == "1", row
        assert row["HEAD AGE"] == "-" and row["HEAD HOST"] == "-", row
        assert row["SINCE"] == entry["HolderSince"], row

    ok(a, "VolumeDriver.Unmount", {"Name": "r1", "ID": "x1"})  # the handover: a head
    for plugin in (a, b):
        entry = listed(plugin, "r1")
        assert entry["Holder"] is None and not entry["LeaseExpired"], entry
        assert entry["Head"]["Host"] == "a" and entry["Head"]["AgeSeconds"] >= 0, entry
        assert not entry["HeldHere"], entry
        row = table_row(plugin, "r1")
        assert row["HOLDER"] == "-" and row["SINCE"] == "-" and row["HEAD HOST"] == "a", row
        assert re.fullmatch(r"\d+[smhd]", row["HEAD AGE"]), row

    # inspect reads well: the holder, the lease here, the head
    out = vp(a, "inspect", "r1")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert re.search(r"^Roaming: +yes; this host is a$", text, re.M), text
    assert re.search(r"^Lease here: +not held here$", text, re.M), text
    assert re.search(r"^Holder: +none \(generation 1\)$", text, re.M), text
    assert re.search(r"^Head: +backup \S+ of \S+Z \(\d+[smhd] old, by host a\)$", text, re.M)

    # the command needs the plugin: --root is refused in one line
    line = one_error_line(vp(a, "ls", "--all-hosts", "--root", str(a.root)))
    assert "asks the running plugin" in line


def test_roaming_list_on_a_store_that_cannot_hold_roaming_volumes(tmp_path: Path) -> None:
    env = dict(without_docker(tmp_path), LAYERFS_STORE=str(tmp_path / "store"))
    plugin = PluginProcess(tmp_path / "root", env=env).start()
    try:
        code, answer = plugin.call("Roaming.List", {})
        assert code == 500
        assert "cannot hold roaming volumes" in answer["Err"], answer
        assert str(tmp_path / "store") in answer["Err"], answer
        line = one_error_line(vp(plugin, "ls", "--all-hosts"))
        assert "cannot hold roaming volumes" in line
    finally:
        plugin.cleanup()


def test_release_breaks_a_live_lease_and_fences_its_holder(hosts: Start) -> None:
    a, b = hosts("a", docker=True), hosts("b")  # a's backups ask docker who uses the volume
    ok(a, "VolumeDriver.Create", {"Name": "r1", "Opts": {"roaming": "true"}})
    mountpoint = Path(ok(a, "VolumeDriver.Mount", {"Name": "r1", "ID": "x1"})["Mountpoint"])
    (mountpoint / "hello.txt").write_text("from a\n")
    ok(a, "VolumeDriver.Unmount", {"Name": "r1", "ID": "x1"})  # head: hello.txt
    mountpoint = Path(ok(a, "VolumeDriver.Mount", {"Name": "r1", "ID": "x2"})["Mountpoint"])
    (mountpoint / "late.txt").write_text("after the head\n")
    before = listed(b, "r1")
    assert before["Holder"] == "a" and before["Generation"] == 2, before

    # without --force: refused, saying what it would do
    line = one_error_line(vp(b, "release", "r1"))
    assert "--force" in line and "breaks the lease" in line
    code, answer = b.call("Roaming.Release", {"Name": "r1"})
    assert code == 500 and "Force" in answer["Err"], answer
    # on the holder while its containers use it: refused
    line = one_error_line(vp(a, "release", "r1", "--force", "--yes"))
    assert "held by this host (a)" in line and "stop them" in line
    # the confirmation names the holder, and defaults to no
    out = vp(b, "release", "r1", "--force", stdin="\n")
    assert out.returncode != 0
    assert "host a" in out.stdout and before["HolderSince"] in out.stdout, out.stdout
    assert listed(b, "r1")["Holder"] == "a"

    out = vp(b, "release", "r1", "--force", "--yes")
    assert out.returncode == 0, out.stderr
    assert "broke the lease of host a (generation 2)" in out.stdout, out.stdout
    after = listed(b, "r1")
    assert after["Holder"] is None and not after["LeaseExpired"], after
    assert after["Generation"] == 2, after
    assert "broken by an operator on host b" in b.log()
    assert any("lease of host a (generation 2)" in n for n in roaming_status(b, "r1")["Notes"])

    # b mounts it at once, from a's head (what a wrote after it is not there)
    there = Path(ok(b, "VolumeDriver.Mount", {"Name": "r1", "ID": "y1"})["Mountpoint"])
    assert (there / "hello.txt").read_text() == "from a\n"
    assert not (there / "late.txt").exists()
    assert listed(a, "r1")["Holder"] == "b"

    # a finds out at its next renewal, and publishes nothing more for the volume
    wait_for(
        lambda: roaming_status(a, "r1")["Lease"].startswith("lost"),
        "host a to notice that its lease was broken",
        timeout=60,
    )
    code, answer = a.job("Backup.Create", {"Volume": "r1"})
    assert code == 500, answer
    assert "lease of roaming volume 'r1' was lost" in answer["Err"], answer
    assert listed(b, "r1")["Head"]["Host"] == "a"  # a's head, not a new one
    out = vp(a, "inspect", "r1")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^Lease here: +lost: ", out.stdout, re.M), out.stdout
    assert re.search(r"^Holder: +host b since \S+Z \(generation 3\)$", out.stdout, re.M)
    assert "this host lost the lease" in out.stdout

    # a release meant for the lease an operator saw does not break the next one
    code, answer = a.call("Roaming.Release", {"Name": "r1", "Force": True, "Generation": 2})
    assert code == 500 and "changed hands" in answer["Err"], answer
    assert listed(a, "r1")["Holder"] == "b"
    line = one_error_line(vp(a, "release", "nothing-here", "--force", "--yes"))
    assert "no roaming volume 'nothing-here'" in line

    ok(a, "VolumeDriver.Unmount", {"Name": "r1", "ID": "x2"})  # nothing handed over
    assert listed(a, "r1")["Holder"] == "b"
    ok(b, "VolumeDriver.Unmount", {"Name": "r1", "ID": "y1"})


def scrape(url: str) -> dict[tuple[str, str], float]:
    """The roaming samples: {(name, volume): value}."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    return {
        (s.name, s.labels.get("volume", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("volplugin_roaming_")
    }


HELD, LOST, AGE = (
    "volplugin_roaming_lease_held",
    "volplugin_roaming_lease_lost",
    "volplugin_roaming_head_age_seconds",
)


def test_roaming_metrics_follow_the_lease_and_the_head(hosts: Start) -> None:
    a = hosts("a", "--metrics-address", "127.0.0.1:0")
    b = hosts("b")
    url = metrics_url(a)
    ok(a, "VolumeDriver.Create", {"Name": "r1", "Opts": {"roaming": "true"}})
    ok(b, "VolumeDriver.Create", {"Name": "elsewhere", "Opts": {"roaming": "true"}})
    ok(a, "VolumeDriver.Mount", {"Name": "r1", "ID": "x1"})
    samples = scrape(url)
    assert samples[(HELD, "r1")] == 1 and samples[(LOST, "r1")] == 0, samples
    assert (AGE, "r1") not in samples, samples  # no head yet
    assert not any(v == "elsewhere" for _, v in samples), samples  # not recorded on a

    ok(a, "VolumeDriver.Unmount", {"Name": "r1", "ID": "x1"})
    head = listed(a, "r1")["Head"]
    assert head is not None
    samples = wait_for(
        lambda: (AGE, "r1") in (s := scrape(url)) and s, "a head age in the metrics", interval=0.5
    )
    assert samples[(HELD, "r1")] == 0 and samples[(LOST, "r1")] == 0, samples
    assert head["AgeSeconds"] - 1 <= samples[(AGE, "r1")] < head["AgeSeconds"] + 60, samples

    ok(a, "VolumeDriver.Mount", {"Name": "r1", "ID": "x2"})
    assert scrape(url)[(HELD, "r1")] == 1
    out = vp(b, "release", "r1", "--force", "--yes")
    assert out.returncode == 0, out.stderr
    samples = wait_for(
        lambda: (s := scrape(url))[(LOST, "r1")] == 1 and s,
        "the lost lease in host a's metrics",
        timeout=60,
        interval=0.5,
    )
    assert samples[(HELD, "r1")] == 0, samples
    assert (AGE, "r1") in samples, samples
    ok(a, "VolumeDriver.Unmount", {"Name": "r1", "ID": "x2"})


OUTAGE_WARNING = "roaming head ages left out: cannot read the store"


def test_roaming_head_metric_is_left_out_while_the_store_is_away(
    hosts: Start, s3_env, tmp_path: Path
) -> None:
    from tests.support import ceph

    with ceph.PrivateGateway(s3_env) as gateway:  # a gateway of its own, to stop
        a = hosts("a", "--metrics-address", "127.0.0.1:0", AWS_ENDPOINT_URL=gateway.env.endpoint)
        url = metrics_url(a)
        ok(a, "VolumeDriver.Create", {"Name": "r1", "Opts": {"roaming": "true"}})
        ok(a, "VolumeDriver.Mount", {"Name": "r1", "ID": "x1"})
        ok(a, "VolumeDriver.Unmount", {"Name": "r1", "ID": "x1"})  # a head
        wait_for(lambda: (AGE, "r1") in scrape(url), "a head age", interval=0.5)

        gateway.stop()
        samples = wait_for(
            lambda: (AGE, "r1") not in (s := scrape(url)) and s,
            "the head age to be left out while the store is away",
            interval=0.5,
        )
        assert samples[(HELD, "r1")] == 0 and samples[(LOST, "r1")] == 0, samples
        # more scrapes, across more than two cache periods: one warning in all
        rereads = 3 * HEAD_CACHE
        deadline = time.monotonic() + rereads
        while time.monotonic() < deadline:
            assert (AGE, "r1") not in scrape(url)
            time.sleep(0.5)
        assert a.log().count(OUTAGE_WARNING) == 1, a.log()[-3000:]

        gateway.start()
        wait_for(
            lambda: (AGE, "r1") in scrape(url), "the head age once the store is back", interval=0.5
        )
        assert "roaming head ages: the store can be read again" in a.log()
