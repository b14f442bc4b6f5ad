"""scripts/ceph-rgw-up.sh tells its own gateway from another server on its port."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support import ceph

pytestmark = pytest.mark.s3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port(env: ceph.S3Env) -> int:
    port = urlsplit(env.endpoint).port
    assert port is not None
    return port


def _kill_rgw(cluster: Path) -> None:
    pid = int((cluster / "run" / "client.rgw.s3.pid").read_text())
    assert str(cluster / "ceph.conf").encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                return
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError(f"radosgw {pid} did not stop")


def _serve_foreign(port: int) -> http.server.ThreadingHTTPServer:
    """A plain HTTP server on the port (retried while the killed radosgw lets go of it)."""
    for _ in range(100):
        try:
            server = http.server.ThreadingHTTPServer(
                ("127.0.0.1", port), http.server.SimpleHTTPRequestHandler
            )
        except OSError:
            time.sleep(0.05)
            continue
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
    raise AssertionError(f"port {port} stayed busy after radosgw was killed")


@pytest.fixture
def cluster_env(monkeypatch) -> Iterator[dict[str, str]]:
    """Settings for a second, private cluster (short path: admin sockets have a length limit)."""
    if shutil.which("radosgw") is None:
        pytest.fail("radosgw is not installed: apt-get install ceph-mon ceph-osd radosgw")
    monkeypatch.delenv("LAYERFS_RGW_PORT", raising=False)
    top = Path(tempfile.mkdtemp(prefix="rgwgw-", dir="/tmp"))
    env = {"LAYERFS_CEPH_DIR": str(top / "ceph"), "LAYERFS_CEPH_MON_PORT": str(_free_port())}
    try:
        yield env
    finally:
        ceph.rgw_down(env)
        shutil.rmtree(top, ignore_errors=True)


def test_a_foreign_server_on_the_recorded_port_moves_the_gateway(cluster_env) -> None:
    cluster = Path(cluster_env["LAYERFS_CEPH_DIR"])
    first_port = _free_port()
    first = ceph.ensure_rgw({**cluster_env, "LAYERFS_RGW_PORT": str(first_port)})
    assert _port(first) == first_port
    bucket = ceph.new_bucket(first, "gw")

    _kill_rgw(cluster)
    foreign = _serve_foreign(first_port)
    try:
        # asked for explicitly, the taken port is an error, not a silent move
        with pytest.raises(RuntimeError, match="held by another server"):
            ceph.ensure_rgw({**cluster_env, "LAYERFS_RGW_PORT": str(first_port)})

        moved = ceph.ensure_rgw(cluster_env)
        assert 7481 <= _port(moved) <= 7580
        assert moved.access_key == first.access_key
        names = [b["Name"] for b in moved.client().list_buckets()["Buckets"]]
        assert bucket in names  # our cluster, not the server on the old port

        started = time.monotonic()
        assert ceph.ensure_rgw(cluster_env) == moved  # ours is up: the same port again
        assert time.monotonic() - started < 10

        _kill_rgw(cluster)
        assert ceph.ensure_rgw(cluster_env) == moved  # restarted on the recorded port
        ceph.remove_bucket(moved, bucket)
    finally:
        foreign.shutdown()
        foreign.server_close()
