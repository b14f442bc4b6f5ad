"""How the server answers through a real `volplugin serve` on its unix socket: big
answers to slow readers, and its access log up to a stop."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from tests.support.plugin import (
    ACCESS_MARK,
    PluginProcess,
    UnixHTTPConnection,
    post,
    running_plugin,
    without_docker,
)


@pytest.fixture
def plugin(tmp_path):
    env = without_docker(tmp_path)
    with running_plugin(tmp_path / "root", env=env) as p:
        yield p


def test_an_answer_bigger_than_the_socket_buffer_reaches_a_late_reader(plugin) -> None:
    # 2,500 volumes make a List answer of about 300 KB, more than a unix socket buffers:
    # the task thread cannot send it all, and the event loop must send the rest once
    # the client reads.
    sock_path = str(plugin.socket)
    creator = UnixHTTPConnection(sock_path)
    for i in range(2500):
        creator.request("POST", "/VolumeDriver.Create", body=json.dumps({"Name": f"v{i:04d}"}))
        assert creator.getresponse().read() == b'{"Err": ""}'
    creator.close()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    conn.sendall(b"POST /VolumeDriver.List HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    time.sleep(2)  # the server fills the socket and must wait for us
    conn.settimeout(30)
    data = b""
    marker = b'{"Volumes": ['
    while True:
        chunk = conn.recv(1 << 16)
        assert chunk, "the server closed the connection before the List answer was whole"
        data += chunk
        if marker in data and data.rstrip().endswith(b"}"):
            try:
                doc = json.loads(data[data.index(marker) :])
                break
            except ValueError:
                continue
    conn.close()
    assert len(doc["Volumes"]) == 2500
    assert len(data) > 300_000
    status, listed = post(sock_path, "VolumeDriver.List")
    assert status == 200 and len(listed["Volumes"]) == 2500


def test_access_lines_written_before_a_stop_are_not_lost(tmp_path) -> None:
    env = without_docker(tmp_path)
    plugin = PluginProcess(tmp_path / "root", env=env).start()
    try:
        for i in range(50):
            assert plugin.call("VolumeDriver.Create", {"Name": f"stop{i}"})[0] == 200
        plugin.stop(signal.SIGTERM)  # at once
        lines = [line for line in plugin.log().splitlines() if ACCESS_MARK in line]
        docs = [json.loads(line.split(ACCESS_MARK, 1)[1]) for line in lines]
        creates = [doc for doc in docs if doc["endpoint"] == "/VolumeDriver.Create"]
        assert sorted(doc["volume"] for doc in creates) == sorted(f"stop{i}" for i in range(50))
    finally:
        plugin.cleanup()
