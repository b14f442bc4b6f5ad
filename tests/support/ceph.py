"""A real S3 server for tests and benchmarks: Ceph's RADOS Gateway on 127.0.0.1.

``ensure_rgw()`` runs scripts/ceph-rgw-up.sh (idempotent: it only prints the
environment when the cluster's own gateway is up) and returns an S3Env parsed from
the script's output; the endpoint's port is whatever the script chose (7480, or a
free one of 7481-7580 when another server holds it), never assumed. ``export()``
puts its AWS_* variables into os.environ so subprocesses (the CLI, plugins) see
them. ``stop_rgw()``/``start_rgw()`` stop and start the shared radosgw, for outage
tests; a ``PrivateGateway`` (one more radosgw on its own port over the same
cluster) lets a test cause an outage without disturbing other tests that use
the shared gateway at the same time; it takes its port from the ephemeral range,
which the up script's ports (7480-7580) are not in.
Each test creates its own bucket with ``new_bucket()`` and removes it with
``remove_bucket()``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UP = ROOT / "scripts" / "ceph-rgw-up.sh"
DOWN = ROOT / "scripts" / "ceph-rgw-down.sh"


def ceph_dir() -> Path:
    return Path(os.environ.get("LAYERFS_CEPH_DIR", "/tmp/layerfs-ceph"))


@dataclass(frozen=True)
class S3Env:
    """Where the S3 server answers and the keys of its test user."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    def export(self) -> None:
        """Put the AWS_* variables into os.environ (inherited by subprocesses)."""
        os.environ.update(self.env())

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


def _parse_env(text: str) -> S3Env:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            values[key] = shlex.split(value)[0] if value else ""
    return S3Env(
        values["AWS_ENDPOINT_URL"],
        values["AWS_ACCESS_KEY_ID"],
        values["AWS_SECRET_ACCESS_KEY"],
        values.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def ensure_rgw(env: Mapping[str, str] | None = None) -> S3Env:
    """Bring the gateway up unless ours runs already; return its S3Env.

    ``env`` (e.g. LAYERFS_CEPH_DIR for a second cluster) is added to the script's
    environment.
    """
    proc = subprocess.run(
        ["bash", str(UP)], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/ceph-rgw-up.sh failed:\n{proc.stderr[-3000:]}")
    return _parse_env(proc.stdout)


def rgw_down(env: Mapping[str, str] | None = None) -> None:
    """Stop the whole cluster and delete its directory (``env`` as for ensure_rgw)."""
    subprocess.run(
        ["bash", str(DOWN)], capture_output=True, check=True, env={**os.environ, **(env or {})}
    )


def _rgw_pid() -> int | None:
    try:
        pid = int((ceph_dir() / "run" / "client.rgw.s3.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if str(ceph_dir() / "ceph.conf").encode() in cmdline else None


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            pass
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rgw_answers(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint + "/", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def stop_rgw(kill: bool = True) -> None:
    """Stop radosgw only (SIGKILL by default, as an outage would); the cluster stays up."""
    pid = _rgw_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    for _ in range(300):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.split(") ", 1)[1].startswith("Z"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"radosgw (pid {pid}) did not stop")


def start_rgw() -> S3Env:
    """Start radosgw again after stop_rgw (the up script restarts only what is missing)."""
    return ensure_rgw()


def new_bucket(env: S3Env, tag: str = "t") -> str:
    """Create a fresh bucket named s3-<tag>-<random> and return its name."""
    name = f"s3-{tag}-{uuid.uuid4().hex[:12]}".lower()
    env.client().create_bucket(Bucket=name)
    return name


def remove_bucket(env: S3Env, bucket: str) -> None:
    """Delete every object of a bucket and the bucket itself."""
    client = env.client()
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)
    except client.exceptions.NoSuchBucket:
        pass


class PrivateGateway:
    """One more radosgw over the running cluster, on a free port, for outage tests.

    The port comes from the ephemeral range; if another server takes it before radosgw
    binds it (radosgw then exits), start() moves to a new free port, so ``env`` is only
    final once start() has returned.
    """

    def __init__(self, base: S3Env) -> None:
        self.base = base
        self.proc: subprocess.Popen | None = None
        self._use_port(_free_port())

    def _use_port(self, port: int) -> None:
        self.port = port
        self.env = S3Env(f"http://127.0.0.1:{port}", self.base.access_key, self.base.secret_key)
        self.dir = ceph_dir() / "private" / str(port)

    def start(self, timeout: float = 60.0) -> S3Env:
        if self.proc is not None and self.proc.poll() is None:
            return self.env
        deadline = time.monotonic() + timeout
        for _ in range(3):
            if self._start_once(deadline):
                return self.env
            if time.monotonic() > deadline or not rgw_answers(self.env.endpoint):
                break  # radosgw failed, and not because another server took its port
            shutil.rmtree(self.dir, ignore_errors=True)
            self._use_port(_free_port())
        raise RuntimeError(f"the private radosgw did not start; see {self.dir}")

    def _start_once(self, deadline: float) -> bool:
        """Start radosgw on self.port; True once that process listens there and answers."""
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "stdout", "ab")  # noqa: SIM115 - handed to the daemon
        self.proc = subprocess.Popen(
            [
                "radosgw",
                "-f",
                "-c",
                str(ceph_dir() / "ceph.conf"),
                "-n",
                "client.rgw.s3",
                f"--rgw_frontends=beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1",
                f"--pid_file={self.dir / 'pid'}",
                f"--admin_socket={self.dir / 'asok'}",
                f"--log_file={self.dir / 'log'}",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        # another server on the port would answer too: the port must be held by our process
        while not (listens(self.proc.pid, self.port) and rgw_answers(self.env.endpoint)):
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                self.stop()
                return False
            time.sleep(0.1)
        return True

    def stop(self, kill: bool = True) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if not kill:
            self.proc.terminate()
            try:
                self.proc.wait(15)
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        self.proc.wait(60)

    def __enter__(self) -> PrivateGateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
