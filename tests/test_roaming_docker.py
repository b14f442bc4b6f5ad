"""Roaming volumes through two real Docker daemons ("hosts" a and b, each in its own mount
and network namespaces: tests/support/hosts.py) and real containers, with one plugin per
host (the same driver name, host ids host-a and host-b) serving one store on Ceph RGW.

The lease period is 6 s (LAYERFS_S3_LEASE_TTL), so a takeover after a host freezes or
its plugin dies takes seconds.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ceph
from tests.support.dockerenv import BASE_IMAGE
from tests.support.hosts import Host, HostPlugin
from tests.support.waiting import wait_for

pytestmark = pytest.mark.s3

PLUGIN = "vp-roam"
TTL = "6"


@dataclass
class Roam:
    a: Host
    b: Host
    plugins: dict[str, HostPlugin]
    store: str

    def plugin(self, host: Host) -> HostPlugin:
        return self.plugins[host.name]


@pytest.fixture(scope="module")
def roam(two_hosts: tuple[Host, Host], s3_env: ceph.S3Env, tmp_path_factory) -> Iterator[Roam]:
    a, b = two_hosts
    bucket = ceph.new_bucket(s3_env, "roamd")
    store = f"s3://{bucket}/store"
    plugins = {
        host.name: host.start_plugin(
            PLUGIN, host_id=host.name, store=store, env={"LAYERFS_S3_LEASE_TTL": TTL}
        )
        for host in (a, b)
    }
    try:
        yield Roam(a, b, plugins, store)
    finally:
        for host in (a, b):
            ids = host.docker("ps", "-aq").stdout.split()
            if ids:
                host.docker("rm", "-f", *ids, check=False)
        ceph.remove_bucket(s3_env, bucket)


def volume(name: str) -> str:
    return f"type=volume,src={name},dst=/data,volume-driver={PLUGIN}"


def run(host: Host, name: str, script: str, *more: str, check: bool = True):
    """`docker run --rm` of a shell script with volume `name` at /data."""
    return host.docker(
        "run", "--rm", "--mount", volume(name), *more, BASE_IMAGE, "sh", "-c", script, check=check
    )


def roaming(host: Host, name: str) -> dict:
    import json

    out = host.docker("volume", "inspect", name).stdout
    return json.loads(out)[0]["Status"]["Roaming"]


def test_a_volume_follows_its_containers_from_host_to_host(roam: Roam) -> None:
    a, b = roam.a, roam.b
    a.docker("volume", "create", "-d", PLUGIN, "-o", "roaming=true", "web")
    run(a, "web", "echo from-a > /data/f && mkdir /data/d && echo x > /data/d/g")
    assert roaming(a, "web")["Holder"] is None  # handed over when the container went

    assert run(b, "web", "cat /data/f /data/d/g").stdout == "from-a\nx\n"  # lazily, at once
    assert roaming(b, "web")["Head"]["Host"] == "host-b"
    run(b, "web", "echo from-b > /data/f && rm -r /data/d")
    assert run(a, "web", "cat /data/f; ls /data").stdout == "from-b\nf\n"
    assert "web" in b.docker("volume", "ls", "-q").stdout.split()


def test_a_second_host_is_refused_or_waits_while_the_first_holds_the_volume(roam: Roam) -> None:
    a, b = roam.a, roam.b
    a.docker("volume", "create", "-d", PLUGIN, "-o", "roaming=true", "db")
    a.docker("volume", "create", "-d", PLUGIN, "-o", "roaming=true", "-o", "wait=60s", "dbw")
    for name in ("db", "dbw"):
        a.docker(
            "run", "-d", "--name", f"hold-{name}", "--mount", volume(name), BASE_IMAGE,
            "sh", "-c", "echo 1 > /data/row && sleep 600",
        )  # fmt: skip
    refused = run(b, "db", "cat /data/row", check=False)
    assert refused.returncode != 0 and "held by host host-a" in refused.stderr, refused.stderr

    waiting = subprocess.Popen(
        ["docker", "run", "--rm", "--mount", volume("dbw"), BASE_IMAGE, "cat", "/data/row"],
        env=b.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)
    assert waiting.poll() is None  # b waits while a holds it
    a.docker("rm", "-f", "hold-dbw")
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and out == "1\n", (
        err + roam.plugin(a).log()[-6000:] + roam.plugin(b).log()[-6000:]
    )
    a.docker("rm", "-f", "hold-db")


def _running(host: Host, container: str) -> bool:
    out = host.docker("inspect", "-f", "{{.State.Running}}", container, check=False).stdout
    return out.strip() == "true"


def _start_writer(host: Host, container: str, name: str, script: str) -> None:
    """A container that runs `script` on volume `name` at /data, then sleeps on."""
    host.docker(
        "run", "-d", "--name", container, "--mount", volume(name), BASE_IMAGE,
        "sh", "-c", f"{script} && sleep 600",
    )  # fmt: skip
    wait_for(lambda: _running(host, container), f"the container {container}")


def _head(roam: Roam, host: Host, name: str) -> str:
    return roaming(host, name)["Head"]["Backup"]


def test_a_frozen_host_loses_the_volume_to_the_next_and_publishes_nothing(roam: Roam) -> None:
    a, b = roam.a, roam.b
    plugin_a = roam.plugin(a)
    a.docker("volume", "create", "-d", PLUGIN, "-o", "roaming=true", "q")
    _start_writer(a, "writer-q", "q", "echo published > /data/kept")
    status, doc = plugin_a.job("Backup.Create", {"Volume": "q"})  # a checkpoint: the head
    assert status == 200, doc
    head = _head(roam, a, "q")
    a.docker("exec", "writer-q", "sh", "-c", "echo late > /data/lost")

    plugin_a.pause()  # the whole plugin of a, frozen; its container runs on
    taken = wait_for(
        lambda: run(b, "q", "cat /data/kept; ls /data", check=False).returncode == 0,
        "b to take the volume over once a's lease expired",
        timeout=90,
        interval=1.0,
    )
    assert taken
    assert run(b, "q", "cat /data/kept; ls /data").stdout == "published\nkept\n"
    notes = roaming(b, "q")["Notes"]
    assert any("took over from host host-a" in n and head in n for n in notes), notes
    head_b = _head(roam, b, "q")  # b's handover
    assert head_b != head

    plugin_a.resume()
    wait_for(lambda: not _running(a, "writer-q"), "a to stop the container of a lost volume")
    assert roaming(a, "q")["Lease"].startswith("lost")
    status, doc = plugin_a.job("Backup.Create", {"Volume": "q"})
    assert status == 500 and "lease" in doc["Err"], doc
    a.docker("rm", "-f", "writer-q")
    assert _head(roam, b, "q") == head_b  # a published nothing after it lost the volume


def test_a_killed_plugin_loses_the_volume_and_stops_its_containers_at_restart(
    roam: Roam,
) -> None:
    a, b = roam.a, roam.b
    plugin_a = roam.plugin(a)
    a.docker("volume", "create", "-d", PLUGIN, "-o", "roaming=true", "k")
    _start_writer(a, "writer-k", "k", "echo one > /data/one")
    status, doc = plugin_a.job("Backup.Create", {"Volume": "k"})
    assert status == 200, doc
    plugin_a.kill()
    assert _running(a, "writer-k")  # the container does not depend on the plugin process
    wait_for(
        lambda: run(b, "k", "cat /data/one", check=False).returncode == 0,
        "b to take the volume over once a's lease expired",
        timeout=90,
        interval=1.0,
    )
    plugin_a.start()
    wait_for(lambda: not _running(a, "writer-k"), "a to stop the container at restart")
    notes = roaming(a, "k")["Notes"]
    assert any("lost while the plugin was down" in n for n in notes), notes
    a.docker("rm", "-f", "writer-k")


def test_ten_handovers_with_random_writes_end_with_the_last_writers_files(
    roam: Roam, tmp_path_factory
) -> None:
    a, b = roam.a, roam.b
    a.docker("volume", "create", "-d", PLUGIN, "-o", "roaming=true", "ten")
    rng = random.Random(18)
    names = [f"{d}/f{i}" for d in ("x", "y/z") for i in range(8)]
    model: dict[str, bytes] = {}
    work = tmp_path_factory.mktemp("ten", numbered=True)
    for round_ in range(10):
        host = (a, b)[round_ % 2]
        payload = Path(work) / f"round{round_}"
        payload.mkdir()
        for name in rng.sample(names, 5):
            data = rng.randbytes(rng.randrange(0, 200_000))
            (payload / name).parent.mkdir(parents=True, exist_ok=True)
            (payload / name).write_bytes(data)
            model[name] = data
        written = {str(p.relative_to(payload)) for p in payload.rglob("*")}
        candidates = sorted(set(model) - written)
        doomed = rng.sample(candidates, min(2, len(candidates)))
        for name in doomed:
            del model[name]
        script = "cp -a /payload/. /data/" + "".join(f" && rm -f /data/{n}" for n in doomed)
        run(host, "ten", script, "-v", f"{payload}:/payload:ro")
    listing = run(a, "ten", "cd /data && find . -type f | sort | xargs -r sha256sum").stdout
    found = {line.split("  ./", 1)[1]: line.split()[0] for line in listing.splitlines()}
    assert found == {name: hashlib.sha256(data).hexdigest() for name, data in model.items()}
