"""Start and stop a real `volplugin serve` subprocess for tests, and talk to its socket.

    with running_plugin(tmp_path / "root") as plugin:
        plugin.call("VolumeDriver.Create", {"Name": "v1"})
        # docker volume create -d plugin.name ...

Each plugin gets a unique name (vp-test-XXXXXX), so its driver name never collides with
other tests; the socket is removed whatever way the process ends. `pause()`/`resume()`
freeze and thaw the server and every process it started (SIGSTOP/SIGCONT).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.waiting import wait_for

PLUGIN_DIR = Path("/run/docker/plugins")
ACCESS_MARK = "volplugin.access: "
# set in each plugin's environment (a fresh value per start), which every process it
# starts inherits, even the daemons that leave its session (lazy volumes' views)
PROCESS_MARK = "VOLPLUGIN_TEST_PROCESS"
VOLPLUGIN = str(Path(sys.executable).parent / "volplugin")


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def post(sock_path: str, endpoint: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    """POST to the plugin like the daemon does; return (HTTP status, JSON answer)."""
    data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = UnixHTTPConnection(sock_path)
    try:
        conn.request(
            "POST",
            "/" + endpoint.lstrip("/"),
            body=data,
            headers={"Content-Type": "application/vnd.docker.plugins.v1.2+json"},
        )
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def job_call(
    call: Callable[[str, dict], tuple[int, dict]], endpoint: str, body: dict
) -> tuple[int, dict]:
    """Start a job (/Backup.Create, .Restore, .Prune) with Wait and read its Result.

    Returns (HTTP status, the job's Result with "Err" and the whole JOB under "Job"), so
    `doc["Backup"]` reads like the synchronous answer of old.
    """
    status, doc = call(endpoint, {**body, "Wait": True})
    job = doc.get("Job")
    assert job is not None or status == 500, doc  # refused before any job: an Err alone
    if job is not None:
        assert job["State"] not in ("queued", "running"), job  # Wait answers once it ended
        assert (status == 200) == (job["State"] == "succeeded"), (status, job)
    result = dict(job["Result"] or {}) if job else {}
    return status, {**result, "Err": doc.get("Err", ""), "Job": job}


def without_docker(tmp_path: Path) -> dict[str, str]:
    """The environment of a plugin that must not depend on (or touch) the shared daemon.

    Its docker is unreachable. Skips the test unless it runs as root: plugin sockets
    live in /run/docker/plugins.
    """
    if os.geteuid() != 0:
        pytest.skip("the plugin socket lives in /run/docker/plugins (root only)")
    return dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")


def marked_processes(mark: str) -> list[int]:
    """The pids of the processes whose environment holds PROCESS_MARK=`mark`."""
    wanted = f"{PROCESS_MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        # a process gone meanwhile, or a kernel thread, is no match
        with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
            if wanted in f.read().split(b"\0"):
                found.append(int(entry))
    return found


def proc_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (R, S, T, Z, ...); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def signal_processes(pids: list[int], sig: int) -> None:
    """Send `sig` to each of `pids` that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class PluginProcess:
    """A `volplugin serve` subprocess."""

    def __init__(
        self,
        root: Path,
        name: str | None = None,
        plugin_dir: Path = PLUGIN_DIR,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ):
        self.root = Path(root)
        self.env = env
        self.args = tuple(args)  # more `volplugin serve` options
        self.name = name or f"vp-test-{uuid.uuid4().hex[:6]}"
        self.plugin_dir = Path(plugin_dir)
        self.socket = self.plugin_dir / f"{self.name}.sock"
        self.log_path = self.root.parent / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.mark = ""  # this start's PROCESS_MARK value
        self.paused = False

    def command(self) -> list[str]:
        """The command line that runs the server."""
        return [
            *[VOLPLUGIN, "serve", "--name", self.name, "--root", str(self.root)],
            *["--plugin-dir", str(self.plugin_dir), *self.args],
        ]

    def start(self, timeout: float = 30.0) -> PluginProcess:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.mark = uuid.uuid4().hex
        self.paused = False
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**(os.environ if self.env is None else self.env), PROCESS_MARK: self.mark},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"volplugin serve exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                status, _ = post(str(self.socket), "Plugin.Activate")
                if status == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"volplugin serve did not answer within {timeout} s:\n{self.log()}")

    def call(self, endpoint: str, body: bytes | dict | None = None) -> tuple[int, dict]:
        return post(str(self.socket), endpoint, body)

    def job(self, endpoint: str, body: dict) -> tuple[int, dict]:
        """Run a job to its end (see `job_call`)."""
        return job_call(self.call, endpoint, body)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_records(self, endpoint: str, count: int, timeout: float = 10.0) -> list[dict]:
        """The access-log records of `endpoint`, once at least `count` of them are written.

        The server logs a request as it ends (volplugin.protocol.accesslog), so a record
        may show up a moment after its answer.
        """

        def records() -> list[dict]:
            found = [
                json.loads(line.split(ACCESS_MARK, 1)[1])
                for line in self.log().splitlines()
                if ACCESS_MARK in line
            ]
            return [doc for doc in found if doc["endpoint"] == endpoint]

        wait_for(
            lambda: len(records()) >= count,
            f"{count} access-log records of {endpoint}",
            timeout=timeout,
        )
        return records()

    def processes(self) -> list[int]:
        """The server's pid (first, while it runs) and those of every process it started."""
        if not self.mark:
            return []
        pids = marked_processes(self.mark)
        if self.proc is not None and self.proc.pid in pids:
            pids.remove(self.proc.pid)
            pids.insert(0, self.proc.pid)
        return pids

    def pause(self) -> None:
        """SIGSTOP the server and everything it started, as if its host froze."""
        stopped: set[int] = set()
        while pids := [pid for pid in self.processes() if pid not in stopped]:
            signal_processes(pids, signal.SIGSTOP)  # the server first: it starts no more
            stopped.update(pids)
        # the signal takes effect when each process is next scheduled: wait for that
        wait_for(
            lambda: all(proc_state(pid) in ("T", "Z", None) for pid in stopped),
            "the plugin's processes to stop",
            timeout=10,
        )
        self.paused = True

    def resume(self) -> None:
        """SIGCONT what `pause` stopped."""
        signal_processes(self.processes(), signal.SIGCONT)
        self.paused = False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send `sig` (SIGKILL to simulate a crash), wait, and make sure no socket is left.

        A paused server (and what it started) is continued after the signal is sent.
        """
        rc = None
        frozen = self.processes() if self.paused else []  # before a SIGKILL orphans them
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            signal_processes(frozen, signal.SIGCONT)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        else:  # what a paused server that ended started
            signal_processes(frozen, signal.SIGCONT)
            rc = None if self.proc is None else self.proc.returncode
        self.paused = False
        self.proc = None
        return rc

    def kill(self) -> None:
        """SIGKILL: the socket file stays behind, like after a real crash."""
        self.stop(signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


@contextlib.contextmanager
def running_plugin(
    root: Path, name: str | None = None, env: dict[str, str] | None = None
) -> Iterator[PluginProcess]:
    plugin = PluginProcess(root, name, env=env).start()
    try:
        yield plugin
    finally:
        plugin.cleanup()


def volume_users(docker_env: dict[str, str], driver: str) -> list[str]:
    """Names of all containers (any state) that mount a volume of `driver`."""
    import docker

    client = docker.DockerClient(base_url=docker_env["DOCKER_HOST"])
    try:
        return [
            c.name
            for c in client.containers.list(all=True)
            if any(m.get("Driver") == driver for m in c.attrs.get("Mounts", []))
        ]
    finally:
        client.close()


def remove_driver_objects(docker_env: dict[str, str], driver: str) -> None:
    """Remove the containers using volumes of `driver`, then those volumes."""
    names = volume_users(docker_env, driver)
    if names:
        subprocess.run(["docker", "rm", "-f", *names], env=docker_env, capture_output=True)
    listing = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"driver={driver}"],
        env=docker_env,
        capture_output=True,
        text=True,
    )
    vols = listing.stdout.split()
    if vols:
        subprocess.run(["docker", "volume", "rm", "-f", *vols], env=docker_env, capture_output=True)


def start_daemon_plugin(daemon, base: Path, name: str, store: str | None = None, **env: str):
    """A started plugin for a (private) daemon: its docker is `daemon`, its root, local
    cache and (unless `store` is given) store under `base`; `env` adds variables."""
    full = dict(
        os.environ,
        DOCKER_HOST=daemon.host,
        LAYERFS_STORE=store or str(base / "store"),
        LAYERFS_CACHE_DIR=str(base / "cache"),
        **env,
    )
    return PluginProcess(base / "root", name=name, env=full).start()


def stop_daemon_plugin(daemon, plugin: PluginProcess) -> None:
    """Remove the daemon's containers and volumes of the plugin's driver, then stop it."""
    if plugin.proc is None:
        plugin.start()
    remove_driver_objects(daemon.env, plugin.name)
    plugin.cleanup()


def metrics_url(plugin: PluginProcess) -> str:
    """Where this run of the plugin serves its metrics (port 0: as it logged)."""
    found: list[str] = []

    def logged() -> bool:
        found[:] = re.findall(r"serving metrics on (http://\S+/metrics)", plugin.log())
        return bool(found)

    wait_for(logged, "the metrics address in the log")
    return found[-1]
