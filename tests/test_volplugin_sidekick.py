"""Sidekicks on a volplugin volume with the real daemon: a control socket in a shared
/var/run restarts the service's worker, by hand and with the shipped compose example,
whose sidekick also backs the volume up through the volume's scoped plugin socket.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.support.dockerenv import BASE_IMAGE
from tests.support.plugin import PluginProcess, remove_driver_objects
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.skipif(
        shutil.which("gcc") is None,
        reason="gcc is needed to build the example's static ctlsock helper",
    ),
    pytest.mark.docker,
]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sidekick"


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory) -> Path:
    """A copy of examples/sidekick with ctlsock built, ready for `docker build`."""
    work = tmp_path_factory.mktemp("example") / "sidekick"
    shutil.copytree(EXAMPLE, work)
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(work / "ctlsock"), str(work / "ctlsock.c")],
        check=True,
    )
    return work


@pytest.fixture(scope="module")
def image(daemon, example_dir) -> str:
    tag = f"vp-example:{uuid.uuid4().hex[:6]}"
    daemon.docker("build", "-q", "--build-arg", f"BASE={BASE_IMAGE}", "-t", tag, str(example_dir))
    return tag


@pytest.fixture
def plugin(daemon, tmp_path):
    sidekicks = Path(tempfile.mkdtemp(prefix="vpsk-", dir="/tmp")) / "volumes"  # short paths
    args = ("--store", str(tmp_path / "store"), "--sidekick-dir", str(sidekicks))
    p = PluginProcess(tmp_path / "root", env=daemon.env, args=args).start()
    p.sidekick_dir = sidekicks
    yield p
    if p.proc is None:
        p.start()
    remove_driver_objects(daemon.env, p.name)
    p.cleanup()
    shutil.rmtree(sidekicks.parent, ignore_errors=True)


def read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def mounts(plugin, vol: str) -> int:
    code, doc = plugin.call("VolumeDriver.Get", {"Name": vol})
    assert code == 200, doc
    return doc["Volume"]["Status"]["Containers"]


def test_sidekick_restarts_worker_through_socket(daemon, plugin, image):
    d = daemon.docker
    vol, svc = f"vp-ctl-{uuid.uuid4().hex[:6]}", f"vp-svc-{uuid.uuid4().hex[:6]}"
    run = plugin.root / "volumes" / vol
    d("volume", "create", "-d", plugin.name, vol)
    d("run", "-d", "--name", svc, "-v", f"{vol}:/var/run", image)
    wait_for(lambda: (run / "ctl.sock").exists() and read(run / "worker.gen") == "1", "service")
    first_pid = read(run / "worker.pid")

    reply = d("run", "--rm", "--volumes-from", svc, image, "ctlsock", "send",
              "/var/run/ctl.sock", "restart").stdout  # fmt: skip
    assert reply == "ok restart\n"
    wait_for(lambda: read(run / "worker.gen") == "2", "the worker's restart")
    second_pid = read(run / "worker.pid")
    assert second_pid and second_pid != first_pid
    assert d("exec", svc, "kill", "-0", first_pid, check=False).returncode != 0
    assert d("exec", svc, "kill", "-0", second_pid, check=False).returncode == 0
    # The sidekick is gone; the service still holds the volume.
    assert mounts(plugin, vol) == 1
    d("rm", "-f", svc)
    assert mounts(plugin, vol) == 0
    d("volume", "rm", vol)


def backups(plugin, vol: str) -> list[dict]:
    code, doc = plugin.call("Backup.List", {"Volume": vol})
    assert code == 200, doc
    return doc["Backups"]


def test_compose_example_up_and_down(daemon, plugin, example_dir, image):
    project = f"vp-compose-{uuid.uuid4().hex[:6]}"
    vol = f"{project}_ctl"
    env = dict(
        daemon.env,
        VOLPLUGIN_DRIVER=plugin.name,
        BASE_IMAGE=BASE_IMAGE,
        EXAMPLE_IMAGE=image,
        COMPOSE_PROJECT_NAME=project,
        CTL_VOLUME=vol,
        SIDEKICK_DIR=str(plugin.sidekick_dir),
    )

    def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["docker-compose", "-f", str(example_dir / "docker-compose.yml"), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=example_dir,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"docker-compose {args} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    try:
        compose("up", "-d")
        sidekick = f"{project}_sidekick_1"
        wait_for(
            lambda: (
                daemon.docker("inspect", "-f", "{{.State.Status}}", sidekick).stdout.strip()
                == "exited"
            ),
            "the sidekick to finish",
        )
        assert daemon.docker("inspect", "-f", "{{.State.ExitCode}}", sidekick).stdout == "0\n"
        logs = compose("logs", "--no-color", "sidekick").stdout
        assert "ok restart" in logs and "worker generation 2" in logs
        assert f"backed up {vol}" in logs
        assert mounts(plugin, vol) == 1
        code, doc = plugin.call("VolumeDriver.Get", {"Name": vol})
        assert doc["Volume"]["Status"]["Options"] == {"mode": "0755", "sidekick-socket": "true"}
        assert doc["Volume"]["Status"]["SidekickSocket"] == str(plugin.sidekick_dir / f"{vol}.sock")
        assert [b["tags"] for b in backups(plugin, vol)] == [["sidekick"]]

        again = compose("run", "--rm", "sidekick").stdout
        assert "worker generation 3" in again and f"backed up {vol}" in again
        assert mounts(plugin, vol) == 1
        assert len(backups(plugin, vol)) == 2
    finally:
        down = compose("down", "-v", check=False)
    assert down.returncode == 0, down.stderr
    assert vol not in daemon.docker("volume", "ls", "-q").stdout.split()
    assert not (plugin.root / "volumes" / vol).exists()
    assert not (plugin.sidekick_dir / f"{vol}.sock").exists()
    code, doc = plugin.call("VolumeDriver.List")
    assert doc["Volumes"] == []
