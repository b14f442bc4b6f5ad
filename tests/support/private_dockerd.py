"""A private Docker daemon for tests and benchmarks (plugins, `docker load` timings).

The shared daemon caches every legacy volume driver it ever talked to and keeps calling
it (with ~15 s of retries per `docker volume ls`) after the plugin is gone. Tests that
start short-lived plugins therefore use their own dockerd, with its own data root, exec
root, pidfile and API socket, its own bridge and no iptables; it can also be restarted, which
the shared daemon must never be. (Not `--bridge=none`: dockerd 20.10 then deletes the
host's docker0 at start, which breaks the shared daemon's containers.) The plugin socket
directory (/run/docker/plugins) is shared with the main daemon, so plugin names still
need a unique `vp-` prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker

from tests.support.dockerenv import BASE_IMAGE, busybox_rootfs_tar
from tests.support.mounts import unmount_below


class PrivateDockerd:
    """A dockerd subprocess; `env` points the docker CLI and SDK at it."""

    def __init__(self, work: Path | None = None, exec_root: Path | None = None) -> None:
        """`work` (default a new directory in /var/tmp) holds its config, log and data
        root; `exec_root` (default a new /run/vpd-TAG) its state and API socket."""
        tag = uuid.uuid4().hex[:6]
        self.work = work or Path(tempfile.mkdtemp(prefix=f"vp-dockerd-{tag}-", dir="/var/tmp"))
        self.exec_root = exec_root or Path(f"/run/vpd-{tag}")
        self.host = f"unix://{self.exec_root}/docker.sock"
        self.env = dict(os.environ, DOCKER_HOST=self.host)
        self.bridge = f"vpd{tag}br"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> PrivateDockerd:
        config = self.work / "daemon.json"
        config.write_text(json.dumps({}))
        self._prepare()
        log = open(self.work / "dockerd.log", "ab")  # noqa: SIM115 - handed to the daemon
        self.proc = subprocess.Popen(
            self._command(config),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"private dockerd exited:\n{self.log()}")
            with contextlib.suppress(Exception):
                self.client().ping()
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"private dockerd did not answer within {timeout} s:\n{self.log()}")

    def _prepare(self) -> None:
        """Make what the daemon needs before it starts: its exec root and bridge."""
        self.exec_root.mkdir(mode=0o700, exist_ok=True)
        if subprocess.run(["ip", "link", "show", self.bridge], capture_output=True).returncode:
            subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)

    def _network_args(self) -> list[str]:
        """The daemon's network options: its own bridge."""
        return [f"--bridge={self.bridge}"]

    def _command(self, config: Path) -> list[str]:
        """The daemon's command line."""
        return [
            "dockerd",
            f"--config-file={config}",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.exec_root / 'docker.pid'}",
            f"--host={self.host}",
            *self._network_args(),
            "--iptables=false",
            "--ip-masq=false",
            "--log-level=warn",
        ]

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=300)

    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.work / "dockerd.log").read_text(errors="replace")[-5000:]
        return ""

    def docker(self, *args: str, check: bool = True, timeout: float = 300):
        """Run the docker CLI against this daemon; return the CompletedProcess."""
        proc = subprocess.run(
            ["docker", *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def ensure_busybox(self) -> str:
        if self.docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
            subprocess.run(
                ["docker", "import", "-c", 'CMD ["/bin/sh"]', "-", BASE_IMAGE],
                input=busybox_rootfs_tar(),
                check=True,
                capture_output=True,
                env=self.env,
            )
        return BASE_IMAGE

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the daemon and wait for it (its containers stop with it)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def data_root(self) -> Path:
        return self.work / "data"

    def reset(self) -> None:
        """Restart with an empty data root (every image and volume gone)."""
        self.stop()
        unmount_below(self.data_root)
        shutil.rmtree(self.data_root, ignore_errors=True)
        self.start()

    def destroy(self) -> None:
        """Stop the daemon and delete everything it stored."""
        self.stop()
        for path in (self.work / "data", self.exec_root):
            unmount_below(path)
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.exec_root, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)


@contextlib.contextmanager
def private_dockerd() -> Iterator[PrivateDockerd]:
    daemon = PrivateDockerd()
    try:
        daemon.start()
        daemon.ensure_busybox()
        yield daemon
    finally:
        daemon.destroy()
