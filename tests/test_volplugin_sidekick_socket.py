"""Scoped sidekick sockets (`-o sidekick-socket=true`) with the real daemon: a sidekick
container that has only its volume's socket bind-mounted backs up, lists and restores
that volume through it (with the example's static `ctlsock post`, inside the
container), and is refused everything else.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.support.dockerenv import BASE_IMAGE
from tests.support.plugin import PluginProcess, remove_driver_objects

pytestmark = [
    pytest.mark.skipif(
        shutil.which("gcc") is None,
        reason="gcc is needed to build the example's static ctlsock helper",
    ),
    pytest.mark.docker,
]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sidekick"
INSIDE = "/run/volplugin.sock"  # where the sidekicks see their socket
VOLPLUGIN = str(Path(sys.executable).parent / "volplugin")


@pytest.fixture(scope="module")
def image(daemon, tmp_path_factory) -> str:
    """The example's image (busybox and the static ctlsock helper)."""
    work = tmp_path_factory.mktemp("example") / "sidekick"
    shutil.copytree(EXAMPLE, work)
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(work / "ctlsock"), str(work / "ctlsock.c")],
        check=True,
    )
    tag = f"vp-sidekick:{uuid.uuid4().hex[:6]}"
    daemon.docker("build", "-q", "--build-arg", f"BASE={BASE_IMAGE}", "-t", tag, str(work))
    return tag


@pytest.fixture
def sidekick_dir():
    """A short directory for the scoped sockets (a socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vpsk-", dir="/tmp")) / "volumes"
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture
def plugin(daemon, tmp_path, sidekick_dir):
    args = ("--store", str(tmp_path / "store"), "--sidekick-dir", str(sidekick_dir))
    p = PluginProcess(tmp_path / "root", env=daemon.env, args=args).start()
    p.store = str(tmp_path / "store")
    yield p
    if p.proc is None:
        p.start()
    remove_driver_objects(daemon.env, p.name)
    p.cleanup()


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def scoped(plugin, volume: str) -> Path:
    """The volume's scoped socket, as its Status shows it."""
    code, doc = plugin.call("VolumeDriver.Get", {"Name": volume})
    assert code == 200, doc
    return Path(doc["Volume"]["Status"]["SidekickSocket"])


def start_sidekick(d, image: str, socket: Path, *extra: str) -> str:
    """A running container that has `socket` bind-mounted at INSIDE."""
    name = uniq("vp-sk")
    d("run", "-d", "--name", name, "-v", f"{socket}:{INSIDE}", *extra, image, "sleep", "3600")
    return name


def post(d, container: str, endpoint: str, doc: dict) -> tuple[int, dict]:
    """POST from inside `container` through its bind-mounted socket: (0 if 200 else 1, answer)."""
    proc = d("exec", container, "ctlsock", "post", INSIDE, endpoint, json.dumps(doc), check=False)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {"_": proc.stderr}


def refused(d, container: str, endpoint: str, doc: dict, *words: str) -> str:
    code, answer = post(d, container, endpoint, doc)
    assert code == 1, answer
    err = answer["Err"]
    assert "scoped to volume" in err, err
    for word in words:
        assert word in err, err
    return err


def backups(plugin, volume: str) -> list[str]:
    code, doc = plugin.call("Backup.List", {"Volume": volume})
    assert code == 200, doc
    return [b["id"] for b in doc["Backups"]]


def read_in(d, image: str, volume: str, path: str) -> str:
    return d("run", "--rm", "-v", f"{volume}:/data", image, "cat", f"/data/{path}").stdout


def test_sidekick_backs_up_lists_and_restores_its_own_volume_and_nothing_else(
    daemon, plugin, image, sidekick_dir
):
    d = daemon.docker
    vol, other, plain = uniq("vp-own"), uniq("vp-other"), uniq("vp-plain")
    d("volume", "create", "-d", plugin.name, "-o", "sidekick-socket=true", vol)
    d("volume", "create", "-d", plugin.name, "-o", "sidekick-socket=true", other)
    d("volume", "create", "-d", plugin.name, plain)
    d("run", "--rm", "-v", f"{vol}:/data", image, "sh", "-c", "echo mine-1 > /data/f")
    d("run", "--rm", "-v", f"{other}:/data", image, "sh", "-c", "echo theirs > /data/f")
    code, doc = plugin.job("Backup.Create", {"Volume": other})
    assert code == 200, doc
    theirs = doc["Backup"]["id"]
    their_job = doc["Job"]["ID"]

    # Sockets: one per asking volume, 0660 root:root in a 0711 directory; the plugin's
    # own socket stays root-only.
    sock = scoped(plugin, vol)
    assert sock == sidekick_dir / f"{vol}.sock"
    assert sorted(p.name for p in sidekick_dir.iterdir()) == sorted(
        [f"{vol}.sock", f"{other}.sock"]
    )
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert stat.S_IMODE(os.stat(sidekick_dir).st_mode) == 0o711
    assert stat.S_IMODE(os.stat(plugin.socket).st_mode) == 0o600
    code, doc = plugin.call("VolumeDriver.Get", {"Name": plain})
    assert "SidekickSocket" not in doc["Volume"]["Status"]

    # The sidekick shares the volume (as with --volumes-from) and has only its socket.
    sk = start_sidekick(d, image, sock, "-v", f"{vol}:/data")
    assert post(d, sk, "/Plugin.Activate", {})[0] == 0
    code, doc = post(d, sk, "/Backup.Create", {"Volume": vol, "Tags": ["sidekick"], "Wait": True})
    assert code == 0, doc
    backup = doc["Job"]["Result"]["Backup"]
    mine = backup["id"]
    assert backup["volume"] == vol and backup["tags"] == ["sidekick"]
    my_job = doc["Job"]["ID"]
    code, doc = post(d, sk, "/Jobs.Get", {"ID": my_job})
    assert code == 0 and doc["Job"]["Volume"] == vol and doc["Job"]["State"] == "succeeded", doc
    code, doc = post(d, sk, "/Backup.List", {})
    assert code == 0 and [b["id"] for b in doc["Backups"]] == [mine], doc

    d("exec", sk, "sh", "-c", "echo changed > /data/f; echo extra > /data/g")
    code, doc = post(
        d, sk, "/Backup.Restore", {"Backup": mine[:8], "Volume": vol, "Force": True, "Wait": True}
    )
    assert code == 0, doc
    assert doc["Job"]["Result"]["Restore"]["id"] == mine
    assert d("exec", sk, "cat", "/data/f").stdout == "mine-1\n"

    # Everything else is refused, naming the scope.
    refused(d, sk, "/Backup.Create", {"Volume": other}, vol, other)
    refused(d, sk, "/Backup.List", {"Volume": other}, other)
    refused(d, sk, "/Backup.Restore", {"Backup": theirs, "Volume": other, "Force": True}, other)
    err = refused(d, sk, "/Backup.Restore", {"Backup": theirs, "Volume": vol, "Force": True})
    assert f"backup {theirs} is a backup of volume '{other}'" in err
    refused(d, sk, "/Backup.Restore", {"Backup": theirs[:6], "Volume": vol, "Force": True}, other)
    refused(d, sk, "/Backup.Restore", {"Backup": mine, "Volume": plain}, plain)
    refused(d, sk, "/Backup.Prune", {"KeepLast": 0, "KeepDaily": 1, "Grace": 0}, "/Backup.Prune")
    refused(d, sk, "/Backup.Diff", {"A": mine, "B": theirs}, "/Backup.Diff")
    refused(d, sk, "/Backup.Verify", {"ReadData": True}, "/Backup.Verify")
    refused(d, sk, "/VolumeDriver.Create", {"Name": "vp-made-by-sidekick"}, "VolumeDriver")
    refused(d, sk, "/VolumeDriver.Remove", {"Name": other}, "VolumeDriver")
    refused(d, sk, "/VolumeDriver.Mount", {"Name": other, "ID": "x"}, "VolumeDriver")
    refused(d, sk, "/Jobs.Get", {"ID": "j-000000000000"}, "j-000000000000")
    refused(d, sk, "/Jobs.Get", {"ID": their_job}, "not a job of that volume")
    refused(d, sk, "/Jobs.Cancel", {"ID": "j-000000000000"}, "j-000000000000")

    # ...and none of it happened.
    assert d("exec", sk, "cat", "/data/f").stdout == "mine-1\n"
    assert read_in(d, image, other, "f") == "theirs\n"
    assert backups(plugin, other) == [theirs]
    assert backups(plugin, vol) == [mine]
    assert plugin.call("VolumeDriver.Get", {"Name": "vp-made-by-sidekick"})[0] == 500
    assert plugin.call("VolumeDriver.Get", {"Name": other})[0] == 200


def test_another_hosts_backup_of_the_same_name_is_not_this_volumes(daemon, plugin, image, tmp_path):
    """Hosts sharing a store may each have a volume `app_db`: a sidekick sees only its own."""
    d = daemon.docker
    vol = uniq("vp-shared-name")
    d("volume", "create", "-d", plugin.name, "-o", "sidekick-socket=true", vol)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "f").write_text("another host's data\n")
    proc = subprocess.run(
        [VOLPLUGIN, "--host-id", "another-host", "backup", vol, "--path", str(elsewhere),
         "--store", plugin.store, "--json"],
        capture_output=True, text=True, check=True, env=daemon.env,
    )  # fmt: skip
    foreign = json.loads(proc.stdout)["id"]
    sk = start_sidekick(d, image, scoped(plugin, vol))
    code, doc = post(d, sk, "/Backup.List", {"Volume": vol})
    assert code == 0 and doc["Backups"] == [], doc
    err = refused(d, sk, "/Backup.Restore", {"Backup": foreign, "Volume": vol, "Force": True})
    assert "another-host" in err
    assert not (plugin.root / "volumes" / vol / "f").exists()


def test_socket_owner_follows_the_volume_and_goes_with_it(daemon, plugin, image):
    d = daemon.docker
    vol = uniq("vp-owned")
    d("volume", "create", "-d", plugin.name, "-o", "sidekick-socket=true",
      "-o", "uid=1234", "-o", "gid=2345", vol)  # fmt: skip
    sock = scoped(plugin, vol)
    st = os.stat(sock)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o660)
    sk = start_sidekick(d, image, sock)
    assert post(d, sk, "/Plugin.Activate", {})[0] == 0

    d("volume", "rm", vol)
    assert not sock.exists()
    # The container still has the old socket bind-mounted: nobody listens there any more.
    proc = d("exec", sk, "ctlsock", "post", INSIDE, "/Plugin.Activate", "{}", check=False)
    assert proc.returncode == 1 and "cannot connect" in proc.stderr, proc


def test_long_volume_name_gets_a_hashed_socket_name(daemon, plugin, image, sidekick_dir):
    d = daemon.docker
    vol = "vp-long-" + uuid.uuid4().hex + "x" * 200
    assert len(vol) == 240
    d("volume", "create", "-d", plugin.name, "-o", "sidekick-socket=true", vol)
    sock = scoped(plugin, vol)
    assert sock.parent == sidekick_dir and sock.name.startswith("_") and sock.exists()
    assert len(os.fsencode(sock)) < 108
    sk = start_sidekick(d, image, sock)
    code, doc = post(d, sk, "/Backup.Create", {"Volume": vol, "Wait": True})
    assert code == 0 and doc["Job"]["Result"]["Backup"]["volume"] == vol, doc
    refused(d, sk, "/Backup.Create", {"Volume": vol[:-1]})
    d("rm", "-f", sk)
    d("volume", "rm", vol)
    assert list(sidekick_dir.iterdir()) == []


def test_sockets_come_back_when_the_plugin_restarts(daemon, plugin, image, sidekick_dir):
    d = daemon.docker
    vol, off = uniq("vp-again"), uniq("vp-off")
    d("volume", "create", "-d", plugin.name, "-o", "sidekick-socket=true", vol)
    d("volume", "create", "-d", plugin.name, "-o", "sidekick-socket=false", off)
    sock = scoped(plugin, vol)
    assert [p.name for p in sidekick_dir.iterdir()] == [sock.name]
    plugin.stop()
    assert not sock.exists()
    plugin.start()
    assert [p.name for p in sidekick_dir.iterdir()] == [sock.name]
    sk = start_sidekick(d, image, sock)  # a container started after the restart
    code, doc = post(d, sk, "/Backup.Create", {"Volume": vol})
    assert code == 0, doc


def test_sidekick_socket_option_is_validated(daemon, plugin):
    proc = daemon.docker(
        "volume", "create", "-d", plugin.name, "-o", "sidekick-socket=maybe", uniq("vp-bad"),
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "sidekick-socket" in proc.stderr and "true or false" in proc.stderr
